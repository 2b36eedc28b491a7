"""Keep Ctrl-C from landing between a compiled training call and the bookkeeping that records it.

A compiled (numba) call cannot be interrupted: Python raises KeyboardInterrupt at the first bytecode after
it returns. If that happened before the trainer recorded what the call did, the parameters would be ahead
of the history and the epoch counter. The trainer therefore runs "compiled call + record it" inside
:func:`deferred_keyboard_interrupt`, and the interrupt arrives right after, with everything consistent.
"""
from __future__ import annotations

import _signal  # signal's C module: signal.signal() wraps it with enum conversions (3 of the 5 us a use took)
import contextlib
import signal
import threading


_SIGINT = int(signal.SIGINT)


@contextlib.contextmanager
def deferred_keyboard_interrupt():
    """Hold back SIGINT (Ctrl-C) until the block ends, then raise KeyboardInterrupt.

    Only where it is safe and ours to do: in the main thread (the only one that receives signals), and
    only while SIGINT has Python's default handler (a host application's own handler is left alone).
    """
    if (threading.current_thread() is not threading.main_thread()
            or _signal.getsignal(_SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = _signal.signal(_SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _signal.signal(_SIGINT, previous)
    if received:
        raise KeyboardInterrupt
