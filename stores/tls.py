"""TLS failures that a retry cannot fix, told apart from outages, with the sentence that names the fix.

An unreachable service is retried with backoff (an :class:`~stores.errors.InfrastructureError`),
but a certificate that no configured CA signed, a host name the certificate does not list,
or a server that wants TLS from a plaintext client fails the same way on every attempt: a
worker retrying it for its whole budget only hides the cause. :func:`refusal` recognises
these in the error a driver raised (libpq's words for PostgreSQL, Python's ``ssl`` module's
for Redis and S3); :func:`sentence` says which setting to change. Standard library only, so
the stores, the scheduler and the worker can all use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Refusal", "RefusalKind", "refusal", "sentence"]


class RefusalKind(StrEnum):
    """Why a TLS connection failed for good."""

    #: The server's certificate does not chain to a trusted CA (or no CA file was found).
    UNTRUSTED = "untrusted"
    #: The certificate is valid but does not list the host name or address connected to.
    NAME = "name"
    #: The server wants a client certificate, or rejected the one it was sent.
    CLIENT_CERT = "client-cert"
    #: The client's own certificate or key file could not be used.
    CLIENT_FILES = "client-files"
    #: The server accepts only TLS, and the client connected without it.
    PLAINTEXT_CLIENT = "plaintext-client"
    #: The client asked for TLS, and the server does not speak it on that port.
    PLAINTEXT_SERVER = "plaintext-server"


#: Lower-case fragments of driver messages, checked in this order (a host name mismatch
#: also says "certificate verify failed", so it comes first). Transient TLS failures, such
#: as "SSL SYSCALL error: EOF detected" from a server that died mid-handshake, match none.
_MARKERS: tuple[tuple[RefusalKind, tuple[str, ...]], ...] = (
    (
        RefusalKind.NAME,
        ("does not match host name", "hostname mismatch", "ip address mismatch"),
    ),
    (
        RefusalKind.CLIENT_FILES,
        (
            "could not load private key",
            "could not read certificate",
            "certificate present, but not private key",
            "private key file",
            "key values mismatch",
            "[ssl] pem lib",
        ),
    ),
    (
        RefusalKind.CLIENT_CERT,
        (
            "certificate required",
            "requires a valid client certificate",
            "certificate authentication failed",
            "alert unknown ca",
            "alert bad certificate",
            "alert certificate unknown",
        ),
    ),
    (
        RefusalKind.UNTRUSTED,
        ("certificate verify failed", "root certificate file", "certificate has expired"),
    ),
    (RefusalKind.PLAINTEXT_CLIENT, ("no encryption",)),
    (RefusalKind.PLAINTEXT_SERVER, ("server does not support ssl", "wrong version number")),
)

_NOISE = (
    re.compile(r"\s*\(_ssl\.c:\d+\)"),
    # psycopg's prefix repeats the address the sentence already names.
    re.compile(r'^connection failed: (connection to server at "[^"]*", port \d+ failed: )?'),
)


@dataclass(frozen=True)
class Refusal:
    """A TLS failure that a retry cannot fix: its kind and the driver's own words."""

    kind: RefusalKind
    reason: str


def refusal(error: BaseException) -> Refusal | None:
    """The TLS failure ``error`` reports (or an error it was raised from), or None for any other.

    The deepest matching error in the ``__cause__`` / ``__context__`` chain gives the reason
    (redis-py and kombu wrap :class:`ssl.SSLError` in their own connection errors).
    """
    found: Refusal | None = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for line in str(current).splitlines():
            kind = _kind_of(line.lower())
            if kind is not None:
                found = Refusal(kind, _clean(line))
                break
        current = current.__cause__ or current.__context__
    return found


def _kind_of(text: str) -> RefusalKind | None:
    for kind, markers in _MARKERS:
        if any(marker in text for marker in markers):
            return kind
    return None


def _clean(line: str) -> str:
    for pattern in _NOISE:
        line = pattern.sub("", line)
    return line.strip()


def sentence(
    service: str,
    found: Refusal,
    *,
    where: str | None,
    ca_var: str,
    url_var: str,
    cert_vars: str | None,
    enable_tls: str,
) -> str:
    """One sentence naming ``service``, what failed and which setting fixes it (no final period).

    Args:
        service: e.g. ``"the metadata store (PostgreSQL)"``.
        found: what :func:`refusal` returned.
        where: the service's address (credentials redacted), or None to leave it out.
        ca_var: the setting holding the CA file, e.g. ``"ZW_METADATA_CA_FILE"``.
        url_var: the setting holding the address.
        cert_vars: the client certificate and key settings, or None when there are none.
        enable_tls: how to turn TLS on, e.g. ``"use a rediss:// ZW_BROKER_URL"``.
    """
    clients = cert_vars or "a client certificate (which zenml-workers cannot send to it)"
    fix = {
        RefusalKind.UNTRUSTED: (
            f"set {ca_var} to the CA certificate (a PEM file) that signed the server's "
            "certificate, or renew a certificate that expired"
        ),
        RefusalKind.NAME: (
            f"connect by a host name or address that the server's certificate lists "
            f"(fix {url_var}), or reissue the certificate for it"
        ),
        RefusalKind.CLIENT_CERT: (
            f"the server wants a client certificate signed by a CA it trusts: set {clients}"
        ),
        RefusalKind.CLIENT_FILES: (
            f"check that {clients} are a matching PEM certificate and private key, the key "
            "readable by its owner only"
        ),
        RefusalKind.PLAINTEXT_CLIENT: f"the server accepts TLS connections only: {enable_tls}",
        RefusalKind.PLAINTEXT_SERVER: (
            f"the server does not speak TLS there: point {url_var} at its TLS port, or turn "
            "TLS on in the server"
        ),
    }[found.kind]
    at = f" at {where}" if where else ""
    return f"the TLS connection to {service}{at} failed ({found.reason}); {fix}"
