"""Queries on stack records (``stacks``): the stacks a team registers and shares.

A record's ``components`` is JSON whose secrets are references only (``{"env": "VAR"}`` or
``{"file": "/path"}``); checking that is the caller's job. Visibility: a shared record is
seen by everyone, a private one by its ``owner`` only, and these queries apply that rule,
so a private stack of someone else reads as absent.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from stores.metadata.models import StackRow


def _visible_to(user: str) -> Any:
    return or_(StackRow.shared.is_(True), StackRow.owner == user)


def get_stack(s: Session, name: str, *, user: str) -> StackRow | None:
    """The record named ``name`` if ``user`` may see it (shared, or theirs), else None."""
    return s.execute(
        select(StackRow).where(StackRow.name == name, _visible_to(user))
    ).scalar_one_or_none()


def name_taken(s: Session, name: str) -> bool:
    """Whether any record, visible to the caller or not, already has this name."""
    return s.execute(select(StackRow.id).where(StackRow.name == name)).first() is not None


def list_stacks(s: Session, *, user: str) -> list[StackRow]:
    """The records ``user`` may see (shared ones and their own), by name."""
    return list(
        s.execute(select(StackRow).where(_visible_to(user)).order_by(StackRow.name)).scalars()
    )


def insert_stack(
    s: Session,
    *,
    name: str,
    owner: str,
    shared: bool,
    components: dict[str, Any],
    description: str,
    now: float,
) -> StackRow:
    """Add a record; the unique name makes a concurrent second insert fail at flush."""
    row = StackRow(
        id=str(uuid.uuid4()),
        name=name,
        owner=owner,
        shared=shared,
        components=components,
        description=description,
        created_at=now,
        updated_at=now,
    )
    s.add(row)
    s.flush()
    return row


def set_shared(s: Session, stack_id: str, *, now: float) -> None:
    s.execute(update(StackRow).where(StackRow.id == stack_id).values(shared=True, updated_at=now))


def delete_stack(s: Session, stack_id: str) -> None:
    s.execute(delete(StackRow).where(StackRow.id == stack_id))
