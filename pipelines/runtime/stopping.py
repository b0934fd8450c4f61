"""Stopping a long-running command cleanly on SIGTERM or SIGINT in whatever step it is, and its
pid file (the demo: ``make demo-stop`` runs :func:`stop_demo`).

Ray replaces a process's signal handlers when it starts and exits from them with code 15, and
Python drops an exception raised where it cannot propagate (an at-fork hook, a ``__del__``), so a
plain handler is not enough: :class:`StopControl` keeps its handlers in place across
``ray.init``, raises the stop again until the command is shutting down, and exits on its own
should the shutdown hang.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 20.0  # from a stop signal to a forced exit, should the clean shutdown hang
STOP_WAIT_S = STOP_GRACE_S + 10.0  # how long `--stop` waits for the process to exit
NUDGE_S = 1.0  # how often a stop that was dropped is raised again
SERVING = "serving"  # the step a stop ends normally (exit 0)
SHUTDOWN = "shutting down"


class DemoStopped(BaseException):
    """SIGTERM or SIGINT, raised in the main thread in whatever step the demo is. A BaseException,
    like KeyboardInterrupt, so that the ``except Exception`` of the libraries it goes through
    (Ray, Serve, httpx, torch) pass it on instead of taking it for a failure to handle."""

    def __init__(self, signum: int, phase: str) -> None:
        self.signum = signum
        self.phase = phase
        super().__init__(f"{signal.Signals(signum).name} while {phase}")

    @property
    def exit_code(self) -> int:
        return 0 if self.phase == SERVING else 128 + self.signum


class StopControl:
    """Owns the demo's pid file and its SIGINT/SIGTERM handling, from start to exit.

    The first signal raises :class:`DemoStopped` in the main thread and starts a watchdog thread.
    Python drops an exception raised where it cannot propagate (an at-fork hook — ``ray.init``
    forks its processes —, a ``__del__``, a weakref callback: "Exception ignored in ..."), so
    until the demo is shutting down the watchdog raises the stop again every ``NUDGE_S``; and
    ``grace_s`` after the signal, should the shutdown hang, it exits. A second signal exits at
    once."""

    def __init__(self, pid_file: Path | None, grace_s: float = STOP_GRACE_S) -> None:
        self.pid_file = pid_file
        self.grace_s = grace_s
        self.phase = "starting"
        self.entered: list[str] = []
        self.stopped: DemoStopped | None = None
        self._finished = threading.Event()
        self._nudged = False
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def start(self) -> None:
        """Take the signals, then write the pid file (so `make demo-stop` only ever finds a demo
        that handles its SIGTERM). Refuses to run beside a live demo with the same output."""
        self.install()
        if self.pid_file is not None:
            claim_pid_file(self.pid_file)

    def install(self) -> None:
        """(Re)take SIGINT and SIGTERM: ``ray.init`` starts a native handler that prints a stack
        dump and hands the signal on, so this runs again as soon as Ray is up."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    @contextlib.contextmanager
    def kept(self):
        """Keep the demo's handlers while a library call tries to replace them: ``ray.init`` puts
        in one that raises SystemExit(15), which a SIGTERM during its forks lost in an at-fork
        hook — and the demo went on indexing, the SIGTERM ignored."""
        original = signal.signal

        def keep(signum, handler):
            if signum in STOP_SIGNALS and threading.current_thread() is threading.main_thread():
                logger.debug("kept the demo's handler of signal %s", signum)
                return signal.getsignal(signum)
            return original(signum, handler)

        signal.signal = keep
        try:
            yield
        finally:
            signal.signal = original
            self.install()

    def enter(self, phase: str) -> None:
        """Begin a step. A stop whose exception was dropped takes effect here at the latest."""
        if self.stopped is not None:
            raise self.stopped
        self.phase = phase
        self.entered.append(phase)
        self.install()

    def begin_shutdown(self) -> None:
        """The last step, however the demo ends: a signal now lets the shutdown finish (under the
        watchdog) rather than break it off."""
        self.phase = SHUTDOWN
        self.install()

    def _on_signal(self, signum: int, _frame) -> None:
        # No print here: the signal may have interrupted a print, and stdout is not reentrant.
        if self.stopped is None:
            self.stopped = DemoStopped(signum, self.phase)
            threading.Thread(target=self._watch, name="demo-stop-watchdog", daemon=True).start()
        elif self._nudged:  # the watchdog's: the stop was dropped somewhere, raise it again
            self._nudged = False
        else:  # a second signal: whoever sent it wants the demo gone now
            self.force_exit(f"second {signal.Signals(signum).name}")
        if self.phase != SHUTDOWN:
            raise self.stopped

    def _watch(self) -> None:
        assert self.stopped is not None
        deadline = time.monotonic() + self.grace_s
        while not self._finished.wait(min(NUDGE_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                name = signal.Signals(self.stopped.signum).name
                self.force_exit(f"still running {self.grace_s:.0f}s after {name}")
            if self.phase != SHUTDOWN:
                self._nudged = True
                _thread.interrupt_main(self.stopped.signum)

    def finish(self) -> None:
        """After the clean shutdown: no forced exit any more, no pid file, and the handlers the
        process had before (the demo may run inside another program, a test)."""
        self._finished.set()
        self.remove_pid_file()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def remove_pid_file(self) -> None:
        if self.pid_file is not None and read_pid(self.pid_file) == os.getpid():
            self.pid_file.unlink(missing_ok=True)

    def force_exit(self, why: str) -> NoReturn:
        """Exit now, without the clean shutdown. The Ray processes this demo started go with it:
        Ray starts its local head's processes to die with their parent."""
        code = self.stopped.exit_code if self.stopped is not None else 128 + signal.SIGTERM
        # os.write, not print: this may run in the watchdog thread while the main thread holds
        # stdout's lock, or in a signal handler that interrupted a print.
        os.write(2, f"\ndemo: {why}: exiting without a clean shutdown (exit {code})\n".encode())
        self.remove_pid_file()
        os._exit(code)


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def demo_alive(pid: int) -> bool:
    """Whether ``pid`` is a running demo. A pid file outlives a demo that was killed, and its pid
    may have gone to another process since: where /proc shows the command line, it must be a
    demo's (``python -m pipelines.demo`` or ``blip-search demo``). An exited child its parent has
    not reaped yet (a zombie) is not running."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's: not our demo
        return False
    proc = Path("/proc") / str(pid)
    if not proc.is_dir():  # no procfs (macOS): the pid is all there is to go on
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, IndexError):
        return False  # it exited meanwhile
    return state != "Z" and ("pipelines.demo" in args or "demo" in args)


def claim_pid_file(pid_file: Path) -> None:
    """Write this process's pid to ``pid_file``, unless a live demo's pid is there already: two
    demos with one output directory would also share their catalog, model and index."""
    other = read_pid(pid_file)
    if other is not None and other != os.getpid() and demo_alive(other):
        raise ValueError(
            f"a demo is already running (pid {other}, {pid_file}); "
            "`make demo-stop` stops it, or give this one another output.dir"
        )
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")


def stop_demo(pid_file: Path, wait_s: float = STOP_WAIT_S) -> int:
    """`make demo-stop`: SIGTERM to the demo whose pid is in ``pid_file``, then wait until it has
    shut down (it removes the file last) or exited. 0 when it stopped or none was running."""
    pid = read_pid(pid_file)
    if pid is None or not demo_alive(pid):
        if pid is not None:  # left by a demo that was killed: it would only mislead
            pid_file.unlink(missing_ok=True)
            print(f"no demo running (removed the stale {pid_file}, pid {pid})")
        else:
            print(f"no demo running ({pid_file} not found)")
        return 0
    os.kill(pid, signal.SIGTERM)
    print(f"sent SIGTERM to the demo (pid {pid}); waiting for it to shut down ...", flush=True)
    deadline = time.monotonic() + wait_s
    while read_pid(pid_file) == pid and demo_alive(pid):
        if time.monotonic() > deadline:
            print(
                f"error: the demo (pid {pid}) still runs {wait_s:.0f}s after SIGTERM; "
                f"`kill -KILL {pid}` ends it",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.1)
    print(f"the demo (pid {pid}) stopped")
    return 0
