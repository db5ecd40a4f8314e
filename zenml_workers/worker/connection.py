"""The broker connection class of our Celery apps: its URL, as banners and logs show it.

kombu writes its mask in the password slot whether or not the URL has a password, so a
worker on ``redis://host:6379/0`` shows ``redis://:**@host:6379/0`` in its banner, its
"Connected to" line and Flower: it reads as "a password is set" to whoever is debugging a
refused connection. :class:`Connection` masks only a password that exists; it never shows
one. Apps get it through :class:`AMQP` (``Celery(amqp=AMQP_CLASS)``).
"""

from __future__ import annotations

from typing import Any

import kombu
from celery.app.amqp import AMQP as _CeleryAMQP

__all__ = ["AMQP", "AMQP_CLASS", "Connection"]

#: What ``Celery(amqp=...)`` takes to build its connections with :class:`Connection`.
AMQP_CLASS = "zenml_workers.worker.connection:AMQP"


class Connection(kombu.Connection):  # type: ignore[misc]
    """A kombu connection whose shown URL has a masked password only when it has one."""

    def as_uri(
        self, include_password: bool = False, mask: str = "**", *args: Any, **kwargs: Any
    ) -> str:
        if not include_password and not self.password:
            mask = ""  # nothing to hide: no ":**" slot (kombu leaves out an empty one)
        uri: str = super().as_uri(include_password, mask, *args, **kwargs)
        return uri


class AMQP(_CeleryAMQP):  # type: ignore[misc]
    """Celery's AMQP helpers with :class:`Connection` as the connection class."""

    Connection = Connection
