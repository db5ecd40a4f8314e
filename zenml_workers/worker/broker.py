"""The Redis broker transport: a message that is not a valid envelope goes to a dead-letter list.

kombu's Redis transport parses each message it pops and hands it to the consumer; bytes
that are not JSON, JSON that is not an object, an envelope kombu cannot unpack, or a task
message Celery's consumer cannot read raise out of the consumer loop, and Celery stops the
worker ("Unrecoverable error"). The next worker pops the next bad message and stops too. :class:`Transport` screens every popped
message first: a bad one is logged once, kept on the ``zw:dead-letter`` list (newest
first, at most :data:`DEAD_LETTER_LIMIT`) and never delivered, and the worker carries on.
``zw dead-letters`` lists what was kept.

:func:`celery_config` is what a Celery app needs to use it; :func:`check_envelope` is the
validation, a pure function.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kombu
from kombu.transport import redis as kombu_redis
from kombu.utils.json import loads as kombu_loads

from zenml_workers.errors import BrokerUnavailableError, ConfigurationError

log = logging.getLogger("zenml_workers.worker")

#: The Redis list (in the broker's database) that holds the dropped messages, newest first.
DEAD_LETTER_KEY = "zw:dead-letter"
#: The list keeps this many records; older ones are trimmed away.
DEAD_LETTER_LIMIT = 1000
#: A record keeps at most this much of the message.
RAW_LIMIT_BYTES = 64 * 1024
#: How much of a dropped message its warning line quotes.
PREVIEW_BYTES = 80

#: ``broker_transport`` values: the same transport under two names, so that kombu writes
#: the right scheme (``redis://`` or ``rediss://``) when it shows a connection's URL.
TRANSPORT = "zenml_workers.worker.broker:Transport"
TLS_TRANSPORT = "zenml_workers.worker.broker:TLSTransport"

#: kombu only decodes bodies with these ``body_encoding`` values (None is plain text).
_PLAIN_ENCODINGS = ("utf-8",)
_BASE64 = "base64"


def celery_config(
    broker_url: str | None, ssl_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Celery settings that make workers and producers on ``broker_url`` use :class:`Transport`.

    An explicit ``broker_transport`` wins over the URL's scheme, so kombu no longer sees
    ``rediss`` and would connect without TLS: a ``rediss://`` URL therefore also gets
    ``broker_use_ssl`` with verified certificates, as redis-py does for the same URL (stock
    kombu would not verify them). ``ssl_*`` parameters in the URL's query still take precedence (kombu reads them over
    ``broker_use_ssl``), e.g. ``rediss://host:6380/0?ssl_cert_reqs=none`` for a self-signed
    certificate. ``ssl_options`` (:meth:`~zenml_workers.settings.Settings.broker_ssl_options`:
    the CA and client certificate files) are added to ``broker_use_ssl``. Other brokers get
    nothing: ``{}``.
    """
    scheme = urlsplit(broker_url).scheme if broker_url else ""
    if scheme not in ("redis", "rediss"):
        return {}
    # kombu writes a connection's URL with the transport's name as its scheme (the worker
    # banner, Flower's broker view); these aliases keep it redis:// and rediss://.
    kombu.Connection.resolve_aliases.setdefault(TRANSPORT, "redis")
    kombu.Connection.resolve_aliases.setdefault(TLS_TRANSPORT, "rediss")
    if scheme == "redis":
        return {"broker_transport": TRANSPORT}
    config: dict[str, Any] = {"broker_transport": TLS_TRANSPORT}
    query = parse_qs(urlsplit(broker_url).query) if broker_url else {}
    if not any(key.startswith("ssl_") for key in query):
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, **(ssl_options or {})}
    return config


def tls_transport_options(
    broker_url: str | None, ssl_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A ``broker_transport_options`` entry that keeps apps with other TLS settings apart.

    kombu shares connections process-wide (``kombu.pools.connections``, which Celery's
    producers use), keyed by host, port, credentials and transport options, but not by
    ``broker_use_ssl`` nor the URL's ``ssl_*`` query: a second app in the process with other
    CA or client certificate files would borrow a connection verified against the first
    one's CA, or not verified at all. Empty for brokers that are not ``rediss://``.
    """
    if not broker_url or urlsplit(broker_url).scheme != "rediss":
        return {}
    query = parse_qs(urlsplit(broker_url).query)
    in_url = sorted((k, v) for k, vs in query.items() if k.startswith("ssl_") for v in vs)
    given = sorted((k, str(v)) for k, v in (ssl_options or {}).items())
    return {"zw_tls": repr((given, in_url))}


def check_envelope(payload: object) -> str | None:
    """Why kombu could not deliver ``payload`` (a message as parsed from JSON), or None if it can.

    The checks are what kombu's virtual channel and Redis QoS index or decode before
    anything of ours runs: ``properties`` with a string ``delivery_tag`` and a
    ``delivery_info`` naming its exchange and routing key, object ``headers``, string
    content type and encoding, and a body that its ``body_encoding`` can decode. A Celery
    task message (``headers.task`` set) must also be readable by Celery's consumer, which
    raises out of the worker on what it does not expect: a string ``headers.id``, a
    ``[hard, soft]`` ``headers.timelimit`` and a JSON body ``[args, kwargs, embed]``.
    """
    if not isinstance(payload, Mapping):
        return f"not a message envelope: a JSON {_json_kind(payload)}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, Mapping):
        return f"'properties' is {_missing_or_kind(properties)}, not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return f"'properties.delivery_tag' is {_missing_or_kind(tag)}, not a non-empty string"
    info = properties.get("delivery_info")
    if not isinstance(info, Mapping):
        return f"'properties.delivery_info' is {_missing_or_kind(info)}, not an object"
    for key in ("exchange", "routing_key"):
        if not isinstance(info.get(key), str):
            return (
                f"'properties.delivery_info.{key}' is {_missing_or_kind(info.get(key))}, "
                "not a string"
            )
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, Mapping):
        return f"'headers' is a JSON {_json_kind(headers)}, not an object"
    for key in ("content-type", "content-encoding"):
        value = payload.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key!r} is a JSON {_json_kind(value)}, not a string"
    encoding = properties.get("body_encoding")
    reason = _check_body(payload.get("body"), encoding)
    if reason is None and headers is not None and "task" in headers:
        reason = _check_task_message(payload, headers, encoding)
    return reason


def _check_body(body: object, encoding: object) -> str | None:
    if not body:
        return None  # kombu decodes only a non-empty body
    if not isinstance(body, str | bytes):
        return f"'body' is a JSON {_json_kind(body)}, not a string"
    if encoding is None or (isinstance(encoding, str) and encoding.lower() in _PLAIN_ENCODINGS):
        return None
    if encoding != _BASE64:
        return f"'properties.body_encoding' is {encoding!r}; kombu decodes only 'base64' bodies"
    try:
        base64.b64decode(_as_bytes(body))
    except ValueError as e:  # binascii.Error, or a string that is not encodable text
        return f"'body' is not base64 ({e})"
    return None


def _check_task_message(
    payload: Mapping[str, Any], headers: Mapping[str, Any], encoding: object
) -> str | None:
    task = headers["task"]
    if not isinstance(task, str):
        return f"'headers.task' is a JSON {_json_kind(task)}, not a string"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"'headers.id' is {_missing_or_kind(task_id)}, not a non-empty string"
    limits = headers.get("timelimit")
    if limits and not (
        isinstance(limits, list | tuple) and len(limits) == 2 and all(map(_is_seconds, limits))
    ):
        return f"'headers.timelimit' is {limits!r:.40}, not [hard, soft] seconds"
    if headers.get("compression") or payload.get("content-type") != "application/json":
        return None  # Celery decodes (or refuses) other bodies inside its own error handling
    body = payload.get("body") or ""
    data = base64.b64decode(_as_bytes(body)) if encoding == _BASE64 else body
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    try:
        decoded = kombu_loads(text)
    except Exception as e:  # JSONDecodeError, or a ``__type__`` object kombu chokes on
        return f"task body is not JSON ({type(e).__name__}: {e})"
    if isinstance(decoded, Mapping) and "args" in decoded:
        return None  # the hybrid protocol 1/2 shape, which Celery converts itself
    if not isinstance(decoded, list) or len(decoded) != 3:
        return f"task body is a JSON {_json_kind(decoded)}, not [args, kwargs, embed]"
    return None


def _is_seconds(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _as_bytes(body: str | bytes) -> bytes:
    return body.encode() if isinstance(body, str) else body


def check_message(raw: bytes | str) -> str | None:
    """Why the popped message ``raw`` cannot be delivered, or None if it can.

    It is parsed the way kombu's Redis transport parses it (undecodable bytes replaced,
    kombu's JSON decoder with its ``__type__`` hook), then :func:`check_envelope`.
    """
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    try:
        payload = kombu_loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON ({e})"
    except Exception as e:  # a ``__type__`` object kombu's decoder chokes on
        return f"not JSON kombu can read ({type(e).__name__}: {e})"
    return check_envelope(payload)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str | bytes):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _missing_or_kind(value: object) -> str:
    return "missing" if value is None else f"a JSON {_json_kind(value)}"


def preview(raw: bytes | str) -> str:
    """A short repr of the first :data:`PREVIEW_BYTES` bytes of ``raw``, for one log line."""
    data = raw.encode("utf-8", errors="replace") if isinstance(raw, str) else raw
    more = "..." if len(data) > PREVIEW_BYTES else ""
    return f"{data[:PREVIEW_BYTES]!r}{more}"


@dataclass(frozen=True)
class DeadLetter:
    """One dropped message as kept on the dead-letter list.

    ``raw`` is the message as text (undecodable bytes replaced), cut to
    :data:`RAW_LIMIT_BYTES`; ``at`` is when it was dropped, in Unix seconds.
    """

    queue: str
    reason: str
    raw: str
    at: float

    @classmethod
    def of(cls, queue: str, reason: str, raw: bytes | str, *, now: float) -> DeadLetter:
        """The record for ``raw``, dropped from ``queue`` for ``reason`` at ``now`` (Unix s)."""
        data = raw.encode("utf-8", errors="replace") if isinstance(raw, str) else raw
        text = data[:RAW_LIMIT_BYTES].decode("utf-8", errors="replace")
        return cls(queue=queue, reason=reason, raw=text, at=now)

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: bytes | str) -> DeadLetter:
        """Read a record back.

        Raises:
            ValueError: ``text`` is not a JSON object with the record's four fields.
        """
        try:
            d = json.loads(text)
            return cls(
                queue=str(d["queue"]), reason=str(d["reason"]), raw=str(d["raw"]), at=float(d["at"])
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a dead-letter record: {text!r:.80}") from e


class DeadLetterList:
    """The ``zw:dead-letter`` list on one Redis client (a ``redis.Redis``): newest first, capped."""

    def __init__(self, client: Any, url: str | None = None) -> None:
        self.client = client
        #: The broker's URL, named in errors (None: unknown).
        self.url = url

    @classmethod
    def from_url(
        cls, broker_url: str, ssl_options: Mapping[str, Any] | None = None
    ) -> DeadLetterList:
        """The list in the database of the Redis broker at ``broker_url`` (connects lazily).

        ``ssl_options`` are redis-py's TLS arguments
        (:meth:`~zenml_workers.settings.Settings.broker_ssl_options`).
        """
        import redis

        return cls(redis.Redis.from_url(broker_url, **(ssl_options or {})), broker_url)

    def push(self, letter: DeadLetter) -> None:
        """Add ``letter`` and trim the list to the newest :data:`DEAD_LETTER_LIMIT` records.

        Raises:
            BrokerUnavailableError: Redis could not be reached or refused the write.
            ConfigurationError: the TLS connection failed in a way no retry fixes.
        """
        try:
            # One MULTI/EXEC, so the list is never seen past its cap.
            with self.client.pipeline() as pipe:
                pipe.lpush(DEAD_LETTER_KEY, letter.encode())
                pipe.ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_LIMIT - 1)
                pipe.execute()
        except _redis_errors() as e:
            raise _unavailable("write", e, self.url) from e

    def newest(self, limit: int) -> list[DeadLetter | str]:
        """The newest ``limit`` records; an entry that is not a record comes back as its text.

        Raises:
            BrokerUnavailableError: Redis could not be reached.
            ConfigurationError: the TLS connection failed in a way no retry fixes.
        """
        try:
            items = self.client.lrange(DEAD_LETTER_KEY, 0, limit - 1) if limit > 0 else []
        except _redis_errors() as e:
            raise _unavailable("read", e, self.url) from e
        out: list[DeadLetter | str] = []
        for item in items:
            try:
                out.append(DeadLetter.decode(item))
            except ValueError:
                out.append(item.decode("utf-8", errors="replace"))
        return out

    def clear(self) -> int:
        """Remove every record; returns how many there were.

        Raises:
            BrokerUnavailableError: Redis could not be reached.
            ConfigurationError: the TLS connection failed in a way no retry fixes.
        """
        try:
            with self.client.pipeline() as pipe:
                pipe.llen(DEAD_LETTER_KEY)
                pipe.delete(DEAD_LETTER_KEY)
                count, _ = pipe.execute()
        except _redis_errors() as e:
            raise _unavailable("clear", e, self.url) from e
        return int(count)


def tls_refusal(error: BaseException, broker_url: str | None = None) -> str | None:
    """The sentence for a TLS failure of the Redis broker that no retry fixes (an untrusted
    certificate, a wrong host name, a missing client certificate), or None for other errors.

    ``broker_url`` is named in it (its password hidden) when given.
    """
    from stores import tls
    from stores.metadata.store import redact_url

    found = tls.refusal(error)
    if found is None:
        return None
    return tls.sentence(
        "the broker (Redis)",
        found,
        where=redact_url(broker_url) if broker_url else None,
        ca_var="ZW_BROKER_CA_FILE",
        url_var="ZW_BROKER_URL",
        cert_vars="ZW_BROKER_CERT_FILE and ZW_BROKER_KEY_FILE",
        enable_tls="use a rediss:// ZW_BROKER_URL",
    )


def check_broker_link(broker_url: str, ssl_options: Mapping[str, Any] | None = None) -> None:
    """Fail at worker start on a broker link no retry can fix (a TLS refusal).

    Celery retries the broker connection forever at start-up, which is right for an outage
    (Redis restarting) and wrong for a certificate that will never verify. Anything else
    (down, unreachable) is left to those retries.

    Raises:
        ConfigurationError: the broker refused the TLS handshake (or we refused its
            certificate), with the sentence naming Redis and the setting to fix.
    """
    import redis

    from stores.metadata.store import redact_url

    if urlsplit(broker_url).scheme not in ("redis", "rediss"):
        return
    client = redis.Redis.from_url(
        broker_url, socket_timeout=5, socket_connect_timeout=5, **(ssl_options or {})
    )
    try:
        client.ping()
    except _redis_errors() as e:
        refused = tls_refusal(e, broker_url)
        if refused is not None:
            raise ConfigurationError(f"the worker cannot start: {refused}") from None
        log.warning(
            "the broker at %s does not answer yet (%s); the worker keeps trying",
            redact_url(broker_url),
            e,
        )
    finally:
        client.close()


def _unavailable(
    verb: str, error: BaseException, url: str | None = None
) -> BrokerUnavailableError | ConfigurationError:
    refused = tls_refusal(error, url)
    if refused is not None:
        return ConfigurationError(f"could not {verb} {DEAD_LETTER_KEY}: {refused}")
    return BrokerUnavailableError(
        f"could not {verb} {DEAD_LETTER_KEY} on the broker ({error}); "
        "check that Redis is up and that ZW_BROKER_URL points at it"
    )


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


def bury(
    dead: DeadLetterList | None,
    queue: str,
    reason: str,
    raw: bytes | str,
    *,
    what: str,
    now: float,
) -> None:
    """Keep the dropped message ``raw`` on ``dead`` and log one warning line; never raises.

    ``what`` names the message in that line ("a message", "task 1234"); ``now`` is the
    drop time in Unix seconds. With ``dead`` None (no Redis broker) only the line is logged.
    """
    kept = f"kept in {DEAD_LETTER_KEY}"
    if dead is None:
        kept = "not kept (no Redis broker)"
    else:
        try:
            dead.push(DeadLetter.of(queue, reason, raw, now=now))
        except Exception as e:  # the worker must keep serving even when Redis refuses it
            kept = f"NOT kept ({type(e).__name__}: {e})"
    log.warning("dropped %s from queue %r: %s; raw %s; %s", what, queue, reason, preview(raw), kept)


def drop_step_task(
    broker_url: str | None,
    request: Any,
    task: object,
    error: Exception,
    *,
    now: float,
    reason: str | None = None,
    ssl_options: Mapping[str, Any] | None = None,
) -> None:
    """Log and dead-letter a ``zw.step`` message that must not run; never raises.

    ``request`` is the Celery task's request (its ``id`` and ``delivery_info``); ``error``
    is what decoding ``task`` raised; ``reason`` (default: from ``error``) says why it is
    refused, e.g. a bad signature; ``now`` is the drop time in Unix seconds;
    ``ssl_options`` are redis-py's TLS arguments for the broker.
    """
    queue = str((getattr(request, "delivery_info", None) or {}).get("routing_key") or "?")
    if reason is None:
        reason = f"argument 'task' is not a step task ({type(error).__name__}: {error})"
    try:
        raw = json.dumps(task, default=repr)
    except ValueError:  # a circular structure; Celery's JSON cannot produce one
        raw = repr(task)
    what = f"task {getattr(request, 'id', None)}"
    if not broker_url or urlsplit(broker_url).scheme not in ("redis", "rediss"):
        bury(None, queue, reason, raw, what=what, now=now)
        return
    dead = DeadLetterList.from_url(broker_url, ssl_options)
    try:
        bury(dead, queue, reason, raw, what=what, now=now)
    finally:
        dead.client.close()


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, screening every popped message before kombu parses it."""

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous=asynchronous)
        if asynchronous:
            # The asynchronous client is the one that BRPOPs for the consumer: its replies
            # are screened here, before kombu's own parsing can raise.
            client.set_response_callback("BRPOP", self._screen_brpop_reply)
        return client

    def _screen_brpop_reply(self, reply: Any, **_options: Any) -> Any:
        """The BRPOP reply, or None (kombu's "nothing yet", it polls again) for a bad message."""
        if not reply:
            return reply
        key, raw = reply
        reason = check_message(raw)
        if reason is None:
            return reply
        queue = self._queue_of(key)
        bury(self._dead_letters(), queue, reason, raw, what="a message", now=time.time())
        return None

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        # Broadcasts (Celery's control commands) arrive already parsed, over pub/sub.
        reason = check_envelope(message)
        if reason is None:
            return bool(super()._deliver_fanout_message(message, exchange))
        queue = self._fanout_to_queue.get(exchange, exchange)
        raw = json.dumps(message, default=repr)
        bury(self._dead_letters(), queue, reason, raw, what="a broadcast", now=time.time())
        return False

    def _dead_letters(self) -> DeadLetterList:
        # A client of the channel's ordinary pool, not the one waiting in BRPOP.
        return DeadLetterList(self._create_client())

    def _queue_of(self, key: bytes | str) -> str:
        name = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
        prefix = self.global_keyprefix or ""
        if prefix and name.startswith(prefix):
            name = name[len(prefix) :]
        # Priority levels live on "<queue><sep><priority>" lists.
        return name.rsplit(self.sep, 1)[0]


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`: bad messages are dead-lettered, not fatal.

    Serves ``redis://`` URLs (``rediss://`` ones through :class:`TLSTransport`).
    """

    Channel = Channel


class TLSTransport(Transport):
    """:class:`Transport` for ``rediss://`` URLs; a second name only, so URLs show ``rediss``."""
