"""Epoch-end callbacks (stop at epoch k, logging) and the progress output of fit(verbose=...)."""
import io

import numpy as np

import fastbp


def _problem():
    X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
    return X, 2 * X


def _trainer():
    return fastbp.Trainer(fastbp.MLP([1, 8, 1], "tanh", seed=0), loss="mse", lr=0.1, batch_size=16, seed=0)


def test_callback_stops_at_epoch_k():
    X, y = _problem()
    trainer = _trainer()
    seen = []

    def stop_at_3(trainer, history):
        seen.append(len(history.loss))
        return len(history.loss) == 3

    history = trainer.fit(X, y, epochs=10, callbacks=[stop_at_3])
    assert seen == [1, 2, 3]
    assert len(history.loss) == 3 and history.stop_reason == "callback"
    assert trainer.epochs_done == 3


def test_logging_callback_sees_validation_and_model():
    X, y = _problem()
    trainer = _trainer()
    log = []

    def logger(trainer, history):
        log.append((history.epoch[-1], history.loss[-1], history.val_loss[-1]))

    history = trainer.fit(X, y, epochs=4, validation_data=(X, y), callbacks=[logger])
    assert [row[0] for row in log] == [0, 1, 2, 3]
    assert [row[1] for row in log] == history.loss
    assert [row[2] for row in log] == history.val_loss
    assert history.stop_reason == "epochs"


def test_verbose_default_is_silent(capsys):
    X, y = _problem()
    _trainer().fit(X, y, epochs=2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_verbose_lines_when_not_a_terminal(capsys):
    X, y = _problem()
    _trainer().fit(X, y, epochs=3, validation_data=(X, y), verbose=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[-1].startswith("epoch 3/3") and "val_loss" in lines[-1] and "samples/s" in lines[-1]
    assert "ETA" in lines[-1]


def test_progress_bar_on_a_terminal_and_early_stop():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    X, y = _problem()
    out = Terminal()
    bar = fastbp.ProgressBar(total_epochs=10, n_samples=len(X), stream=out)
    assert bar.mode == "bar"
    history = _trainer().fit(X, y, epochs=10, callbacks=[bar, lambda t, h: len(h.loss) == 4])
    bar.close(history)
    text = out.getvalue()
    assert text.count("\r") >= 4 and "epoch 4/10" in text and "[" in text
    assert text.endswith("stopped after 4 epochs: callback\n")
