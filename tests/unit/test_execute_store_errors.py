"""Saving outputs: an unreachable store is retried and then named, never blamed on a materializer."""

from __future__ import annotations

import uuid
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.backoff import Backoff
from scheduler.specs import OutputSpec, StepSpec
from stores.artifacts.memory import MemoryArtifactStore
from stores.errors import ArtifactStoreError, ArtifactStoreUnavailableError
from zenml_workers.errors import MaterializerError
from zenml_workers.worker.outputs import store_outputs as _store_outputs

JSON = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"
STEP = StepSpec(
    invocation_id="train",
    name="train",
    code_hash="sha256:c",
    source_hash="sha256:s",
    outputs=(OutputSpec("model", "builtins:int", JSON),),
)


class FlakyStore(MemoryArtifactStore):
    """A memory store whose first ``failures`` writes fail like an unreachable S3."""

    def __init__(self, failures: int) -> None:
        super().__init__("flaky")
        self.failures = failures

    def _open_writer(self, key: str) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise ArtifactStoreUnavailableError(f"Cannot reach S3 at http://s3:9000 to write {key}")
        return super()._open_writer(key)


def _save(store: FlakyStore, value: Any, budget_s: float) -> list[dict[str, Any]]:
    written: list[str] = []
    backoff = Backoff(base_s=0.001, cap_s=0.002, budget_s=budget_s)
    row = SimpleNamespace(run_id=str(uuid.uuid4()), id="sr-1")  # the memory store is process-wide
    return _store_outputs(STEP, value, row, 1, store, written, now=0.0, backoff=backoff)


def test_store_outputs_retries_an_unreachable_store_then_saves() -> None:
    store = FlakyStore(failures=2)

    artifacts = _save(store, 41, budget_s=5)

    assert [a["name"] for a in artifacts] == ["model"]
    assert store.get_bytes(artifacts[0]["uri"]) == b"41"


def test_store_outputs_names_the_store_when_it_stays_away() -> None:
    store = FlakyStore(failures=10_000)

    with pytest.raises(ArtifactStoreUnavailableError, match="Cannot reach S3") as info:
        _save(store, 41, budget_s=0.01)

    assert not isinstance(info.value, MaterializerError)
    assert "materializer" not in str(info.value).lower()


def test_store_outputs_still_blames_a_value_no_materializer_can_save() -> None:
    with pytest.raises(MaterializerError, match="register a materializer"):
        _save(FlakyStore(failures=0), (x for x in "not picklable"), budget_s=1)


@pytest.mark.parametrize(
    ("invocation_id", "output"),
    [("train", "v#x"), ("train", "v?x"), ("train", "../../../escape"), ("../other-run", "model")],
    ids=["hash", "query", "dotdot-output", "dotdot-step"],
)
def test_store_outputs_refuses_a_name_that_would_leave_its_key(
    invocation_id: str, output: str
) -> None:
    # Definition-time checks refuse these names; a spec made by hand must still not escape
    # its run's folder or collide with another output once its URI is parsed.
    spec = replace(
        STEP, invocation_id=invocation_id, outputs=(OutputSpec(output, "builtins:int", JSON),)
    )
    store = FlakyStore(failures=0)
    before = dict(store.objects)
    row = SimpleNamespace(run_id=str(uuid.uuid4()), id="sr-1")

    with pytest.raises(ArtifactStoreError, match="relative path"):
        _store_outputs(spec, 41, row, 1, store, [], now=0.0, backoff=Backoff(0.001, 0.002, 0.01))

    assert store.objects == before
