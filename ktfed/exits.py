"""Exit codes of the `ktfed` command, the one place that turns errors into them, and stopping on
Ctrl-C / SIGTERM.

    0    done (also: stopped by SIGTERM)
    1    failed at run time
    2    invalid input: config, flag, environment variable, missing or unreadable file, port in use
    3    the coordinator refused this participant's identity
    4    a state folder already in use by another process, or a certificate that does not fit its name
    130  interrupted (Ctrl-C)
    141  the output was closed early (piped into `head`); nothing more is printed

Errors raised deep in the services are caught here by their type, so each command states only
what is particular to it. Standard library only at import: the CLI loads this on every call.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from typing import Callable

OK, FAILED, INVALID, REFUSED, IN_USE = 0, 1, 2, 3, 4
INTERRUPTED, OUTPUT_CLOSED = 130, 141


class CLIError(Exception):
    """An error the person at the terminal can act on: one line, and the exit code it ends with."""

    def __init__(self, message: str, code: int = INVALID):
        super().__init__(message)
        self.code = code


class Stopped(BaseException):
    """Ctrl-C or SIGTERM arrived while the service could be interrupted. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way up mistakes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def stop_code(signum: int) -> int:
    """SIGTERM is how orchestrators ask for a clean stop: success. Ctrl-C is the shell's 130."""
    return OK if signum == signal.SIGTERM else INTERRUPTED


def describe(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for the errors a person can act on; None for a bug."""
    if isinstance(err, CLIError):
        return str(err), err.code
    name = type(err).__name__
    text = str(err)
    if name.endswith("AuditError") and "already open" in text:
        folder = text.split(":", 1)[0]
        return (f"{folder} is in use by another process: a second coordinator or agent on the same --state "
                "folder? Give each process its own folder", IN_USE)
    if isinstance(err, RuntimeError) and text.startswith("Failed to bind to address"):
        address = text.removeprefix("Failed to bind to address").split(";", 1)[0].strip()
        return f"cannot listen on {address}: the port is in use, or the address is not this machine's", INVALID
    if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        return f"cannot listen: {err.strerror} (is another ktfed process using the port?)", INVALID
    if isinstance(err, FileNotFoundError):
        return (f"{err.filename}: no such file or folder" if err.filename else text), INVALID
    if isinstance(err, PermissionError):
        return f"{err.filename or text}: permission denied", INVALID
    return None


def _close_stdout() -> None:
    # The reader is gone: point stdout at /dev/null so the interpreter's final flush is silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def guarded(command: Callable[[object], int], args) -> int:
    """Run one CLI command; errors a person can act on become one line on stderr and an exit code."""
    try:
        code = command(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return code
    except BrokenPipeError:
        _close_stdout()
        return OUTPUT_CLOSED
    except Stopped as stop:
        print(f"stopped by {stop}", file=sys.stderr)
        return stop_code(stop.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # noqa: BLE001 - mapped below; anything else is re-raised as a bug
        described = describe(err)
        if described is None:
            raise
        message, code = described
        print(f"error: {message}", file=sys.stderr)
        return code


class StopSignals:
    """Ctrl-C and SIGTERM ask a service to stop (`on_signal`). While `interruptible()` says so the
    main thread is also interrupted at once (Stopped); otherwise (a site mid-round) the stop waits
    until it is, so a round's ledger entry and factors are written whole. A second signal stops at
    once."""

    def __init__(self, on_signal: Callable[[], None], interruptible: Callable[[], bool] = lambda: True):
        self.on_signal = on_signal
        self.interruptible = interruptible
        self.signum: int | None = None
        self._count = 0
        self._done = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (an embedding program keeps its own)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._done = True
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum
        self._count += 1
        self.on_signal()
        if self._done:
            return
        if self._count > 1 or self.interruptible():
            raise Stopped(signum)
        threading.Thread(target=self._when_interruptible, name="stop-after-step", daemon=True).start()

    def _when_interruptible(self) -> None:
        while not self._done and not self.interruptible():
            time.sleep(0.05)
        if not self._done:
            self._count = 0  # the repeat is ours, not the person's second signal
            os.kill(os.getpid(), self.signum)
