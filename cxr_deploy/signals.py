"""Ctrl-C and SIGTERM: at any moment of a command's life, exit 130 with every output intact.

The contract (README, "Exit codes"), for every ``cxr-deploy`` command:

- **From the first line of the command to the process's exit** SIGINT and SIGTERM are handled:
  :func:`install` runs before click parses the arguments, before any import of torch/onnxruntime,
  any worker, any output file; nothing removes the handlers again (the pre-existing design took them
  down as ``batch`` returned, and a SIGTERM while the process exited killed it: exit -15).
- **While a command works** a signal raises ``KeyboardInterrupt`` in the main thread; the commands
  turn it into "interrupted" and exit 130 (the CLI group does so for any command that does not).
  Further signals while it stops are counted, not raised (see :data:`RERAISE_AFTER_S`).
- **While outputs are being completed** (the CSV's last batch is closed, the summary and report are
  written, the decode pool shuts down) code runs under :func:`deferred`: a signal is remembered,
  the section completes, and the interrupt is raised at its end, so a report is complete or absent.
- **Once every output is complete** (:func:`finish`, called by the CLI group as the command
  returns) the signals are *ignored*: the command's own exit code stands. ``SIG_IGN`` rather than a
  Python handler because the interpreter resets Python handlers to the default ("die of the
  signal") late in its shutdown, while an ignored signal stays ignored.

Why a relay thread: Python runs signal handlers in the main thread only, but the kernel hands a
process-directed signal to *any* thread that does not block it, and picks another thread whenever
the main thread is stopped (CPU starvation, SIGSTOP) or already has a signal pending. A pool thread
or an OpenBLAS/ONNX Runtime thread then takes SIGTERM, Python notes it, and the main thread stays
blocked in a read for ever (seen: 5 of 5 SIGTERMs after a brief SIGSTOP; the run printed nothing
and never exited). So Python's signal wakeup fd is a pipe watched by one relay thread, which
interrupts the main thread's blocking call with a thread-directed SIGUSR2 (``pthread_kill``), so
the handler runs now. Blocking the signals in every other thread would be the textbook fix, but
threads started before the command (OpenBLAS starts its pool when numpy is imported) cannot be
reached, and multiprocessing unblocks them again whenever it starts its resource tracker.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELAY_SIGNAL = signal.SIGUSR2


class _State:
    installed = False  # install() ran: handlers for the life of the process
    deferring = 0  # depth of deferred() sections
    pending = False  # a signal came while deferring
    finished = False  # finish() ran: signals are ignored
    raised_at = None  # monotonic time the interrupt was raised


_state = _State()


# After the interrupt is raised, the code stopping the command (closing the CSV, killing workers,
# printing the summary) must not be cut short by the next Ctrl-C or by systemd's SIGTERM sent to
# the whole process group: later signals only count, unless the stop has taken this long (then the
# first interrupt was evidently swallowed somewhere, and the next one is raised again).
RERAISE_AFTER_S = 10.0


def _on_signal(signum, frame):
    import time

    now = time.monotonic()
    stopping = _state.raised_at is not None and now - _state.raised_at < RERAISE_AFTER_S
    if _state.deferring or stopping:
        _state.pending = True
        return
    _state.raised_at = now
    raise KeyboardInterrupt


def _nothing(signum, frame):  # SIGUSR2 only exists to make the main thread's syscall return EINTR
    pass


def _start_relay() -> tuple[int, int, threading.Thread]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
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
                try:
                    signal.pthread_kill(main_id, RELAY_SIGNAL)
                except (ProcessLookupError, OSError):  # the main thread is gone: exiting anyway
                    return

    thread = threading.Thread(target=relay, name="cxr-deploy-signal-relay", daemon=True)
    thread.start()
    return read_fd, write_fd, thread


def _usable() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_kill")


def install() -> bool:
    """Route SIGINT/SIGTERM to ``KeyboardInterrupt`` in the main thread until the process exits.

    Idempotent. Returns False (and does nothing) off the main thread or without POSIX thread
    signals. Only the ``cxr-deploy`` command calls this: a library must not take a host program's
    signals for good (use :func:`stop_signals_to_main_thread` for a scoped version)."""
    if _state.installed:
        return True
    if not _usable():
        return False
    _, write_fd, _ = _start_relay()  # first: a signal may interrupt what follows
    signal.signal(RELAY_SIGNAL, _nothing)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _state.installed, _state.finished = True, False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    return True


def finish() -> None:
    """Every output of the command is complete: from now on SIGINT/SIGTERM are ignored, so the
    command's own exit code stands and the process can never die of a late signal."""
    if not _state.installed or not _usable():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _state.finished = True


def check() -> None:
    """Raise the interrupt again if one was asked for: long loops call this, because an interrupt
    raised inside a finalizer (``__del__``) or a callback is printed as "Exception ignored" and
    lost (seen: a SIGTERM landing in tqdm's ``__del__`` left ``pacs listen`` running)."""
    if _state.raised_at is not None and not _state.deferring:
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether this process has raised the interrupt (and so must leave by :func:`exit_now`)."""
    return _state.raised_at is not None


def exit_now(code: int) -> None:
    """Leave with ``code`` after an interrupt, without the interpreter's shutdown: CPython remembers
    a ``KeyboardInterrupt`` that went through code run by ``PyRun_*`` (module initialisers of some
    extensions do that) as "unhandled", even once we caught it, and at exit then kills itself with
    SIGINT (seen: exit -2 after our own "interrupted" line, 3 times in 12 start-up SIGTERMs). Every
    output is closed by then; only the standard streams need flushing."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _Deferred:
    signalled = False  # a signal came during the section (set when it ends)


@contextmanager
def deferred(raise_at_end: bool = True):
    """A section that must complete (closing files, writing a report, stopping workers): a signal
    inside it is remembered, and ``KeyboardInterrupt`` is raised when the outermost section ends
    (or, with ``raise_at_end=False``, reported as ``handle.signalled`` for the caller to act on).

    Outside :func:`install` / :func:`stop_signals_to_main_thread` it only runs the section."""
    handle = _Deferred()
    _state.deferring += 1
    try:
        yield handle
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending:
            import time

            _state.pending = False
            handle.signalled = True
            first = _state.raised_at is None
            if first:  # the stop is asked for now: check() raises it later too, if this caller goes on
                _state.raised_at = time.monotonic()
            if raise_at_end and not _state.finished and first:
                raise KeyboardInterrupt


@contextmanager
def stop_signals_to_main_thread():
    """SIGINT/SIGTERM raise ``KeyboardInterrupt`` in the main thread, promptly, for the duration.

    Under the ``cxr-deploy`` command the process-wide routing (:func:`install`) is already in place
    and this does nothing; a program that runs a command in-process (a test's ``CliRunner``) gets
    the routing for the duration and its own handlers back after."""
    if _state.installed or not _usable():
        yield
        return
    _state.raised_at, _state.pending = None, False  # a new command: nothing raised yet
    read_fd, write_fd, thread = _start_relay()
    old_handlers = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    old_handlers[RELAY_SIGNAL] = signal.signal(RELAY_SIGNAL, _nothing)
    old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(write_fd)
        thread.join(1)
        os.close(read_fd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
