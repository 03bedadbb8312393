"""Ctrl-C and SIGTERM always stop a command, however busy or starved the process is.

Python runs signal handlers in the main thread only, but the kernel hands a process-directed
signal to *any* thread that does not block it — and it picks another thread whenever the main
thread is stopped (CPU starvation, SIGSTOP) or already has a signal pending. A pool thread or an
OpenBLAS/ONNX Runtime thread then takes SIGTERM, Python notes it, and the main thread stays blocked
in a read for ever (seen: 5 of 5 SIGTERMs after a brief SIGSTOP; the run printed nothing and never
exited). So, while a command runs:

- SIGINT and SIGTERM have a Python handler that raises ``KeyboardInterrupt`` (commands turn it into
  their "interrupted, rerun with --resume" exit 130), whichever thread the kernel chose;
- Python's signal wakeup fd is a pipe watched by one relay thread, which interrupts the main
  thread's blocking call with a thread-directed SIGUSR2 (``pthread_kill``), so the handler runs now.

Blocking the signals in every other thread would be the textbook fix, but threads started before
the command (OpenBLAS starts its pool when numpy is imported) cannot be reached, and
multiprocessing unblocks them again whenever it starts its resource tracker.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELAY_SIGNAL = signal.SIGUSR2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _nothing(signum, frame):  # SIGUSR2 only exists to make the main thread's syscall return EINTR
    pass


@contextmanager
def stop_signals_to_main_thread():
    """SIGINT/SIGTERM raise ``KeyboardInterrupt`` in the main thread, promptly, for the duration."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        yield  # not the main thread (a test runner thread), or no POSIX thread signals
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old_handlers = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    old_handlers[RELAY_SIGNAL] = signal.signal(RELAY_SIGNAL, _nothing)
    old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    main_id = threading.main_thread().ident

    def relay():
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:  # write end closed: the command is over
                return
            if any(b in (int(s) for s in STOP_SIGNALS) for b in data):
                signal.pthread_kill(main_id, RELAY_SIGNAL)

    thread = threading.Thread(target=relay, name="cxr-deploy-signal-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(write_fd)
        thread.join(1)
        os.close(read_fd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
