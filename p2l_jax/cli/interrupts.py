"""Ctrl-C for a command-line process: exit 130 with one line, at any moment.

Python's default SIGINT handling raises ``KeyboardInterrupt`` in whatever Python code the main
thread runs next. In this program that is unreliable in two ways, both seen in practice:

- during start-up and compilation the main thread runs JAX's garbage-collector callbacks;
  an interrupt raised inside one is printed as "Exception ignored ... Traceback" and lost,
  and the run carries on;
- when the interrupt does reach ``main``, the interpreter then tears down while XLA's
  compiler threads are still working, which can end in a segmentation fault (exit -11).

So a command-line run replaces that handling: the Python handler only records the signal,
``signal.set_wakeup_fd`` makes the C-level handler write a byte to a pipe at once, and a
daemon thread blocked on that pipe prints the one line, runs the registered cleanups (e.g.
``convert``'s temporary folder) and ends the process with ``os._exit(130)`` -- no exception
in the main thread, no interpreter teardown. This is safe because every output file is
written atomically (temp file + rename), in-flight checkpoints are committed atomically by
orbax, the output folder's lock is released by the kernel, and a rerun removes stale temp
files: an interrupted run is exactly a killed run, which the rerun path already handles.

In-process callers of :func:`p2l_jax.cli.main` (tests, notebooks) keep Python's default.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

_cleanups: list[Callable[[], None]] = []


def on_interrupt(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Register ``cleanup`` to run before an interrupted process exits; returns a function
    that unregisters it (call it once the thing to clean up is gone or kept)."""
    _cleanups.append(cleanup)
    return lambda: _cleanups.remove(cleanup) if cleanup in _cleanups else None


def _exit_interrupted(command: str) -> None:
    prefix = f"p2l-jax {command}" if command else "p2l-jax"
    os.write(2, f"\n{prefix}: interrupted; rerun the same command to resume\n".encode())
    for cleanup in list(_cleanups):
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    os._exit(130)


def install(command: str) -> None:
    """Make SIGINT end this process with exit status 130 and one line on stderr.

    Call from the main thread of a process that runs one command and then exits.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # recorded via the wakeup fd
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if bytes([signal.SIGINT]) in data:
                _exit_interrupted(command)

    threading.Thread(target=watch, name="p2l-jax-interrupt", daemon=True).start()
