"""Unit tests for ``zenml_workers.worker.broker``: which popped messages kombu could deliver."""

from __future__ import annotations

import base64
import copy
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.utils.json import dumps

from zenml_workers.worker.broker import (
    DEAD_LETTER_LIMIT,
    PREVIEW_BYTES,
    RAW_LIMIT_BYTES,
    TLS_TRANSPORT,
    TRANSPORT,
    DeadLetter,
    celery_config,
    check_envelope,
    check_message,
    preview,
)


@pytest.fixture(scope="module")
def celery_envelope() -> Iterator[dict[str, Any]]:
    """A ``zw.step`` message exactly as kombu writes it to a Redis list (virtual transport)."""
    app = Celery("envelope", broker="memory://", set_as_current=False)
    app.conf.task_create_missing_queues = True
    app.send_task("zw.step", kwargs={"task": {"run_id": "r"}}, queue="cpu")
    with app.connection_for_read() as conn:
        payload = conn.default_channel._get("cpu")
    yield json.loads(dumps(payload))
    app.close()


def _with(envelope: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of ``envelope`` with the dotted ``path`` set to ``value`` (deleted: ...)."""
    out = copy.deepcopy(envelope)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


def test_check_envelope_accepts_a_celery_message_as_kombu_writes_it(
    celery_envelope: dict[str, Any],
) -> None:
    assert celery_envelope["properties"]["body_encoding"] == "base64"
    assert check_envelope(celery_envelope) is None
    assert check_message(dumps(celery_envelope).encode()) is None


def test_check_envelope_accepts_plain_text_and_empty_bodies(
    celery_envelope: dict[str, Any],
) -> None:
    plain = _with(celery_envelope, "properties.body_encoding", None)
    plain["body"] = '[[], {"task": {}}, {}]'

    assert check_envelope(plain) is None
    assert check_envelope(_with(plain, "properties.body_encoding", "UTF-8")) is None
    # Not a task message: kombu decodes only a non-empty body, so its encoding does not matter.
    untasked = _with(_with(plain, "headers", ...), "body", "")
    assert check_envelope(_with(untasked, "properties.body_encoding", "x")) is None


def test_check_envelope_accepts_a_plain_kombu_message() -> None:
    from kombu import Connection, Exchange, Queue

    with Connection("memory://") as conn:
        queue = Queue("plain", Exchange("plain"), routing_key="plain")
        conn.Producer().publish(
            {"hello": 1},
            exchange=queue.exchange,
            routing_key="plain",
            declare=[queue],
            headers={"x": 1},
        )
        payload = json.loads(dumps(conn.default_channel._get("plain")))

    assert payload["headers"] == {"x": 1}
    assert check_envelope(payload) is None


def _task_body(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("headers.task", ["zw.step"], "'headers.task' is a JSON list"),
        ("headers.id", ..., "'headers.id' is missing"),
        ("headers.id", 7, "'headers.id' is a JSON number"),
        ("headers.timelimit", "x", "'headers.timelimit' is 'x', not [hard, soft]"),
        ("headers.timelimit", [1, 2, 3], "'headers.timelimit' is [1, 2, 3]"),
        ("headers.timelimit", ["1", None], "'headers.timelimit' is ['1', None]"),
        ("body", _task_body({"x": 1}), "task body is a JSON object, not [args, kwargs, embed]"),
        ("body", _task_body([[], {}]), "task body is a JSON list, not [args, kwargs, embed]"),
        ("body", base64.b64encode(b"nope").decode(), "task body is not JSON"),
        ("body", "", "task body is not JSON"),
    ],
)
def test_check_envelope_names_what_celerys_consumer_cannot_read(
    celery_envelope: dict[str, Any], path: str, value: object, reason: str
) -> None:
    found = check_envelope(_with(celery_envelope, path, value))

    assert found is not None and found.startswith(reason), found


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("headers.timelimit", [30, None]),
        ("headers.timelimit", [30.5, 20]),
        ("headers.timelimit", None),
        ("body", _task_body({"args": [], "kwargs": {}, "id": "x", "task": "zw.step"})),  # hybrid
        ("body", _task_body([1, 2, 3])),  # a bad args/kwargs fails in the pool process, not here
        ("content-type", "application/x-python-serialize"),  # Celery refuses it itself
        ("headers.compression", "application/x-gzip"),  # Celery decompresses and checks
    ],
)
def test_check_envelope_leaves_the_rest_to_celery(
    celery_envelope: dict[str, Any], path: str, value: object
) -> None:
    assert check_envelope(_with(celery_envelope, path, value)) is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00\xff\xfe raw bytes", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2, 3]", "not a message envelope: a JSON list, not an object"),
        (b'"text"', "not a message envelope: a JSON string"),
        (b"42", "not a message envelope: a JSON number"),
        (b"null", "not a message envelope: a JSON null"),
        (b'{"__type__": "nope", "__value__": 1}', "not JSON kombu can read"),
    ],
)
def test_check_message_rejects_what_is_not_an_envelope(raw: bytes, reason: str) -> None:
    found = check_message(raw)

    assert found is not None and found.startswith(reason), found


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("properties", ..., "'properties' is missing"),
        ("properties", [1], "'properties' is a JSON list"),
        ("properties.delivery_tag", ..., "'properties.delivery_tag' is missing"),
        ("properties.delivery_tag", 7, "'properties.delivery_tag' is a JSON number"),
        ("properties.delivery_tag", "", "'properties.delivery_tag' is a JSON string, not a non"),
        ("properties.delivery_info", ..., "'properties.delivery_info' is missing"),
        ("properties.delivery_info", "cpu", "'properties.delivery_info' is a JSON string"),
        ("properties.delivery_info.routing_key", ..., "'properties.delivery_info.routing_key'"),
        ("properties.delivery_info.exchange", 0, "'properties.delivery_info.exchange' is a"),
        ("headers", ["task"], "'headers' is a JSON list"),
        ("content-type", 5, "'content-type' is a JSON number"),
        ("body", {"a": 1}, "'body' is a JSON object"),
        ("body", "not base64!", "'body' is not base64"),
        ("body", "\ud800\ud800\ud800\ud800", "'body' is not base64"),
        ("properties.body_encoding", "rot13", "'properties.body_encoding' is 'rot13'"),
        ("properties.body_encoding", "BASE64", "'properties.body_encoding' is 'BASE64'"),
    ],
)
def test_check_envelope_names_what_is_wrong(
    celery_envelope: dict[str, Any], path: str, value: object, reason: str
) -> None:
    found = check_envelope(_with(celery_envelope, path, value))

    assert found is not None and found.startswith(reason), found


def test_check_message_reads_json_as_kombu_does(celery_envelope: dict[str, Any]) -> None:
    # Undecodable bytes inside a string are replaced, as kombu's Redis transport does.
    raw = dumps(_with(celery_envelope, "headers.origin", "X")).encode().replace(b'"X"', b'"\xff"')

    assert check_message(raw) is None


def test_check_message_on_a_lone_surrogate_body_does_not_raise(
    celery_envelope: dict[str, Any],
) -> None:
    raw = dumps(celery_envelope).replace(celery_envelope["body"], "\\ud800").encode()

    assert (check_message(raw) or "").startswith("'body' is not base64")


def test_dead_letter_keeps_at_most_64_kib_of_the_message_as_text() -> None:
    letter = DeadLetter.of("cpu", "why", b"\xff" + b"a" * (2 * RAW_LIMIT_BYTES), now=12.5)

    assert len(letter.raw.encode("utf-8")) <= RAW_LIMIT_BYTES + 2  # the replaced first byte
    assert letter.raw.startswith("\ufffda")
    assert DeadLetter.decode(letter.encode()) == letter
    assert json.loads(letter.encode()).keys() == {"queue", "reason", "raw", "at"}


def test_dead_letter_decode_rejects_other_entries() -> None:
    with pytest.raises(ValueError, match="not a dead-letter record"):
        DeadLetter.decode(b'{"queue": "cpu"}')
    with pytest.raises(ValueError):
        DeadLetter.decode(b"junk")


def test_preview_is_a_short_repr_of_the_first_bytes() -> None:
    assert preview(b"abc") == "b'abc'"
    long = preview(b"x" * 500)
    assert long == repr(b"x" * PREVIEW_BYTES) + "..."
    assert "\n" not in preview("line\nbreak")


def test_celery_config_uses_the_transport_for_redis_urls_only() -> None:
    assert celery_config("redis://127.0.0.1:6379/0") == {"broker_transport": TRANSPORT}
    assert celery_config(None) == {}
    assert celery_config("amqp://guest@localhost//") == {}
    assert celery_config("memory://") == {}
    assert DEAD_LETTER_LIMIT == 1000


def test_celery_config_keeps_tls_for_rediss_urls() -> None:
    bare = celery_config("rediss://cache.example.com:6380/0")
    with_params = celery_config("rediss://cache.example.com:6380/0?ssl_cert_reqs=none")

    assert bare == {
        "broker_transport": TLS_TRANSPORT,
        "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED},
    }
    # The URL's own ssl_* parameters win; kombu reads them.
    assert with_params == {"broker_transport": TLS_TRANSPORT}


def test_celery_app_connections_use_the_transport_and_keep_the_url() -> None:
    from zenml_workers.settings import Settings
    from zenml_workers.worker.broker import TLSTransport, Transport
    from zenml_workers.worker.celery_app import create_app

    plain = create_app(Settings(broker_url="redis://127.0.0.1:6399/3"))
    tls = create_app(Settings(broker_url="rediss://cache.example.com:6380/0"))
    try:
        with plain.connection_for_read() as read, plain.connection_for_write() as write:
            assert type(read.transport) is Transport
            assert type(write.transport) is Transport
            assert read.as_uri(include_password=True) == "redis://127.0.0.1:6399/3"
            assert not read.ssl
        with tls.connection_for_read() as read:
            assert type(read.transport) is TLSTransport
            assert read.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
            assert read.as_uri(include_password=True) == "rediss://cache.example.com:6380/0"
            assert read.transport.Channel.connection_class_ssl is not None
    finally:
        plain.close()
        tls.close()


def test_base64_body_check_matches_kombus_decoder(celery_envelope: dict[str, Any]) -> None:
    # kombu decodes leniently (characters outside the alphabet are skipped): so do we.
    body = base64.b64encode(b"[[], {}, {}]").decode()
    lenient = body[:4] + "\n" + body[4:]

    assert check_envelope(_with(celery_envelope, "body", lenient)) is None
