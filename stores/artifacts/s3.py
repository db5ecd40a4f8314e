"""Artifact store on S3 or an S3-compatible server (SeaweedFS, MinIO, Ceph ...).

boto3 is imported lazily, when a store first talks to S3, and each store keeps one
client (boto3 clients are thread-safe). Writes buffer one part at a time: an
object smaller than a part is sent with a single ``PutObject``, a larger one as a
multipart upload that is completed on commit and aborted on error, so a writer
never holds more than one part. Both use ``If-None-Match: *`` so that an existing
key is never overwritten; servers that answer ``NotImplemented`` get an existence
check instead. Reads stream from ``GetObject`` and seek with ranged requests.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from stores import tls
from stores.artifacts.base import ArtifactStore, ArtifactWriter, split_uri
from stores.errors import (
    ArtifactNotFoundError,
    ArtifactStoreCredentialsError,
    ArtifactStoreError,
    ArtifactStoreUnavailableError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # pragma: no cover
else:
    S3Client = Any

__all__ = ["S3ArtifactStore", "MIN_PART_SIZE_BYTES"]

logger = logging.getLogger(__name__)

MIN_PART_SIZE_BYTES = 5 * 1024 * 1024  # S3 rejects smaller parts, except the last one
DEFAULT_PART_SIZE_BYTES = 8 * 1024 * 1024
_READ_BUFFER_BYTES = 1024 * 1024

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})
#: Server-side errors that a later retry may not meet (S3 asks clients to back off on these).
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "500",
        "502",
        "503",
        "504",
    }
)


def _error_code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _boto_errors() -> tuple[type[BaseException], ...]:
    """The botocore exception roots, imported only once an exception is being matched."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _exists_error(uri: str) -> ArtifactStoreError:
    return ArtifactStoreError(
        f"Artifact {uri} already exists and artifacts are immutable; "
        "write to a new key (e.g. a new attempt)."
    )


class _S3Writer(ArtifactWriter):
    def __init__(self, store: S3ArtifactStore, key: str) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self._uri = f"s3://{store.bucket}/{key}"
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def _write_chunk(self, data: memoryview) -> None:
        part_size = self._store.part_size_bytes
        offset = 0
        while offset < data.nbytes:
            take = min(part_size - len(self._buffer), data.nbytes - offset)
            self._buffer += data[offset : offset + take]
            offset += take
            if len(self._buffer) >= part_size:
                self._upload_part()

    def _upload_part(self) -> None:
        client = self._store.client
        body, self._buffer = bytes(self._buffer), bytearray()
        try:
            if self._upload_id is None:
                created = client.create_multipart_upload(Bucket=self._store.bucket, Key=self._key)
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            answer = client.upload_part(
                Bucket=self._store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
        except _boto_errors() as e:
            raise self._store.translate(e, "upload", self._uri) from e
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _commit(self) -> str:
        store = self._store
        if self._upload_id is not None and self._buffer:
            self._upload_part()
        conditional = store.conditional_writes
        if not conditional and store.exists(self._uri):
            raise _exists_error(self._uri)
        try:
            self._send(conditional)
        except _boto_errors() as e:
            code = _error_code(e)
            if code in _EXISTS_CODES:
                raise _exists_error(self._uri) from e
            if conditional and code in _UNSUPPORTED_CODES:
                logger.info("S3 server rejects If-None-Match; using existence checks instead")
                store.conditional_writes = False
                return self._commit()
            raise store.translate(e, "write", self._uri) from e
        return self._uri

    def _send(self, conditional: bool) -> None:
        client, bucket = self._store.client, self._store.bucket
        extra: dict[str, str] = {"IfNoneMatch": "*"} if conditional else {}
        if self._upload_id is None:
            client.put_object(Bucket=bucket, Key=self._key, Body=bytes(self._buffer), **extra)
            self._buffer = bytearray()
        else:
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
                **extra,
            )
            self._upload_id = None

    def _abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=upload_id
            )
        except (
            _boto_errors()
        ) as e:  # the original error matters more; the server expires the upload
            logger.warning("Could not abort multipart upload %s of %s: %s", upload_id, self._uri, e)


class _S3Reader(io.RawIOBase):
    """A seekable raw stream over one object: sequential reads share one GET, seeks reopen it."""

    def __init__(self, store: S3ArtifactStore, uri: str, bucket: str, key: str) -> None:
        super().__init__()
        self._store, self._uri, self._bucket, self._key = store, uri, bucket, key
        self._pos = 0
        self._body: Any = None
        self._body = self._open(None)

    def _open(self, start: int | None) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if start is not None:
            kwargs["Range"] = f"bytes={start}-"
        try:
            answer = self._store.client.get_object(**kwargs)
        except _boto_errors() as e:
            raise self._store.translate(e, "read", self._uri) from e
        if start is None:
            self.size_bytes = int(answer["ContentLength"])
        return answer["Body"]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size_bytes}[whence]
        position = base + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        if position != self._pos:
            self._drop_body()
            self._pos = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.size_bytes:
            return 0
        if self._body is None:
            self._body = self._open(self._pos)
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(view.nbytes)
        except _boto_errors() as e:
            raise self._store.translate(e, "read", self._uri) from e
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects below ``s3://bucket/prefix``.

    Args:
        bucket: Bucket name; it must exist.
        prefix: Folder inside the bucket that keys are placed under.
        endpoint_url: URL of an S3-compatible server; None for AWS (or ``AWS_ENDPOINT_URL``).
        access_key_id: Access key id; None to use boto3's default credential chain.
        secret_access_key: Secret for ``access_key_id``; give both or neither.
        region: Region name; defaults to ``us-east-1`` when ``endpoint_url`` is set.
        part_size_bytes: Multipart part size (at least 5 MiB); also the largest single put.
        max_pool_connections: Size of the client's HTTP connection pool.
        connect_timeout_s: Seconds to wait for a connection.
        read_timeout_s: Seconds to wait for a response chunk.
        ca_bundle: CA bundle (a PEM file) that an ``https://`` endpoint's certificate must
            chain to; None for botocore's default (its bundled CAs, or ``AWS_CA_BUNDLE``).

    Raises:
        ArtifactStoreError: If the bucket is empty or the part size is below 5 MiB.
        ArtifactStoreCredentialsError: If only one of the key id and the secret is given.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
        max_pool_connections: int = 16,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        ca_bundle: str | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ArtifactStoreError(
                f"S3 bucket name {bucket!r} is invalid; set ZW_ARTIFACT_URI to s3://<bucket>/<prefix>."
            )
        if part_size_bytes < MIN_PART_SIZE_BYTES:
            raise ArtifactStoreError(
                f"S3 part size {part_size_bytes} bytes is below the S3 minimum of "
                f"{MIN_PART_SIZE_BYTES}; use at least 5 MiB."
            )
        if (access_key_id is None) != (secret_access_key is None):
            raise ArtifactStoreCredentialsError(
                "Only one of the S3 access key id and secret is set; "
                "set both ZW_S3_ACCESS_KEY_ID and ZW_S3_SECRET_ACCESS_KEY, or neither."
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root_uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        self.region = region or ("us-east-1" if endpoint_url else None)
        self.part_size_bytes = part_size_bytes
        self.max_pool_connections = max_pool_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ca_bundle = ca_bundle
        self.conditional_writes = True
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._client: S3Client | None = None
        self._client_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def client(self) -> S3Client:
        """The store's boto3 S3 client, created on first use (imports boto3)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> S3Client:
        import boto3.session
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            region_name=self.region,
        )
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            s3={"addressing_style": "path"},
            # Default CRC checksums (botocore >= 1.36) break several S3-compatible servers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client(
            "s3", endpoint_url=self.endpoint_url, config=config, verify=self.ca_bundle
        )

    def translate(self, e: BaseException, action: str, uri: str) -> ArtifactStoreError:
        """Return the store error for a botocore error ``e`` raised while ``action``-ing ``uri``."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
            ResponseStreamingError,
        )

        where = self.endpoint_url or "AWS S3"
        if isinstance(e, ClientError):
            code = _error_code(e)
            if code in _TRANSIENT_CODES:
                return ArtifactStoreUnavailableError(
                    f"S3 at {where} is unavailable to {action} {uri} ({code}); "
                    "the step is retried with backoff once S3 answers again."
                )
            if code in _CREDENTIAL_CODES:
                return ArtifactStoreCredentialsError(
                    f"S3 at {where} refused to {action} {uri} ({code}); "
                    "check ZW_S3_ACCESS_KEY_ID / ZW_S3_SECRET_ACCESS_KEY and the key's permissions."
                )
            if code == "NoSuchBucket":
                bucket = uri.removeprefix("s3://").split("/", 1)[0]
                return ArtifactStoreError(
                    f"S3 bucket {bucket!r} does not exist at {where}; create it or fix ZW_ARTIFACT_URI."
                )
            if code in _NOT_FOUND_CODES:
                return ArtifactNotFoundError(
                    f"No artifact at {uri}; check the URI or whether it was deleted."
                )
            message = e.response.get("Error", {}).get("Message", "")
            return ArtifactStoreError(
                f"S3 at {where} failed to {action} {uri} ({code}: {message}); "
                "check the server and ZW_ARTIFACT_URI."
            )
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return ArtifactStoreCredentialsError(
                f"No S3 credentials found to {action} {uri}; "
                "set ZW_S3_ACCESS_KEY_ID / ZW_S3_SECRET_ACCESS_KEY."
            )
        refused = tls.refusal(e) if isinstance(e, (ConnectionError, HTTPClientError)) else None
        if refused is not None:
            # An untrusted certificate fails every retry: not an outage, so not retried.
            text = tls.sentence(
                "S3",
                refused,
                where=where,
                ca_var="ZW_S3_CA_BUNDLE",
                url_var="ZW_S3_ENDPOINT_URL",
                cert_vars=None,
                enable_tls="use an https:// ZW_S3_ENDPOINT_URL",
            )
            return ArtifactStoreError(f"{text[0].upper()}{text[1:]}.")
        # Refused or timed-out connections, resets and broken response streams.
        if isinstance(e, (ConnectionError, HTTPClientError, ResponseStreamingError)):
            return ArtifactStoreUnavailableError(
                f"Cannot reach S3 at {where} to {action} {uri} ({type(e).__name__}); "
                "start the server or fix ZW_S3_ENDPOINT_URL (steps retry with backoff meanwhile)."
            )
        return ArtifactStoreError(
            f"S3 at {where} failed to {action} {uri} ({type(e).__name__}: {e}); "
            "check the server and the network."
        )

    def key_for(self, key: str) -> str:
        """Return the object key (prefix included) of a store-relative ``key``."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _open_writer(self, key: str) -> ArtifactWriter:
        return _S3Writer(self, self.key_for(key))

    def _parse(self, uri: str) -> tuple[str, str]:
        bucket, key = split_uri(uri, "s3")
        if not bucket or not key:
            raise ArtifactStoreError(
                f"S3 URI {uri!r} names no object; use s3://<bucket>/<key> as returned by a write."
            )
        return bucket, key

    @contextmanager
    def reader(self, uri: str) -> Iterator[BinaryIO]:
        """Open ``uri`` for streaming reads; seeking issues a ranged GET.

        Raises:
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If ``uri`` is not an s3:// URI or the read fails.
        """
        bucket, key = self._parse(uri)
        raw = _S3Reader(self, uri, bucket, key)
        with io.BufferedReader(raw, buffer_size=_READ_BUFFER_BYTES) as f:
            yield f

    def get_bytes(self, uri: str) -> bytes:
        """Download the whole of ``uri`` into memory.

        Raises:
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If the read fails.
        """
        bucket, key = self._parse(uri)
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            with body:
                data: bytes = body.read()
        except _boto_errors() as e:
            raise self.translate(e, "read", uri) from e
        return data

    def lost(self, refs: Sequence[Any]) -> set[str]:
        """Ids of ``refs`` (with ``id`` and ``uri``) whose object is gone: the ``HEAD``
        requests go out together (at most 16 at a time), so a fully cached run waits about
        one round trip for them, not one per output.

        Raises:
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If S3 cannot be asked.
        """
        root = self.root_uri.rstrip("/") + "/"
        mine = [r for r in refs if r.uri.startswith(root)]
        if len(mine) <= 1:
            return {r.id for r in mine if not self.exists(r.uri)}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(mine))) as pool:
            found = list(pool.map(lambda r: self.exists(r.uri), mine))
        return {r.id for r, there in zip(mine, found, strict=True) if not there}

    def exists(self, uri: str) -> bool:
        """Return whether an object exists at ``uri`` (a missing bucket counts as missing).

        Raises:
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If ``uri`` is not an s3:// URI or S3 cannot be asked.
        """
        bucket, key = self._parse(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except _boto_errors() as e:
            error = self.translate(e, "look up", uri)
            if isinstance(error, ArtifactNotFoundError):
                return False
            raise error from e
        return True

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; a missing object is not an error.

        Raises:
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If ``uri`` is not an s3:// URI or the delete fails.
        """
        bucket, key = self._parse(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except _boto_errors() as e:
            error = self.translate(e, "delete", uri)
            if not isinstance(error, ArtifactNotFoundError):
                raise error from e

    def check(self) -> None:
        """List at most one key below the root, which proves the endpoint, credentials and bucket.

        Raises:
            ArtifactStoreCredentialsError: If S3 rejects the credentials.
            ArtifactStoreError: If the endpoint is unreachable or the bucket does not exist.
        """
        try:
            self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1
            )
        except _boto_errors() as e:
            raise self.translate(e, "list", self.root_uri) from e
