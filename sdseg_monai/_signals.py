"""Stop signals: SIGTERM (``kill``, a batch scheduler's time limit, torchrun) handled as Ctrl-C is.

Python's default action for SIGTERM ends the process at once, running no ``finally``: temporaries of
atomic writes stay behind and nothing says why the command stopped.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


@contextmanager
def handling(signals: Iterable[int], handler: Callable) -> Iterator[None]:
    """While the block runs, ``handler`` handles ``signals``; the previous handlers come back after,
    whatever happens.

    Raises:
        ValueError: off the main thread (only the main thread can set a handler).
    """
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt in the main thread, so that ``finally``
    blocks run (temporaries removed) and the command ends as on Ctrl-C.

    Does nothing off the main thread, and nothing where the process set a SIGTERM handler of its own
    (or ignores SIGTERM): only Python's default action is replaced.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    with handling((signal.SIGTERM,), _interrupt):
        yield
