"""One settings object, read from ``ZW_*`` environment variables and an optional stack file.

Built once at the edge (``submit()``, the CLI, worker start-up) and passed down.
A *stack* says which broker, artifact store and metadata store to use; teams
share one as a TOML file (``ZW_STACK_FILE``) so everyone sees the same runs,
artifacts and cache.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from scheduler.backoff import Backoff
from scheduler.lease import LeasePolicy
from stores.metadata.store import redact_url
from zenml_workers.errors import ConfigurationError


class Settings(BaseSettings):
    """Where runs execute and where their metadata and artifacts go.

    With no ``broker_url`` the *embedded default* runs steps in local worker
    processes against SQLite and a local folder under ``home``.
    """

    model_config = SettingsConfigDict(env_prefix="ZW_", extra="forbid", frozen=True)

    home: Path = Field(default_factory=lambda: Path("~/.zenml-workers").expanduser())
    stack_name: str = "default"
    metadata_url: str | None = None
    artifact_uri: str | None = None
    broker_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str | None = None
    #: Queues a step may name; a step naming another one is refused at submit time.
    queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["cpu", "gpu"])
    #: Worker processes of the embedded default (0: one per CPU core).
    local_workers: int = 0
    #: Most steps of one run on the broker at once, so big fan-outs do not starve small runs.
    max_queued_per_run: int = 64
    #: Lease of a running step without its own timeout; a heartbeat renews it.
    lease_s: float = 120.0
    #: How often workers renew their steps' leases and write their heartbeat row.
    heartbeat_interval_s: float = 2.0
    #: A worker whose heartbeat is older than this counts as gone: its steps are requeued.
    worker_ttl_s: float = 10.0
    #: How long a worker retries an unreachable metadata store, S3 or broker (with backoff)
    #: before it gives a step message back to the broker.
    infra_retry_budget_s: float = 600.0
    #: A step's retry waits this long after its first failure, doubling each time (up to 60 s,
    #: jittered); 0 retries at once.
    retry_delay_s: float = 1.0
    #: A queued step not claimed for this long is sent again (duplicates are dropped at claim time).
    requeue_queued_after_s: float = 600.0
    #: Broker visibility timeout; longer than the longest step.
    visibility_timeout_s: float = 6 * 3600.0
    #: Cache on by default for every pipeline.
    enable_cache: bool = True
    user: str = Field(default_factory=lambda: os.environ.get("USER", "") or "unknown")

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [q.strip() for q in v.split(",") if q.strip()]
        return v

    @model_validator(mode="after")
    def _check_timing(self) -> Settings:
        # A ConfigurationError (not a ValueError) passes through pydantic unchanged.
        for other, value in (("lease_s", self.lease_s), ("worker_ttl_s", self.worker_ttl_s)):
            if self.heartbeat_interval_s * 3 > value:
                raise ConfigurationError(
                    f"ZW_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g}s) must be at most a third "
                    f"of ZW_{other.upper()} ({value:g}s), or one missed heartbeat loses a live "
                    f"worker's steps; lower ZW_HEARTBEAT_INTERVAL_S or raise ZW_{other.upper()}"
                )
        return self

    def lease_policy(self) -> LeasePolicy:
        return LeasePolicy(
            lease_s=self.lease_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
            worker_ttl_s=self.worker_ttl_s,
        )

    def infra_backoff(self) -> Backoff:
        return Backoff(budget_s=self.infra_retry_budget_s)

    @property
    def is_embedded(self) -> bool:
        return not self.broker_url

    def resolved_metadata_url(self) -> str:
        return self.metadata_url or f"sqlite:///{(self.home / 'metadata.db').resolve()}"

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or str((self.home / "artifacts").resolve())

    def local_worker_count(self) -> int:
        return self.local_workers or max(os.cpu_count() or 1, 1)

    def s3_options(self) -> dict[str, str | None]:
        return {
            "endpoint_url": self.s3_endpoint_url,
            "access_key_id": self.s3_access_key_id,
            "secret_access_key": self.s3_secret_access_key,
            "region": self.s3_region,
        }

    def describe(self) -> dict[str, Any]:
        """The stack as recorded on each run (credentials left out)."""
        return {
            "stack": self.stack_name,
            "orchestrator": "local" if self.is_embedded else "celery",
            "metadata_url": redact_url(self.resolved_metadata_url()),
            "artifact_uri": self.resolved_artifact_uri(),
            "broker_url": redact_url(self.broker_url) if self.broker_url else None,
        }


def load_settings(stack_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings: ``overrides`` > ``ZW_*`` environment > stack file > defaults.

    Raises:
        ConfigurationError: the stack file is missing, is not valid TOML, or has
            unknown or mistyped keys; or an environment variable has a bad value.
    """
    path = stack_file or os.environ.get("ZW_STACK_FILE")
    file_values: dict[str, Any] = {}
    if path:
        file_values = read_stack_file(Path(path))
    env_keys = {k[3:].lower() for k in os.environ if k.startswith("ZW_")} - {"stack_file"}
    merged = {k: v for k, v in file_values.items() if k not in env_keys}
    merged.update(overrides)
    try:
        return Settings(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        source = (
            f"stack file {path}"
            if path and where in file_values
            else f"ZW_{where.upper()} or its argument"
        )
        raise ConfigurationError(
            f"invalid setting {where!r} ({err['msg']}); fix it in {source}"
        ) from e


def read_stack_file(path: Path) -> dict[str, Any]:
    """Read a stack file: TOML with the settings' names as keys (optionally under ``[stack]``).

    Raises:
        ConfigurationError: missing file, bad TOML or unknown keys.
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigurationError(
            f"stack file {path} does not exist; fix ZW_STACK_FILE or create it"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(
            f"stack file {path} is not valid TOML ({e}); fix the syntax on that line"
        ) from e
    data = data.get("stack", data)
    known = set(Settings.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigurationError(
            f"stack file {path} has unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}"
        )
    return data
