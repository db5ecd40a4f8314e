"""Stack records as TOML: ``zw stack export`` writes it, ``zw stack import`` reads it.

The export holds the record's name, description and components, each component a table,
secrets as references only (``s3_secret_access_key = { env = "TEAM_S3_SECRET" }``). Owner
and sharing are not exported: whoever imports becomes the owner. The import also reads a
settings stack file (``ZW_STACK_FILE``'s format: settings' names as keys, optionally under
``[stack]``) and turns it into components, refusing its literal secrets.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zenml_workers.errors import StackRecordError
from zenml_workers.sdk.stack_components import (
    COMPONENTS,
    check_components,
    components_from_options,
)
from zenml_workers.sdk.stack_record import StackRecord

#: Settings-file keys that map onto ``register`` options (the rest go to ``[settings]``).
_FILE_OPTIONS = {
    "broker_url": "broker_url",
    "queues": "queues",
    "metadata_url": "metadata_url",
    "artifact_uri": "artifact_uri",
    "s3_endpoint_url": "s3_endpoint_url",
    "s3_region": "s3_region",
    "secret_key_file": "secret_key_file",
    "mlflow_tracking_uri": "mlflow_tracking_uri",
    "mlflow_experiment_name": "mlflow_experiment_name",
}
#: Settings-file keys holding a secret value, and the reference to write instead.
_FILE_SECRETS = {
    "s3_access_key_id": 's3_access_key_id = { env = "VAR" } under [artifact_store]',
    "s3_secret_access_key": 's3_secret_access_key = { env = "VAR" } under [artifact_store]',
    "secret_key": 'secret_key = { env = "VAR" } under [signing]',
    "previous_secret_keys": "ZW_PREVIOUS_SECRET_KEYS in each user's environment",
}


@dataclass(frozen=True)
class StackDocument:
    """What a TOML stack file says: the name (None: not given), description and components."""

    name: str | None
    description: str
    components: dict[str, Any]


def _value(v: Any) -> str:
    # JSON's string escapes are valid TOML basic-string escapes.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(i) for i in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(i)}" for k, i in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(record: StackRecord) -> str:
    """The record as TOML with references in place of secrets (it holds no secret value)."""
    lines = [
        f"# zenml-workers stack {record.name!r}, registered by {record.owner}.",
        "# Secrets are references: each user supplies their own values (`zw stack describe`).",
        "[stack]",
        f"name = {_value(record.name)}",
    ]
    if record.description:
        lines.append(f"description = {_value(record.description)}")
    for comp in (*COMPONENTS, "settings"):
        values = record.components.get(comp)
        if not values:
            continue
        lines += ["", f"[{comp}]"]
        lines += [f"{k} = {_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def parse_toml(text: str, *, source: str) -> StackDocument:
    """Read an exported stack or a settings stack file, validated.

    Raises:
        StackRecordError: bad TOML, a literal secret, or anything the record rules refuse.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StackRecordError(
            f"{source} is not valid TOML ({e}); fix the syntax on that line; nothing was written"
        ) from e
    head = data.get("stack", {})
    if not isinstance(head, dict):
        raise StackRecordError(f"[stack] in {source} must be a table; nothing was written")
    exported = any(k in data for k in (*COMPONENTS, "settings")) or (
        "stack" in data and set(head) <= {"name", "description"}
    )
    if exported:
        extra = sorted(set(data) - {"stack", "settings", *COMPONENTS})
        if extra or set(head) - {"name", "description"}:
            raise StackRecordError(
                f"{source} has unknown table(s) or key(s) {', '.join(extra or sorted(head))}; "
                f"an exported stack has [stack] name/description and [{'], ['.join(COMPONENTS)}]"
                "; nothing was written"
            )
        components = {k: v for k, v in data.items() if k != "stack"}
        return StackDocument(
            name=head.get("name"),
            description=str(head.get("description", "")),
            components=check_components(components),
        )
    return _from_settings_file(data.get("stack", data), source=source)


def _from_settings_file(values: Mapping[str, Any], *, source: str) -> StackDocument:
    for key, fix in _FILE_SECRETS.items():
        if values.get(key):
            raise StackRecordError(
                f"{source} holds {key} as a literal value, which a stack record must never "
                f"hold; write {fix} instead (each user supplies the value); nothing was written"
            )
    options = {opt: values[k] for k, opt in _FILE_OPTIONS.items() if k in values}
    if "broker_url" in options:
        options["orchestrator"] = "celery"
    components = components_from_options(**options)
    rest = {
        k: v
        for k, v in values.items()
        if k not in _FILE_OPTIONS and k not in _FILE_SECRETS and k != "stack_name"
    }
    if rest:
        components["settings"] = check_components({"settings": rest})["settings"]
    name = values.get("stack_name")
    return StackDocument(name=str(name) if name else None, description="", components=components)
