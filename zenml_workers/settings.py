"""One settings object, read from ``ZW_*`` environment variables and an optional stack file.

Built once at the edge (``submit()``, the CLI, worker start-up) and passed down.
A *stack* says which broker, artifact store and metadata store to use; teams
share one as a TOML file (``ZW_STACK_FILE``) or as a stack record in the metadata
store (``zw stack register/share/set``, see :mod:`zenml_workers.sdk.stacks`) so
everyone sees the same runs, artifacts and cache.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from scheduler.backoff import Backoff
from scheduler.lease import LeasePolicy
from stores.metadata.store import redact_url
from zenml_workers.errors import ConfigurationError


class SecretUrl(SecretStr):
    """A URL that may carry a password (``user:pass@``, ``?password=``): shown redacted
    everywhere (``str``, ``repr``, dumps); only ``get_secret_value()`` gives the URL itself,
    for the client library that connects with it."""

    def _display(self) -> str:  # type: ignore[override]
        return redact_url(self.get_secret_value())


def _reveal(value: SecretStr | str | None) -> str | None:
    # A plain str gets here only through model_copy(update=...), which skips validation.
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _as_secret(field: str, value: Any) -> Any:
    """A secret field's value as its secret type, even when model_copy left a plain str."""
    if not isinstance(value, str):
        return value
    if field in ("metadata_url", "broker_url"):
        return SecretUrl(value)
    if field in ("s3_secret_access_key", "secret_key", "previous_secret_keys"):
        return SecretStr(value)
    return value


def login_name() -> str:
    """The login name of this process's user (``USER``/``LOGNAME``, else the password
    database), or ``uid<N>`` in a container whose user has no entry."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid{os.getuid()}"


class Settings(BaseSettings):
    """Where runs execute and where their metadata and artifacts go.

    With no ``broker_url`` the *embedded default* runs steps in local worker
    processes against SQLite and a local folder under ``home``.
    """

    model_config = SettingsConfigDict(env_prefix="ZW_", extra="forbid", frozen=True)

    home: Path = Field(default_factory=lambda: Path("~/.zenml-workers").expanduser())
    stack_name: str = "default"
    metadata_url: SecretUrl | None = None
    artifact_uri: str | None = None
    broker_url: SecretUrl | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
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
    #: A step asked to stop (cancelled, past its ``timeout_s``, handed back at shutdown) that
    #: still runs this long after is killed; a killed step on a solo worker frees its GPU.
    stop_grace_s: float = Field(default=5.0, ge=0.0)
    #: On SIGTERM a worker lets its running steps finish for this long, then hands the rest
    #: back to the broker for another worker without costing them an attempt (a second
    #: signal does it at once). Keep it below your platform's kill timeout.
    shutdown_grace_s: float = Field(default=20.0, ge=0.0)
    #: How often a solo worker's step host and the embedded pool read a running step's row to
    #: see whether it was cancelled (only while a step runs).
    stop_check_interval_s: float = Field(default=0.5, gt=0.0)
    #: Run a solo (GPU) worker's steps in a spawned child process kept warm between steps,
    #: which the worker can stop; false runs them in the worker process, which cannot.
    step_host: bool = True

    # -- secrets -------------------------------------------------------------------------
    #: The team's key for signing step messages (HMAC-SHA256); workers run only signed ones.
    secret_key: SecretStr | None = None
    #: A file holding the key instead (first line; e.g. a mounted secret).
    secret_key_file: Path | None = None
    #: Keys still accepted while a new ``secret_key`` rolls out (comma-separated); never signed with.
    previous_secret_keys: SecretStr | None = None
    #: Run a cluster without signed messages (local experiments only).
    insecure: bool = False
    #: Modules (besides ours) whose materializers workers may load by name for an input.
    materializer_modules: Annotated[tuple[str, ...], NoDecode] = ()
    #: A queued step not claimed for this long is sent again (duplicates are dropped at claim time).
    requeue_queued_after_s: float = 600.0
    #: A step queued for longer is looked for on the broker and resent if its message is gone.
    broker_check_after_s: float = 30.0
    #: Broker visibility timeout; longer than the longest step.
    visibility_timeout_s: float = 6 * 3600.0
    #: Cache on by default for every pipeline.
    enable_cache: bool = True
    #: Who submits, registers stacks and is charged for usage (default: the login name).
    user: str = Field(default_factory=lambda: login_name())

    # -- stack components ------------------------------------------------------------------
    #: MLflow tracking server of the stack's experiment tracker (unset: no tracker).
    mlflow_tracking_uri: str | None = None
    #: MLflow experiment the runs go to (unset: the pipeline's name).
    mlflow_experiment_name: str | None = None

    # -- TLS -------------------------------------------------------------------------------
    # Paths of PEM files, never their contents. A rediss:// broker is always verified.
    #: CA certificate(s) a ``rediss://`` broker's certificate must chain to (unset: the system's).
    broker_ca_file: Path | None = None
    #: Client certificate for a broker that asks for one (``tls-auth-clients``).
    broker_cert_file: Path | None = None
    #: Private key of ``broker_cert_file`` (unset: the key is in that file too).
    broker_key_file: Path | None = None
    #: libpq ``sslmode`` for PostgreSQL; unset: ``verify-full`` once a CA file is given.
    metadata_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = None
    #: CA certificate(s) PostgreSQL's certificate must chain to (libpq ``sslrootcert``).
    metadata_ca_file: Path | None = None
    #: Client certificate for PostgreSQL (``clientcert=`` in pg_hba.conf); with its key.
    metadata_cert_file: Path | None = None
    metadata_key_file: Path | None = None
    #: CA bundle an ``https://`` S3 endpoint's certificate must chain to (unset: botocore's).
    s3_ca_bundle: Path | None = None

    @field_validator("queues", "materializer_modules", mode="before")
    @classmethod
    def _split_commas(cls, v: Any) -> Any:
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

    @field_serializer("metadata_url", "broker_url", "s3_secret_access_key")
    def _dump_secret(self, secret: SecretStr | str | None, info: Any) -> str | None:
        # A dump (logs, JSON, run records) shows URLs redacted and keys masked.
        return None if secret is None else str(_as_secret(info.field_name, secret))

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, _as_secret(str(name), value) if isinstance(value, str) else value

    def identity(self) -> str:
        """A digest of every setting, secrets included (for caching per-settings objects)."""
        import hashlib

        plain = self.model_dump(mode="json")
        for name in (
            "metadata_url",
            "broker_url",
            "s3_secret_access_key",
            "secret_key",
            "previous_secret_keys",
        ):
            plain[name] = _reveal(getattr(self, name))
        return hashlib.sha256(repr(sorted(plain.items())).encode()).hexdigest()

    def signing_keys(self) -> tuple[bytes | None, list[bytes]]:
        """The key to sign with (None when none is configured) and every key accepted.

        Raises:
            ConfigurationError: ``secret_key_file`` cannot be read or is empty.
        """
        current: bytes | None = None
        if self.secret_key is not None and self.secret_key.get_secret_value():
            current = self.secret_key.get_secret_value().encode()
        elif self.secret_key_file is not None:
            try:
                text = self.secret_key_file.read_text().strip().splitlines()
            except OSError as e:
                raise ConfigurationError(
                    f"cannot read ZW_SECRET_KEY_FILE {self.secret_key_file} ({e}); fix the path "
                    "or its permissions"
                ) from e
            if not text or not text[0].strip():
                raise ConfigurationError(
                    f"ZW_SECRET_KEY_FILE {self.secret_key_file} is empty; put the team's key on "
                    "its first line"
                )
            current = text[0].strip().encode()
        previous = []
        if self.previous_secret_keys is not None:
            previous = [
                k.strip().encode()
                for k in self.previous_secret_keys.get_secret_value().split(",")
                if k.strip()
            ]
        accepted = ([current] if current else []) + previous
        return current, accepted

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
        return not self.reveal_broker_url()

    def reveal_broker_url(self) -> str:
        """The broker URL with its password, for the client that connects ("" when embedded).

        Never log or raise it: ``str(settings.broker_url)`` is the redacted form.
        """
        return _reveal(self.broker_url) or ""

    def resolved_metadata_url(self) -> str:
        """The metadata store's URL with its password, for the engine that connects (the
        SQLite file under ``home`` unless one is set). Never log or raise it."""
        return _reveal(self.metadata_url) or f"sqlite:///{(self.home / 'metadata.db').resolve()}"

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or str((self.home / "artifacts").resolve())

    def local_worker_count(self) -> int:
        return self.local_workers or max(os.cpu_count() or 1, 1)

    def s3_options(self) -> dict[str, str | None]:
        return {
            "endpoint_url": self.s3_endpoint_url,
            "access_key_id": self.s3_access_key_id,
            "secret_access_key": (
                self.s3_secret_access_key.get_secret_value() if self.s3_secret_access_key else None
            ),
            "region": self.s3_region,
            "ca_bundle": str(self.s3_ca_bundle) if self.s3_ca_bundle else None,
        }

    def describe(self) -> dict[str, Any]:
        """The stack as recorded on each run (credentials left out), with its optional
        components (``experiment_tracker``...), which workers build from this record.

        Raises:
            ConfigurationError: an optional component's setting is invalid.
        """
        from zenml_workers.components.registry import component_records

        return {
            "stack": self.stack_name,
            "orchestrator": "local" if self.is_embedded else "celery",
            "metadata_url": redact_url(self.resolved_metadata_url()),
            "artifact_uri": self.resolved_artifact_uri(),
            "broker_url": None if self.is_embedded else str(self.broker_url),
            **component_records(self),
        }

    # -- TLS -------------------------------------------------------------------------------

    @field_validator(
        "broker_ca_file",
        "broker_cert_file",
        "broker_key_file",
        "metadata_ca_file",
        "metadata_cert_file",
        "metadata_key_file",
        "s3_ca_bundle",
        mode="before",
    )
    @classmethod
    def _tls_file(cls, v: Any, info: ValidationInfo) -> Any:
        """A TLS setting names an existing file: not its PEM text (which would end up in logs)."""
        if v is None or v == "":
            return None
        if not isinstance(v, str | os.PathLike):
            return v  # pydantic's own type error names it
        var = f"ZW_{str(info.field_name).upper()}"
        if isinstance(v, str) and "-----BEGIN" in v:
            raise ConfigurationError(
                f"{var} holds PEM text, not a path; write the certificate or key to a file "
                f"(readable by this user only, for a key) and set {var} to its path"
            )
        path = Path(v).expanduser()
        if not path.is_file():
            raise ConfigurationError(
                f"{var} names {path}, which is not a file; give the path of the PEM file "
                f"(absolute, or relative to the working directory) or unset {var}"
            )
        return path

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        # Each TLS file must reach the link it is meant for, or that link would silently
        # run without it.
        from urllib.parse import parse_qs, urlsplit

        broker = [
            f for f in ("broker_ca_file", "broker_cert_file", "broker_key_file") if getattr(self, f)
        ]
        if broker and not self.is_embedded:
            url = urlsplit(self.reveal_broker_url())
            if url.scheme != "rediss":
                raise ConfigurationError(
                    f"ZW_{broker[0].upper()} is set but ZW_BROKER_URL "
                    f"({self.broker_url}) is not a rediss:// URL, so the broker "
                    "link would not use TLS; use rediss://host:port/db"
                )
            in_url = sorted(k for k in parse_qs(url.query) if k.startswith("ssl_"))
            if in_url:
                raise ConfigurationError(
                    f"ZW_BROKER_URL sets {', '.join(in_url)} and ZW_{broker[0].upper()} is set "
                    "too; give the broker's TLS files either in the URL or in ZW_BROKER_*_FILE"
                )
        if self.broker_key_file and not self.broker_cert_file:
            raise ConfigurationError(
                "ZW_BROKER_KEY_FILE is set without ZW_BROKER_CERT_FILE; set the client "
                "certificate too, or unset the key"
            )
        metadata = {
            "metadata_sslmode": "sslmode",
            "metadata_ca_file": "sslrootcert",
            "metadata_cert_file": "sslcert",
            "metadata_key_file": "sslkey",
        }
        given = [f for f in metadata if getattr(self, f)]
        if given:
            url_text = self.resolved_metadata_url()
            if not url_text.startswith("postgresql"):
                raise ConfigurationError(
                    f"ZW_{given[0].upper()} applies to PostgreSQL only, but ZW_METADATA_URL is "
                    f"{redact_url(url_text)}; unset it or point ZW_METADATA_URL at PostgreSQL"
                )
            query = parse_qs(urlsplit(url_text).query)
            twice = [f for f in given if metadata[f] in query]
            if twice:
                raise ConfigurationError(
                    f"ZW_{twice[0].upper()} and {metadata[twice[0]]} in ZW_METADATA_URL are both "
                    "set; keep one of them"
                )
        if bool(self.metadata_cert_file) != bool(self.metadata_key_file):
            raise ConfigurationError(
                "ZW_METADATA_CERT_FILE and ZW_METADATA_KEY_FILE go together (libpq needs both); "
                "set both or neither"
            )
        if self.s3_ca_bundle and (self.s3_endpoint_url or "").startswith("http://"):
            raise ConfigurationError(
                f"ZW_S3_CA_BUNDLE is set but ZW_S3_ENDPOINT_URL ({self.s3_endpoint_url}) is "
                "plain http://, so S3 traffic would not use TLS; use https://"
            )
        return self

    def broker_ssl_options(self) -> dict[str, Any]:
        """redis-py's TLS keyword arguments for the broker, which are also Celery's ``broker_use_ssl``.

        Empty unless ``broker_url`` is ``rediss://``, and also when its query holds ``ssl_*``
        parameters (kombu and redis-py read those from the URL themselves). The certificate
        is always verified, against ``broker_ca_file`` or else the system's CAs, and so is
        the host name (redis-py's default).
        """
        import ssl
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(self.reveal_broker_url())
        if url.scheme != "rediss":
            return {}
        if any(k.startswith("ssl_") for k in parse_qs(url.query)):
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for field, key in (
            ("broker_ca_file", "ssl_ca_certs"),
            ("broker_cert_file", "ssl_certfile"),
            ("broker_key_file", "ssl_keyfile"),
        ):
            if getattr(self, field) is not None:
                options[key] = str(getattr(self, field))
        return options

    def metadata_connect_args(self) -> dict[str, str]:
        """libpq TLS parameters for a PostgreSQL metadata store (SQLAlchemy ``connect_args``).

        A CA file without ``metadata_sslmode`` means ``verify-full``: the certificate must
        chain to that CA and name the host. Parameters in ``metadata_url``'s query (libpq's
        ``sslmode``, ``sslrootcert`` ...) reach libpq as they are.
        """
        if not self.resolved_metadata_url().startswith("postgresql"):
            return {}
        args: dict[str, str] = {}
        sslmode = self.metadata_sslmode or ("verify-full" if self.metadata_ca_file else None)
        if sslmode:
            args["sslmode"] = sslmode
        for field, key in (
            ("metadata_ca_file", "sslrootcert"),
            ("metadata_cert_file", "sslcert"),
            ("metadata_key_file", "sslkey"),
        ):
            if getattr(self, field) is not None:
                args[key] = str(getattr(self, field))
        return args


def load_settings(
    stack_file: str | os.PathLike[str] | None = None,
    *,
    apply_active_stack: bool = True,
    **overrides: Any,
) -> Settings:
    """Build the settings: ``overrides`` > ``ZW_*`` environment > stack file > active stack
    record > defaults.

    The active stack record is the one ``zw stack set`` named in ``$ZW_HOME/active-stack``;
    only then is the metadata store read (once per process). ``apply_active_stack=False``
    leaves it out (the ``zw stack`` commands, which must work while it is broken).

    Raises:
        ConfigurationError: the stack file is missing, is not valid TOML, or has
            unknown or mistyped keys; or an environment variable has a bad value; or the
            active stack record is not visible, or a secret it refers to is not set here.
    """
    path = stack_file or os.environ.get("ZW_STACK_FILE")
    file_values: dict[str, Any] = {}
    if path:
        file_values = read_stack_file(Path(path))
    env_keys = {k[3:].lower() for k in os.environ if k.startswith("ZW_")} - {"stack_file"}
    merged = {k: v for k, v in file_values.items() if k not in env_keys}
    merged.update(overrides)
    settings = _build_settings(merged, path=path, file_values=file_values)
    if not apply_active_stack:
        return settings
    from zenml_workers.sdk.stacks import active_stack_name, active_stack_values

    active = active_stack_name(settings.home)
    if active is None:
        return settings
    record_values = active_stack_values(settings, active, skip=env_keys | set(merged))
    return _build_settings(
        {**record_values, **merged},
        path=path,
        file_values=file_values,
        record=(active, set(record_values)),
    )


def _build_settings(
    values: dict[str, Any],
    *,
    path: str | os.PathLike[str] | None,
    file_values: dict[str, Any],
    record: tuple[str, set[str]] | None = None,
) -> Settings:
    try:
        return Settings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        if path and where in file_values:
            source = f"stack file {path}"
        elif record and where in record[1]:
            source = f"stack record {record[0]!r} (`zw stack describe {record[0]}`)"
        else:
            source = f"ZW_{where.upper()} or its argument"
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
