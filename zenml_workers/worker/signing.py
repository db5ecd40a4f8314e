"""Signed step messages: an HMAC-SHA256 over each step task, keyed by the team's secret.

Whoever can write to Redis can put a message on a queue; only holders of the key can make
one that a worker runs. The signature covers the whole step task (run, step run,
invocation, pipeline and the input artifacts it carries), in canonical JSON, and names the
key it was made with (a short, non-secret id), so keys rotate without downtime: sign with
the new ``ZW_SECRET_KEY`` while workers still accept the old one in
``ZW_PREVIOUS_SECRET_KEYS``, then drop it.

Why not Celery's own message signing (``task_serializer="auth"``): it signs with X.509
private keys and checks against a certificate store on every worker, i.e. a PKI to run for
what a shared team secret does here; and it protects the envelope, while what a worker acts
on is the step task, which is what this signs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

from scheduler.specs import canonical_json

#: The field of a step task that holds its signature: ``"v1:<key id>:<hex digest>"``.
SIGNATURE = "sig"
_VERSION = "v1"


def key_id(key: bytes) -> str:
    """A short id naming ``key`` in signatures and logs; reveals nothing of the key."""
    return hashlib.sha256(b"zenml-workers key id\0" + key).hexdigest()[:12]


def _digest(key: bytes, task: dict[str, Any]) -> str:
    body = {k: v for k, v in task.items() if k != SIGNATURE}
    return hmac.new(key, canonical_json(body).encode(), hashlib.sha256).hexdigest()


class Signer:
    """Signs step tasks with the current key and verifies them against every accepted key.

    Args:
        key: the key to sign with; None signs nothing (only with ``insecure``).
        accepted: the keys whose signatures are valid (the current one and previous ones).
        insecure: accept unsigned messages too (``ZW_INSECURE=1``, local experiments).
    """

    def __init__(self, key: bytes | None, accepted: Sequence[bytes], *, insecure: bool) -> None:
        self._key = key
        self._key_id = key_id(key) if key else ""
        self._accepted = {key_id(k): k for k in accepted}
        self.insecure = insecure

    def sign(self, task: dict[str, Any]) -> dict[str, Any]:
        """``task`` with its signature added (unchanged when there is no key)."""
        if self._key is None:
            return task
        return {**task, SIGNATURE: f"{_VERSION}:{self._key_id}:{_digest(self._key, task)}"}

    def refusal(self, task: object) -> str | None:
        """Why a received step task must not run, or None when it may: unsigned (unless
        insecure), signed with an unknown key, or not matching its signature."""
        if not isinstance(task, dict):
            return f"the step task is a {type(task).__name__}, not an object"
        sig = task.get(SIGNATURE)
        if sig is None:
            return None if self.insecure else "the step message is not signed"
        parts = sig.split(":") if isinstance(sig, str) else []
        if len(parts) != 3 or parts[0] != _VERSION:
            return "the step message's signature is malformed"
        key = self._accepted.get(parts[1])
        if key is None:
            return (
                f"the step message is signed with key {parts[1]}, which this worker does not "
                "accept (ZW_SECRET_KEY / ZW_PREVIOUS_SECRET_KEYS)"
            )
        if not hmac.compare_digest(parts[2], _digest(key, task)):
            return "the step message does not match its signature (forged or altered)"
        return None


def signer_for(settings: Any) -> Signer:
    """The signer for a :class:`~zenml_workers.settings.Settings`.

    Raises:
        ConfigurationError: ``ZW_SECRET_KEY_FILE`` cannot be read.
    """
    key, accepted = settings.signing_keys()
    return Signer(key, accepted, insecure=settings.insecure)


def require_key(settings: Any, role: str) -> None:
    """Refuse to run a cluster ``role`` (worker, scheduler, client) without a signing key.

    Raises:
        ConfigurationError: no key is configured and ``ZW_INSECURE`` is not set.
    """
    from zenml_workers.errors import ConfigurationError

    key, _ = settings.signing_keys()
    if key is None and not settings.insecure:
        raise ConfigurationError(
            f"this {role} has no ZW_SECRET_KEY, so anyone who can write to the broker could "
            'make it run code; set the same ZW_SECRET_KEY (e.g. from `python -c "import '
            'secrets; print(secrets.token_hex(32))"`) or ZW_SECRET_KEY_FILE on every client, '
            "scheduler and worker, or ZW_INSECURE=1 for a local experiment"
        )
