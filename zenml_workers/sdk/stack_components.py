"""The components of a stack record, and the rules a record must follow.

Components are JSON (``{"orchestrator": {"flavor": "celery", "broker_url": ...}, ...}``)
described by one table, :data:`KEYS`, which drives validation, the ``zw stack register``
flags, ``describe`` and the settings a record yields. Every secret is a :class:`SecretRef`
(``{"env": "VAR"}`` or ``{"file": "/path"}``): the record says where each user's own value
comes from and never holds the value itself; a literal secret is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenml_workers.errors import ConfigurationError, StackRecordError

_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ORCHESTRATOR_FLAVORS = ("embedded", "celery")
TRACKER_FLAVORS = ("mlflow",)
#: Components in the order they are described, with the words used in messages.
COMPONENTS = {
    "orchestrator": "orchestrator",
    "metadata_store": "metadata store",
    "artifact_store": "artifact store",
    "signing": "signing key",
    "experiment_tracker": "experiment tracker",
}


@dataclass(frozen=True)
class Key:
    """One setting of a component: its JSON key, the ``Settings`` field it fills, its kind
    (``flavor``, ``text``, ``url``, ``list`` or ``secret``) and the ``register`` option."""

    component: str
    key: str
    kind: str
    option: str
    setting: str | None = None
    label: str = ""

    @property
    def flag(self) -> str:
        suffix = "_env" if self.kind == "secret" else ""
        return "--" + (self.option + suffix).replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key("orchestrator", "flavor", "flavor", "orchestrator"),
    Key("orchestrator", "broker_url", "url", "broker_url", "broker_url", "broker URL"),
    Key("orchestrator", "broker_password", "secret", "broker_password", None, "broker password"),
    Key("orchestrator", "queues", "list", "queues", "queues"),
    Key("metadata_store", "url", "url", "metadata_url", "metadata_url", "metadata store URL"),
    Key("metadata_store", "password", "secret", "metadata_password", None, "database password"),
    Key("artifact_store", "uri", "url", "artifact_uri", "artifact_uri", "artifact URI"),
    Key("artifact_store", "s3_endpoint_url", "url", "s3_endpoint_url", "s3_endpoint_url"),
    Key("artifact_store", "s3_region", "text", "s3_region", "s3_region"),
    Key(
        "artifact_store",
        "s3_access_key_id",
        "secret",
        "s3_access_key_id",
        "s3_access_key_id",
        "S3 access key id",
    ),
    Key(
        "artifact_store",
        "s3_secret_access_key",
        "secret",
        "s3_secret_access_key",
        "s3_secret_access_key",
        "S3 secret access key",
    ),
    Key("signing", "secret_key", "secret", "secret_key", "secret_key", "signing key"),
    Key("experiment_tracker", "flavor", "flavor", "experiment_tracker"),
    Key(
        "experiment_tracker",
        "tracking_uri",
        "url",
        "mlflow_tracking_uri",
        "mlflow_tracking_uri",
        "MLflow tracking URI",
    ),
    Key(
        "experiment_tracker",
        "experiment_name",
        "text",
        "mlflow_experiment_name",
        "mlflow_experiment_name",
    ),
)
BY_COMPONENT: dict[str, dict[str, Key]] = {}
for _k in KEYS:
    BY_COMPONENT.setdefault(_k.component, {})[_k.key] = _k

#: Settings a record may not carry in its ``settings`` table: identity, home, secrets, the
#: switch that turns signing off for everyone, and what the components already set.
_NOT_IN_SETTINGS = {
    "home",
    "user",
    "stack_name",
    "insecure",
    "metadata_url",
    "broker_url",
    "secret_key",
    "secret_key_file",
    "previous_secret_keys",
    "s3_access_key_id",
    "s3_secret_access_key",
} | {k.setting for k in KEYS if k.setting}


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from, each user's own: an environment variable or a file."""

    env: str | None = None
    file: str | None = None

    def to_json(self) -> dict[str, str]:
        return {"env": self.env} if self.env else {"file": str(self.file)}

    def display(self) -> str:
        """``$VAR`` or ``file:/path`` (what ``describe`` shows instead of the secret)."""
        return f"${self.env}" if self.env else f"file:{self.file}"

    def resolve(self, *, stack: str, label: str) -> str:
        """This user's value of the secret.

        Raises:
            ConfigurationError: the variable is not set, or the file cannot be read or is empty.
        """
        import os

        if self.env:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigurationError(
                    f"stack {stack!r}: its {label} comes from environment variable {self.env}, "
                    f"which is not set; export {self.env} with your own value (or leave the "
                    "stack with `zw stack set default`)"
                )
            return value
        path = Path(str(self.file)).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ConfigurationError(
                f"stack {stack!r}: its {label} comes from file {path}, which cannot be read "
                f"({e.strerror or e}); create it with your own value, readable by you only"
            ) from e
        if not text:
            raise ConfigurationError(
                f"stack {stack!r}: its {label} comes from file {path}, which is empty; "
                "write your own value into it"
            )
        return text


def refuse(message: str) -> StackRecordError:
    return StackRecordError(f"{message}; nothing was written")


def whose(key: Key) -> str:
    """``artifact store's S3 secret access key``: the component and the secret, for messages."""
    return key.label if key.component == "signing" else f"{COMPONENTS[key.component]}'s {key.label}"


def parse_ref(value: Any, key: Key) -> SecretRef:
    """A secret setting as a reference; a literal secret (any plain value) is refused.

    Raises:
        StackRecordError: a literal value, or a reference that is not ``{"env": VAR}`` /
            ``{"file": PATH}``.
    """
    file_flag = f"--{key.option.replace('_', '-')}-file"
    if not isinstance(value, Mapping):
        raise refuse(
            f"the {whose(key)} is a literal value, which a stack record must never hold; name "
            f"the environment variable that holds it with {key.flag} VAR (in TOML: "
            f'{key.key} = {{ env = "VAR" }}) or a file with {file_flag} PATH'
        )
    if set(value) == {"env"} and isinstance(value["env"], str) and _VAR.match(value["env"]):
        return SecretRef(env=value["env"])
    if set(value) == {"file"} and isinstance(value["file"], str):
        path = value["file"]
        if path.startswith(("/", "~")):
            return SecretRef(file=path)
        raise refuse(
            f"the {whose(key)} file {path!r} is not an absolute path; give one starting with "
            "/ or ~ (each user's own file at that path)"
        )
    # Never echo the value: it may be the secret itself, given where its name belongs.
    raise refuse(
        f"{key.flag} takes the NAME of an environment variable (letters, digits and _, in "
        f'TOML {key.key} = {{ env = "VAR" }}), not its value, or use {file_flag} PATH'
    )


#: How to give each URL without its password.
_URL_FIX = {
    "broker_url": "give the URL without it and the variable holding the password with "
    "--broker-password-env VAR",
    "url": "give the URL without it and the variable holding the password with "
    "--metadata-password-env VAR",
    "tracking_uri": "give the URI without it (each user sets MLFLOW_TRACKING_PASSWORD)",
}


def _check_url(url: str, key: Key) -> None:
    from stores.metadata.store import redact_url

    if redact_url(url) != url:
        how = _URL_FIX.get(key.key, "give it without the password")
        raise refuse(
            f"the {key.label or key.key} {redact_url(url)} carries a password, which a stack "
            f"record must never hold; {how}"
        )


def check_components(components: Mapping[str, Any]) -> dict[str, Any]:
    """Validated, normalised components JSON.

    Raises:
        StackRecordError: an unknown component or key, a literal secret, a URL carrying a
            password, a missing broker URL for ``celery``, or a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for name, values in components.items():
        if name == "settings":
            out["settings"] = _check_settings(values)
            continue
        if name not in BY_COMPONENT:
            raise refuse(
                f"a stack has no component {name!r}; its components are "
                f"{', '.join(COMPONENTS)} (and a settings table)"
            )
        if not isinstance(values, Mapping):
            raise refuse(f"the {COMPONENTS[name]} must be a table of settings, not {values!r}")
        keys = BY_COMPONENT[name]
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise refuse(
                f"the {COMPONENTS[name]} has no setting {', '.join(unknown)}; "
                f"its settings are {', '.join(keys)}"
            )
        checked: dict[str, Any] = {}
        for k, value in values.items():
            key = keys[k]
            if value is None:
                continue
            if key.kind == "secret":
                checked[k] = parse_ref(value, key).to_json()
            elif key.kind == "list":
                items = value.split(",") if isinstance(value, str) else value
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise refuse(f"{key.flag} takes names separated by commas, not {value!r}")
                checked[k] = [i.strip() for i in items if i.strip()]
            elif not isinstance(value, str) or not value:
                raise refuse(f"{key.flag} takes a non-empty text value, not {value!r}")
            else:
                if key.kind == "url":
                    _check_url(value, key)
                checked[k] = value
        if checked:
            out[name] = checked
    _check_flavors(out)
    return out


def _check_flavors(out: dict[str, Any]) -> None:
    orch = out.get("orchestrator", {})
    flavor = orch.get("flavor", "celery" if orch.get("broker_url") else "embedded")
    out["orchestrator"] = orch = {"flavor": flavor, **orch}
    if flavor not in ORCHESTRATOR_FLAVORS:
        raise refuse(f"--orchestrator is one of {', '.join(ORCHESTRATOR_FLAVORS)}, not {flavor!r}")
    if flavor == "celery" and not orch.get("broker_url"):
        raise refuse("a celery orchestrator needs the broker's URL; give --broker-url redis://...")
    if flavor == "embedded" and ("broker_url" in orch or "broker_password" in orch):
        raise refuse("an embedded orchestrator has no broker; drop --broker-url or use celery")
    meta = out.get("metadata_store", {})
    if "password" in meta and "url" not in meta:
        raise refuse("--metadata-password-env needs --metadata-url too")
    art = out.get("artifact_store", {})
    s3_keys = sorted(k for k in art if k.startswith("s3_"))
    if s3_keys and not str(art.get("uri", "")).startswith("s3://"):
        raise refuse(
            f"{', '.join(s3_keys)} apply to an s3:// artifact store only; give "
            "--artifact-uri s3://bucket/prefix or drop them"
        )
    tracker = out.get("experiment_tracker")
    if tracker is not None:
        out["experiment_tracker"] = tracker = {"flavor": "mlflow", **tracker}
        if tracker["flavor"] not in TRACKER_FLAVORS or not tracker.get("tracking_uri"):
            raise refuse(
                "an experiment tracker is mlflow with a tracking URI; give --mlflow-tracking-uri"
            )


def _check_settings(values: Any) -> dict[str, Any]:
    from pydantic import TypeAdapter, ValidationError

    from zenml_workers.settings import Settings

    if not isinstance(values, Mapping):
        raise refuse(f"a stack's settings table must be a table, not {values!r}")
    allowed = sorted(set(Settings.model_fields) - _NOT_IN_SETTINGS)
    for k, v in values.items():
        if k not in allowed:
            raise refuse(
                f"a stack record cannot carry setting {k!r} (a secret, an identity or a "
                f"component's setting); its settings table takes {', '.join(allowed)}"
            )
        try:
            TypeAdapter(Settings.model_fields[k].annotation or Any).validate_python(v)
        except ValidationError as e:
            raise refuse(f"setting {k!r} = {v!r} is invalid ({e.errors()[0]['msg']})") from e
    return dict(values)


def components_from_options(**options: Any) -> dict[str, Any]:
    """Components from ``zw stack register``'s options (``broker_url``, ``queues``,
    ``broker_password_env`` / ``broker_password_file`` ... : see :data:`KEYS`), validated.

    Raises:
        StackRecordError: an unknown option, both ``_env`` and ``_file`` for one secret, or
            anything :func:`check_components` refuses.
    """
    components: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for key in KEYS:
        if key.kind == "secret":
            env, file = options.get(f"{key.option}_env"), options.get(f"{key.option}_file")
            used |= {f"{key.option}_env", f"{key.option}_file"}
            if env and file:
                raise refuse(f"give {key.flag} or --{key.option.replace('_', '-')}-file, not both")
            value: Any = {"env": env} if env else {"file": str(file)} if file else None
        else:
            value = options.get(key.option)
            used.add(key.option)
        if value is not None and value != () and value != []:
            components.setdefault(key.component, {})[key.key] = value
    unknown = sorted(k for k, v in options.items() if k not in used and v is not None)
    if unknown:
        flags = sorted({k.option for k in KEYS})
        raise refuse(f"no stack option {', '.join(unknown)}; the options are {', '.join(flags)}")
    if "experiment_tracker" in components:
        components["experiment_tracker"].setdefault("flavor", "mlflow")
    return check_components(components)
