"""A stack record: named components a team shares through the metadata store.

:class:`StackRecord` is the public, frozen view of a ``stacks`` row: who owns it, whether it
is shared, its components (see :mod:`zenml_workers.sdk.stack_components`), how it is
described, and the settings it gives a user once their own secrets are filled in. TOML
import and export live in :mod:`zenml_workers.sdk.stack_toml`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from zenml_workers.sdk.stack_components import (
    BY_COMPONENT,
    COMPONENTS,
    KEYS,
    SecretRef,
    refuse,
    whose,
)

#: Reserved name: no record, the settings alone (``zw stack set default``).
DEFAULT_STACK = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def check_name(name: str) -> str:
    """Raises: StackRecordError: not a usable stack name."""
    if name == DEFAULT_STACK or not _NAME.match(name):
        raise refuse(
            f"{name!r} cannot name a stack record; use letters, digits, '.', '_' or '-' "
            f"(at most 100, and not {DEFAULT_STACK!r}, which means no record)"
        )
    return name


def _with_password(url: str, password: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


@dataclass(frozen=True)
class StackRecord:
    """A stack as the team shares it (a view: changing it changes nothing stored)."""

    name: str
    owner: str
    shared: bool
    description: str
    components: Mapping[str, Mapping[str, Any]]
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Any) -> StackRecord:
        return cls(
            name=row.name,
            owner=row.owner,
            shared=bool(row.shared),
            description=row.description or "",
            components=MappingProxyType(
                {k: MappingProxyType(dict(v)) for k, v in (row.components or {}).items()}
            ),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @property
    def orchestrator(self) -> str:
        return str(self.components.get("orchestrator", {}).get("flavor", "embedded"))

    def references(self) -> dict[str, SecretRef]:
        """Each secret's reference, by ``component.key``."""
        return {
            f"{k.component}.{k.key}": SecretRef(**self.components[k.component][k.key])
            for k in KEYS
            if k.kind == "secret" and k.key in self.components.get(k.component, {})
        }

    def describe(self) -> list[tuple[str, str]]:
        """Every setting as ``(label, text)`` lines; secrets as ``$VAR`` / ``file:/path``."""
        lines = [
            ("name", self.name),
            ("owner", self.owner),
            ("visibility", "shared" if self.shared else f"private (only {self.owner})"),
        ]
        if self.description:
            lines.append(("description", self.description))
        defaults = {
            "metadata_store": "the store this record lives in",
            "artifact_store": "each user's $ZW_HOME/artifacts",
            "signing": "none (ZW_SECRET_KEY of each user, if set)",
            "experiment_tracker": "none",
        }
        for comp, title in COMPONENTS.items():
            values = self.components.get(comp)
            if not values:
                if comp in defaults:
                    lines.append((title, defaults[comp]))
                continue
            if comp == "signing":
                lines.append((title, SecretRef(**values["secret_key"]).display()))
                continue
            kind = values.get("flavor") or (
                "s3" if str(values.get("uri", "")).startswith("s3://") else "local"
            )
            lines.append((title, str(kind)))
            for k, v in values.items():
                if k == "flavor":
                    continue
                text = SecretRef(**v).display() if isinstance(v, Mapping) else v
                lines.append((f"  {k}", ", ".join(text) if isinstance(text, list) else str(text)))
        for k, v in self.components.get("settings", {}).items():
            lines.append((f"setting {k}", str(v)))
        return lines

    def settings_values(self, *, skip: Collection[str] = ()) -> dict[str, Any]:
        """The settings this record gives, with this user's secrets filled in; ``skip``
        names settings set elsewhere (overrides, environment, stack file), whose references
        are then not read.

        Raises:
            ConfigurationError: a referenced variable is unset or a referenced file unreadable.
        """
        values: dict[str, Any] = {"stack_name": self.name}
        for k in KEYS:
            raw = self.components.get(k.component, {}).get(k.key)
            if raw is None or k.setting is None or k.setting in skip:
                continue
            if k.kind == "secret":
                values[k.setting] = SecretRef(**raw).resolve(stack=self.name, label=whose(k))
            else:
                values[k.setting] = list(raw) if k.kind == "list" else raw
        for setting, comp, secret in (
            ("broker_url", "orchestrator", "broker_password"),
            ("metadata_url", "metadata_store", "password"),
        ):
            ref = self.components.get(comp, {}).get(secret)
            if ref is not None and setting in values:
                label = whose(BY_COMPONENT[comp][secret])
                password = SecretRef(**ref).resolve(stack=self.name, label=label)
                values[setting] = _with_password(values[setting], password)
        for setting, v in self.components.get("settings", {}).items():
            values[setting] = v
        return {name: v for name, v in values.items() if name not in skip}
