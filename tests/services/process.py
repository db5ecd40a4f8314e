"""Start, wait for and stop the real service processes used by integration tests and benches.

Every service runs on a loopback port picked by :func:`free_port`, in its own process group,
with its output in a log file whose tail goes into every error message. Nothing here runs at
import time, and nothing here needs pytest: the starters in the sibling modules are plain
functions (``bench/`` uses them too), and only their fixtures touch pytest, lazily.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol, TypeVar

SETUP_HINT = "run `make test` or `scripts/setup.sh` to install it"
REPO_ROOT = Path(__file__).resolve().parents[2]

_F = TypeVar("_F", bound=Callable[..., Any])


class Stoppable(Protocol):
    """A started service: ``stop()`` ends it."""

    def stop(self) -> object: ...


_S = TypeVar("_S", bound=Stoppable)


class ServiceError(RuntimeError):
    """A service could not be started (its start-up command failed)."""


class ServiceUnavailableError(ServiceError):
    """A service is not installed here (missing binary or system user)."""


def in_ci() -> bool:
    """Return True when running under CI (``CI`` is ``true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def service_unavailable(message: str) -> NoReturn:
    """Fail the current test in CI, skip it elsewhere (pytest only).

    Raises:
        pytest.fail.Exception: when :func:`in_ci` is true.
        pytest.skip.Exception: otherwise.
    """
    import pytest

    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def fixture(*, scope: str = "function") -> Callable[[_F], _F]:
    """``pytest.fixture(scope=scope)`` when pytest is importable, else the function unchanged.

    Lets the service modules define their fixtures next to the plain starters while staying
    importable without pytest (by ``bench/``).
    """

    def decorate(fn: _F) -> _F:
        try:
            import pytest
        except ImportError:
            return fn
        wrapped: _F = pytest.fixture(scope=scope)(fn)  # type: ignore[call-overload]
        return wrapped

    return decorate


def serve(start: Callable[[], _S]) -> Iterator[_S]:
    """Body of a service fixture: ``yield from serve(lambda: start_x(...))``.

    Starts the service, yields it and stops it at teardown. When it is not installed
    (:class:`ServiceUnavailableError`) the test fails in CI and is skipped elsewhere.
    """
    try:
        service = start()
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        yield service
    finally:
        service.stop()


def find_binary(name: str, extra_dirs: Iterable[str | Path] = ()) -> str | None:
    """Return the absolute path of executable ``name``, or None when it is not installed.

    Searches ``PATH``, then the directory of the running interpreter (the virtualenv's
    ``bin``), then ``extra_dirs`` (globs are not expanded here).
    """
    search = [os.environ.get("PATH", ""), str(Path(sys.executable).parent)]
    search.extend(str(d) for d in extra_dirs)
    return shutil.which(name, path=os.pathsep.join(search))


def require_binary(name: str, extra_dirs: Iterable[str | Path] = ()) -> str:
    """:func:`find_binary`, but fail (CI) or skip the current test when it is missing.

    Raises:
        pytest.fail.Exception: in CI when the binary is missing.
        pytest.skip.Exception: outside CI when the binary is missing.
    """
    found = find_binary(name, extra_dirs)
    if found is None:
        service_unavailable(f"`{name}` was not found on PATH; {SETUP_HINT}.")
    return found


def settings_from_env(
    env: Mapping[str, str], *, exclude: Sequence[str] = (), **overrides: Any
) -> Any:
    """The client's settings from a cluster's ``ZW_*`` environment (less ``exclude``), with
    ``overrides`` on top, as a teammate's shell would give them."""
    from zenml_workers.settings import load_settings

    values: dict[str, Any] = {
        k[3:].lower(): v for k, v in env.items() if k.startswith("ZW_") and k not in exclude
    }
    values.update(overrides)
    return load_settings(**values)


def service_env(
    env: Mapping[str, str] | None = None, *, drop_prefixes: Sequence[str] = ()
) -> dict[str, str]:
    """Return ``os.environ`` plus ``env``, with the repository root on ``PYTHONPATH``.

    The root is needed so that ``-A tests.services.noop_app`` and the project import in the
    child no matter where the parent was started. Variables of ``os.environ`` whose name
    starts with one of ``drop_prefixes`` (e.g. ``"ZW_"``) are left out before ``env`` is
    merged, so a child runs exactly the configuration the caller chose.
    """
    merged = {
        k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in drop_prefixes)
    }
    merged.update(env or {})
    paths = [str(REPO_ROOT), *filter(None, merged.get("PYTHONPATH", "").split(os.pathsep))]
    merged["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All are held open together, so the kernel hands out distinct ones.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def wait_until(
    predicate: Callable[[], object],
    timeout_s: float,
    what: str,
    *,
    log_tail: Callable[[], str] | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``predicate`` until it returns a truthy value.

    Exceptions raised by ``predicate`` count as "not yet" (a refused connection, say); the
    last one is quoted in the error. Polling starts at 10 ms and backs off to 200 ms.

    Args:
        predicate: condition to poll.
        timeout_s: how long to wait, in seconds.
        what: what is being waited for, for the error message ("redis-server to answer PING").
        log_tail: returns the tail of the service's log, appended to the error.
        alive: returns False once the service process has exited, which ends the wait early.

    Raises:
        TimeoutError: when the condition does not hold within ``timeout_s`` or the process died.
    """
    deadline = time.monotonic() + timeout_s
    delay_s = 0.01
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return
            last_error = None
        except Exception as exc:  # the service is not up yet; keep the reason for the report
            last_error = exc
        if alive is not None and not alive():
            reason = "the process exited"
            break
        if time.monotonic() >= deadline:
            reason = f"gave up after {timeout_s:g} s"
            break
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.2)
    message = f"Timed out waiting for {what} ({reason})"
    if last_error is not None:
        message += f"; last error: {type(last_error).__name__}: {last_error}"
    if log_tail is not None:
        message += f"\n--- log tail ---\n{log_tail()}"
    raise TimeoutError(message)


class ControlledService:
    """What a started service object (its ``process`` set when it started one) can do to that
    process besides starting it: tell whether it runs, crash it, freeze and thaw it."""

    process: ServiceProcess | None

    def is_running(self) -> bool:
        """Return True while the process this object started is running."""
        return self.process is not None and self.process.is_running()

    def kill(self) -> None:
        """SIGKILL the process tree at once, like a crashed machine; ``start()`` brings it back.

        Raises:
            RuntimeError: when this object did not start the process.
        """
        self._require_process().kill()

    def pause(self) -> None:
        """SIGSTOP the process tree: connections stay open but nothing is answered."""
        self._require_process().pause()

    def resume(self) -> None:
        """SIGCONT the process tree after :meth:`pause`."""
        self._require_process().resume()

    def _require_process(self) -> ServiceProcess:
        if self.process is None:
            raise RuntimeError(
                f"This {type(self).__name__} did not start its process; it cannot control it."
            )
        return self.process


class ServiceProcess:
    """A service started in its own process group, with its output in ``log_path``.

    Stopping sends ``stop_signal`` to the main PID, waits up to ``timeout_s``, then SIGKILLs
    the whole group so that no child (a Celery pool process, a PostgreSQL backend) outlives it.
    Once it has exited it can be started again with the same argv (for restart tests); the
    log file is appended to.

    ``argv`` may run the service through a wrapper that ``exec``s it, such as
    :meth:`tests.services.netns.NetworkHost.argv_in`: the wrapper keeps the process group,
    so ``pid`` is the service's own PID and stopping reaches everything it started.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self._popen: subprocess.Popen[bytes] | None = None
        self._paused = False

    def start(self) -> ServiceProcess:
        """Start the process (again, once a previous start has exited); returns ``self``.

        Raises:
            RuntimeError: when it is still running.
            OSError: when the executable cannot be run.
        """
        if self.is_running():
            raise RuntimeError(f"{self.name} is still running (pid {self.pid}); stop it first.")
        self._paused = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user,
                group=pwd.getpwnam(self.user).pw_gid if self.user is not None else None,
                # Drop root's supplementary groups along with its uid.
                extra_groups=[] if self.user is not None else None,
            )
        return self

    @property
    def pid(self) -> int:
        """PID of the main process (also its process-group id).

        Raises:
            RuntimeError: when the process was never started.
        """
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the main process has exited, else None."""
        return self._require().poll()

    def is_running(self) -> bool:
        """Return True while the main process has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def log_text(self) -> str:
        """Return the whole log (decoded leniently); empty when nothing was written yet."""
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_until(self, predicate: Callable[[], object], timeout_s: float, what: str) -> None:
        """:func:`wait_until` with this process's log tail, ending early if it exits.

        Raises:
            TimeoutError: when the condition does not hold in time or the process exited.
        """
        wait_until(
            predicate,
            timeout_s,
            f"{what} [{self.name}, pid {self.pid}]",
            log_tail=self.log_tail,
            alive=self.is_running,
        )

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        """Wait until ``text`` appears in the log.

        Raises:
            TimeoutError: when it does not appear within ``timeout_s`` seconds.
        """
        self.wait_until(lambda: text in self.log_text(), timeout_s, f"{text!r} in the log")

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the main process only (for crash tests: SIGKILL a worker)."""
        popen = self._require()
        if popen.poll() is None:
            popen.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop gracefully, then kill the whole process group; returns the exit status.

        Safe to call more than once and on a process that already exited.
        """
        if self._popen is None:
            return None
        popen = self._popen
        if popen.poll() is None:
            if self._paused:
                self.resume()  # a stopped process would not act on the stop signal
            try:
                popen.send_signal(self.stop_signal)
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return self.kill()
        # Leftover children (pool processes, backends); an empty group raises, which is fine.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        return popen.wait()

    def kill(self, timeout_s: float = 10.0) -> int | None:
        """SIGKILL the process, its group and all its descendants at once, like a crashed VM.

        The tree is frozen (SIGSTOP) before it is listed, so nothing forks past the kill, and
        descendants that left the group (PostgreSQL backends call ``setsid``) die too. Returns
        once all of them are gone, so a restart finds its ports and files free.
        Returns the exit status; None when it was never started.

        Raises:
            TimeoutError: when a descendant is still alive after ``timeout_s`` seconds.
        """
        if self._popen is None:
            return None
        popen = self._popen
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGSTOP)
            tree = [popen.pid, *descendants(popen.pid)]
            _signal_all(tree, signal.SIGSTOP)
            tree = list(dict.fromkeys([*tree, *descendants(popen.pid)]))
            _signal_all(tree, signal.SIGKILL)
            status = popen.wait()
            wait_until(
                lambda: not [pid for pid in tree if _is_alive(pid)],
                timeout_s,
                f"the processes of {self.name} to die",
            )
        else:
            status = popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        return status

    def pause(self) -> None:
        """SIGSTOP the process and all its descendants: it hangs but keeps its sockets open.

        Clients see a server that accepts connections (the kernel completes the handshake)
        but never answers.
        """
        self._signal_tree(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT what :meth:`pause` stopped."""
        self._signal_tree(signal.SIGCONT)
        self._paused = False

    def _signal_tree(self, sig: signal.Signals) -> None:
        popen = self._require()
        if popen.poll() is not None:
            return
        _signal_all([popen.pid, *descendants(popen.pid)], sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was not started; call start() first.")
        return self._popen

    def __enter__(self) -> ServiceProcess:
        return self if self._popen is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid {self._popen.pid}"
        return f"ServiceProcess({self.name!r}, {state})"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return (state, parent PID) of ``pid`` from /proc, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _is_alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in {"Z", "X"}


def descendants(pid: int) -> list[int]:
    """Return the PIDs of all living descendants of ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[0] not in {"Z", "X"}:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


#: The signing key test and bench clusters share (``ZW_SECRET_KEY``); not a secret.
TEST_SECRET_KEY = "zenml-workers-test-signing-key-not-a-secret"
