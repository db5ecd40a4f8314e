"""A worker process's state: its stores, its identity, its step-code cache and its leases.

Built once per process (after a fork, never inherited) by the embedded pool's
children and by each Celery pool process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from scheduler.backoff import Backoff
from scheduler.lease import LeasePolicy
from stores.artifacts import ArtifactStore, artifact_store_from_uri
from stores.metadata import attempts
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings

log = logging.getLogger("zenml_workers.worker")


@dataclass
class WorkerContext:
    """What a worker process needs: the stores, its identity and a cache of step code."""

    settings: Settings
    metadata: MetadataStore
    artifacts: ArtifactStore
    host: str = field(default_factory=socket.gethostname)
    code: OrderedDict[str, Callable[..., Any]] = field(default_factory=OrderedDict)
    _leases: LeaseKeeper | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        metadata = MetadataStore(
            settings.resolved_metadata_url(), connect_args=settings.metadata_connect_args()
        )
        artifacts = artifact_store_from_uri(
            settings.resolved_artifact_uri(), **settings.s3_options()
        )
        return cls(settings=settings, metadata=metadata, artifacts=artifacts)

    def function(self, code_hash: str, pickled: bytes | None) -> Callable[..., Any]:
        """The step function for ``code_hash``, unpickled from ``pickled`` on first use."""
        fn = self.code.get(code_hash)
        if fn is None:
            import cloudpickle

            if pickled is None:
                raise LookupError(f"step code {code_hash} is neither cached nor given")
            # Unpickling runs code: only bytes that hash to what the run recorded.
            check_code_blob(code_hash, pickled)
            fn = cloudpickle.loads(pickled)
            self.code[code_hash] = fn
            if len(self.code) > 512:
                self.code.popitem(last=False)
        return fn

    @cached_property
    def lease_policy(self) -> LeasePolicy:
        """The lease policy of this process's settings (built once, not per step)."""
        return self.settings.lease_policy()

    @cached_property
    def backoff(self) -> Backoff:
        """The infrastructure retry policy of this process's settings (built once)."""
        return self.settings.infra_backoff()

    @property
    def leases(self) -> LeaseKeeper:
        if self._leases is None or self._leases.pid != os.getpid():
            self._leases = LeaseKeeper(self)
        return self._leases


def check_code_blob(code_hash: str, pickled: bytes) -> None:
    """Refuse step code whose bytes do not hash to its recorded ``code_hash``.

    Raises:
        CodeIntegrityError: the blob was altered in the metadata store (or in transit).
    """
    import hashlib

    from zenml_workers.errors import CodeIntegrityError

    actual = "sha256:" + hashlib.sha256(pickled).hexdigest()
    if actual != code_hash:
        raise CodeIntegrityError(
            f"step code {code_hash} in the metadata store hashes to {actual}: it was altered "
            "after the run recorded it, so it is not run; find who can write to the metadata "
            "store, then resubmit the pipeline"
        )


def child_pids(pid: int) -> set[int]:
    """Pids of the live (not zombie) children of ``pid``, from ``/proc``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != b"Z":
            out.add(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (a SIGKILLed pool
    child stays a zombie until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ')'.
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class LeaseKeeper:
    """Renews the SQL lease of running steps from one background thread per process.

    Renewal is off the critical path: a step shorter than the heartbeat
    interval never causes a lease write.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.pid = os.getpid()
        self._running: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._tick = threading.Event()  # never set: waiting on it is the interval
        self._thread: threading.Thread | None = None

    def hold(self, step_run_id: str, attempt: int, lease_s: float) -> None:
        with self._lock:
            self._running[step_run_id] = (attempt, lease_s)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="zw-lease", daemon=True)
            self._thread.start()

    def release(self, step_run_id: str) -> None:
        with self._lock:
            self._running.pop(step_run_id, None)

    def holds(self, step_run_id: str) -> bool:
        """Whether this process is running an attempt of ``step_run_id`` right now."""
        with self._lock:
            return step_run_id in self._running

    def _loop(self) -> None:
        interval = self.ctx.settings.heartbeat_interval_s
        while not self._tick.wait(interval):
            with self._lock:
                held = dict(self._running)
            if not held:
                continue
            now = time.time()
            try:
                with self.ctx.metadata.transaction() as s:
                    for step_run_id, (attempt, lease_s) in held.items():
                        attempts.extend_lease(s, step_run_id, attempt, now + lease_s)
            except Exception:  # a missed renewal is retried next tick; recovery handles real loss
                log.warning("could not renew step leases", exc_info=True)
