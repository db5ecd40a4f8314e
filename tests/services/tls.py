"""Throw-away certificates for TLS tests, made with the ``openssl`` command (no Python package).

:func:`make_certificates` writes a test CA, a server certificate it signed for 127.0.0.1 and
localhost, a client certificate it signed (common name ``postgres``, so PostgreSQL's
``clientcert=verify-full`` maps it to that user), and a second, unrelated CA for "wrong
CA" cases. Keys are EC P-256 (fast to make) and mode 0600; everything is valid for two
days. It takes about 50 ms.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.services.process import SETUP_HINT, ServiceError, ServiceUnavailableError, find_binary

__all__ = ["TLSFiles", "make_certificates"]

#: Common name of the client certificate: the PostgreSQL user it authenticates.
CLIENT_NAME = "postgres"

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_CA_EXTENSIONS = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
_SIGNED_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid,issuer\n"
)
_SERVER_EXTENSIONS = (
    _SIGNED_EXTENSIONS + "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)
_CLIENT_EXTENSIONS = (
    _SIGNED_EXTENSIONS + "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for one test: a CA, a server and a client certificate it signed, and a CA
    that signed neither (``wrong_ca_file``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path
    wrong_ca_file: Path


def _openssl(openssl: str, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise ServiceError(
            f"openssl {args[0]} failed with exit status {done.returncode}:\n{done.stderr}"
        )


def _make_ca(openssl: str, workdir: Path, name: str) -> tuple[Path, Path]:
    cert, key = workdir / f"{name}.pem", workdir / f"{name}.key"
    extensions = [arg for ext in _CA_EXTENSIONS for arg in ("-addext", ext)]
    _openssl(
        openssl, "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert),
        "-subj", f"/CN=zw test {name}", "-days", "2", *extensions, cwd=workdir,
    )  # fmt: skip
    return cert, key


def _sign(
    openssl: str, workdir: Path, name: str, subject: str, extensions: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    cert, key, csr = (workdir / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr"))
    ext = workdir / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        openssl, "req", "-new", *_KEY, "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={subject}", cwd=workdir,
    )  # fmt: skip
    _openssl(
        openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=workdir,
    )  # fmt: skip
    return cert, key


def make_certificates(workdir: Path) -> TLSFiles:
    """Write a CA, a server (127.0.0.1, localhost) and a client certificate, and a wrong CA.

    Raises:
        ServiceUnavailableError: ``openssl`` is not installed.
        ServiceError: ``openssl`` failed (its error output is quoted).
    """
    openssl = find_binary("openssl")
    if openssl is None:
        raise ServiceUnavailableError(f"`openssl` was not found on PATH; {SETUP_HINT}.")
    workdir.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(openssl, workdir, "ca")
    wrong_ca, _ = _make_ca(openssl, workdir, "wrong-ca")
    cert, key = _sign(openssl, workdir, "server", "localhost", _SERVER_EXTENSIONS, ca)
    client_cert, client_key = _sign(openssl, workdir, "client", CLIENT_NAME, _CLIENT_EXTENSIONS, ca)
    for private in workdir.glob("*.key"):
        private.chmod(0o600)
    return TLSFiles(
        ca_file=ca[0],
        cert_file=cert,
        key_file=key,
        client_cert_file=client_cert,
        client_key_file=client_key,
        wrong_ca_file=wrong_ca,
    )
