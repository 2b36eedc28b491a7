"""Progress reporting for :meth:`fastbp.Trainer.fit`, written as an ordinary epoch-end callback.

A callback is any callable ``callback(trainer, history) -> bool | None`` passed in ``fit(callbacks=[...])``:
it is called after every epoch with the :class:`fastbp.History` of the current fit so far (``history.loss``,
``history.val_loss``, ``history.time`` ...) and returning True stops training (``history.stop_reason`` is
then ``"callback"``). :class:`ProgressBar` is such a callback; ``fit(verbose=True)`` adds one for you.

>>> import io, numpy as np, fastbp
>>> X = np.linspace(-1, 1, 50, dtype=np.float32).reshape(-1, 1)
>>> trainer = fastbp.Trainer(fastbp.MLP([1, 8, 1], "tanh", seed=0), loss="mse", lr=0.1, batch_size=None)
>>> out = io.StringIO()
>>> history = trainer.fit(X, 2 * X, epochs=3, callbacks=[fastbp.ProgressBar(3, stream=out, mode="lines")])
>>> out.getvalue().count("epoch")
3
"""
from __future__ import annotations

import sys
import time
from typing import IO

from ._validation import check_choice, check_int


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Epoch-end callback that shows epoch, loss, validation loss, samples/s and the ETA.

    Parameters
    ----------
    total_epochs : int or None
        Epochs this fit will run at most (for the bar and the ETA); None shows no bar or ETA.
    n_samples : int or None
        Training samples per epoch, for the samples/s column (left out when None).
    stream : file-like, default ``sys.stderr``
    mode : {"auto", "bar", "lines"}
        ``"bar"`` redraws one line in place (``\\r``); ``"lines"`` prints plain lines, fit for logs;
        ``"auto"`` picks ``"bar"`` when ``stream`` is a terminal and ``"lines"`` otherwise.
    every : int or None
        In ``"lines"`` mode print every ``every``-th epoch (and always the first and last); None chooses
        about 20 lines per fit (every epoch when ``total_epochs`` is unknown).
    width : int
        Characters of the bar itself.

    The callback never stops training (it returns False). Call :meth:`close` after fit to end the bar's
    line; ``Trainer.fit(verbose=...)`` does that itself, also when fit stops early.

    Examples
    --------
    >>> import sys, numpy as np, fastbp
    >>> X = np.zeros((10, 2), np.float32); y = np.zeros((10, 1), np.float32)
    >>> trainer = fastbp.Trainer(fastbp.MLP([2, 4, 1], seed=0), loss="mse", lr=0.1, batch_size=None)
    >>> bar = fastbp.ProgressBar(total_epochs=2, n_samples=10, stream=sys.stdout, mode="lines")
    >>> _ = trainer.fit(X, y, epochs=2, callbacks=[bar])  # doctest: +ELLIPSIS
    epoch 1/2 ...
    epoch 2/2 ...
    """

    def __init__(self, total_epochs: int | None = None, n_samples: int | None = None, stream: IO | None = None,
                 mode: str = "auto", every: int | None = None, width: int = 24):
        check_choice("mode", mode, ("auto", "bar", "lines"))
        total_epochs = check_int("total_epochs", total_epochs, minimum=0, allow_none=True)
        n_samples = check_int("n_samples", n_samples, minimum=1, allow_none=True)
        every = check_int("every", every, minimum=1, allow_none=True)
        width = check_int("width", width, minimum=1)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TypeError(f"stream must be a file-like object with a write method (such as sys.stdout); got "
                            f"{type(stream).__name__}")
        # A bar redraws every epoch: `every` (which epochs get a line) would do nothing there.
        if mode == "bar" and every is not None:
            raise ValueError(f"every={every} has no effect with mode='bar' (the bar is redrawn every epoch); it "
                             "chooses which epochs get a line in mode='lines' or 'auto'")
        self.total_epochs = total_epochs
        self.n_samples = n_samples
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if callable(isatty) and isatty() else "lines"
        self.mode = mode
        if every is None:
            every = max(1, (total_epochs or 1) // 20)
        self.every = max(1, int(every))
        self.width = width
        self._started = None
        self._last_line = ""
        self._printed_epochs = 0

    def __call__(self, trainer, history) -> bool:
        if self._started is None:
            # The first epoch ran before the first call: count its time.
            self._started = time.perf_counter() - (history.time[0] if history.time else 0.0)
        done = len(history.loss)
        line = self.format(history)
        if self.mode == "bar":
            self._write("\r" + line.ljust(len(self._last_line)))
        elif done == 1 or done % self.every == 0 or done == self.total_epochs:
            self._write(line + "\n")
            self._printed_epochs = done
        self._last_line = line
        return False

    def format(self, history) -> str:
        """One status line for the history so far."""
        done = len(history.loss)
        parts = []
        if self.total_epochs:
            parts.append(f"epoch {done}/{self.total_epochs}")
            if self.mode == "bar":
                filled = int(self.width * min(done, self.total_epochs) / self.total_epochs)
                parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
        else:
            parts.append(f"epoch {done}")
        if history.loss:
            parts.append(f"loss {history.loss[-1]:.4g}")
        if history.val_loss:
            parts.append(f"val_loss {history.val_loss[-1]:.4g}")
        if history.val_accuracy:
            parts.append(f"val_acc {history.val_accuracy[-1]:.3f}")
        if self.n_samples and history.time and history.time[-1] > 0:
            parts.append(f"{self.n_samples / history.time[-1]:,.0f} samples/s")
        if self.total_epochs and self._started is not None and done:
            elapsed = time.perf_counter() - self._started
            parts.append(f"ETA {_format_seconds(elapsed / done * max(0, self.total_epochs - done))}")
        return "  ".join(parts)

    def close(self, history=None) -> None:
        """End the progress output: finish the bar's line, and say why fit stopped when it stopped early."""
        reason = getattr(history, "stop_reason", "epochs")
        if history is not None and self.mode == "lines" and len(history.loss) != self._printed_epochs \
                and history.loss:
            self._write(self.format(history) + "\n")
        elif self.mode == "bar" and self._last_line:
            if history is not None and history.loss:
                self._write("\r" + self.format(history).ljust(len(self._last_line)))
            self._write("\n")
        if history is not None and reason != "epochs":
            self._write(f"stopped after {len(history.loss)} epochs: {reason}\n")
        self._last_line = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        flush = getattr(self.stream, "flush", None)
        if callable(flush):
            flush()
