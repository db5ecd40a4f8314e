"""Step caching on the embedded default: hits reuse artifacts, changes re-run only what they touch."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from stores.metadata.models import ArtifactRow
from tests.pipelines import basic, caching, edited_v1, edited_v2, fixtures
from tests.pipelines.fixtures import artifact_files
from zenml_workers import Client
from zenml_workers.sdk.client import RunView
from zenml_workers.sdk.stack import get_stack
from zenml_workers.settings import Settings

#: The embedded-default stack fixture, used by name as a test argument.
local_stack = fixtures.local_stack


def _statuses(run: RunView) -> dict[str, str]:
    return {inv: st.status for inv, st in run.steps.items()}


def _artifact_count(settings: Settings) -> int:
    with get_stack(settings).metadata.read() as s:
        return int(s.execute(select(func.count()).select_from(ArtifactRow)).scalar_one())


def test_rerun_is_all_cache_hits_reusing_the_same_artifacts(local_stack: Settings) -> None:
    first = basic.diamond(n=3)
    rows_before, files_before = _artifact_count(local_stack), artifact_files(local_stack)

    second = basic.diamond(n=3)

    assert second.id != first.id
    assert second.status == "completed"
    assert set(_statuses(second).values()) == {"cached"}
    for inv, st in second.steps.items():
        assert st.cached_from_run_id == first.id, inv
        assert st.is_cached
        assert st.cache_key == first.steps[inv].cache_key
        assert {n: a.id for n, a in st.outputs.items()} == {
            n: a.id for n, a in first.steps[inv].outputs.items()
        }
        assert {n: a.producer_run_id for n, a in st.outputs.items()} == {
            n: first.id for n in st.outputs
        }
    # No copies: neither new artifact rows nor new files.
    assert _artifact_count(local_stack) == rows_before
    assert artifact_files(local_stack) == files_before
    assert second.steps["combine"].output.load() == 10
    assert Client().explain_cache(second, "combine") == [
        f"cache hit: reused the outputs of run {first.id}"
    ]


def test_changed_parameter_reruns_only_downstream_steps(local_stack: Settings) -> None:
    first = caching.scaled(n=3, factor=2.0)
    second = caching.scaled(n=3, factor=3.0)

    assert _statuses(second) == {
        "base": "cached",
        "scale": "completed",
        "shift": "completed",
        "unrelated": "cached",
    }
    assert second.steps["shift"].output.load() == 10.0
    assert second.steps["base"].output.id == first.steps["base"].output.id
    reasons = Client().explain_cache(second, "scale")
    assert len(reasons) == 1
    assert "parameters changed" in reasons[0] and "factor" in reasons[0]
    assert '"factor":2.0' in reasons[0] and '"factor":3.0' in reasons[0]
    assert Client().explain_cache(second, "shift") == ["the content of input 'x' changed"]
    assert Client().explain_cache(second, "base")[0].startswith("cache hit")


def test_step_with_enable_cache_false_always_reruns(local_stack: Settings) -> None:
    first = caching.uncached_upstream(n=3)
    second = caching.uncached_upstream(n=3)

    assert first.steps["always_runs"].status == "completed"
    assert second.steps["always_runs"].status == "completed"
    assert second.steps["always_runs"].output.id != first.steps["always_runs"].output.id
    assert Client().explain_cache(second, "always_runs") == ["caching is disabled for this step"]


def test_byte_identical_upstream_output_keeps_downstream_cached(local_stack: Settings) -> None:
    first = caching.uncached_upstream(n=3)
    second = caching.uncached_upstream(n=3)

    upstream_1, upstream_2 = first.steps["always_runs"].output, second.steps["always_runs"].output
    assert upstream_1.id != upstream_2.id
    assert upstream_1.content_hash == upstream_2.content_hash
    assert second.steps["scale"].status == "cached"
    assert second.steps["shift"].status == "cached"
    assert second.steps["scale"].cached_from_run_id == first.id
    assert second.steps["shift"].output.id == first.steps["shift"].output.id

    third = caching.uncached_upstream(n=4)
    assert _statuses(third) == {
        "always_runs": "completed",
        "scale": "completed",
        "shift": "completed",
    }


def test_pipeline_with_options_enable_cache_false_reruns_everything(local_stack: Settings) -> None:
    basic.chain(n=3)
    uncached = basic.chain.with_options(enable_cache=False)

    second = uncached(n=3)

    assert set(_statuses(second).values()) == {"completed"}
    third = basic.chain(n=3)  # the original pipeline still caches
    assert set(_statuses(third).values()) == {"cached"}


def test_step_with_options_enable_cache_false_overrides_the_pipeline(local_stack: Settings) -> None:
    from zenml_workers import pipeline

    add_uncached = basic.add.with_options(enable_cache=False)

    @pipeline(name="chain_with_uncached_add")
    def chain_with_uncached_add(n: int = 3) -> None:
        basic.multiply(add_uncached(basic.source(n=n)))

    chain_with_uncached_add(n=3)
    second = chain_with_uncached_add(n=3)

    assert _statuses(second) == {"source": "cached", "add": "completed", "multiply": "cached"}


def test_edited_step_body_changes_the_cache_key(local_stack: Settings) -> None:
    first = edited_v1.edited(x=3)
    second = edited_v2.edited(x=3)

    assert first.pipeline == second.pipeline == "edited"
    v1, v2 = first.steps["transform"], second.steps["transform"]
    assert v1.name == v2.name == "transform"
    assert v2.status == "completed"
    assert v1.cache_key != v2.cache_key
    assert (v1.output.load(), v2.output.load()) == (6, 9)
    assert Client().explain_cache(second, "transform") == ["the step's code changed"]
    # Back to version 1: its earlier result is reused.
    third = edited_v1.edited(x=3)
    assert third.steps["transform"].status == "cached"
    assert third.steps["transform"].cached_from_run_id == first.id


def test_parameter_dict_order_and_float_spelling_do_not_change_the_key(
    local_stack: Settings,
) -> None:
    first = caching.with_config(
        config={"alpha": 1, "beta": [1, 2], "gamma": {"x": 1, "y": 2}}, lr=0.001
    )
    second = caching.with_config(
        config={"gamma": {"y": 2, "x": 1}, "beta": [1, 2], "alpha": 1}, lr=1e-3
    )

    assert second.steps["configured"].status == "cached"
    assert second.steps["configured"].cache_key == first.steps["configured"].cache_key
    third = caching.with_config(
        config={"alpha": 1, "beta": [2, 1], "gamma": {"x": 1, "y": 2}}, lr=1e-3
    )
    assert third.steps["configured"].status == "completed"


def test_explain_cache_names_the_changed_parameter(local_stack: Settings) -> None:
    basic.chain(n=3)
    run = basic.chain(n=5)

    source_reasons = Client().explain_cache(run, "source")
    assert source_reasons == ['its parameters changed: {"n":3} -> {"n":5}']
    assert Client().explain_cache(run, "add") == ["the content of input 'x' changed"]
    assert Client().explain_cache(run.id, "multiply") == ["the content of input 'x' changed"]


def test_explain_cache_on_a_first_run_says_nothing_to_reuse(local_stack: Settings) -> None:
    run = basic.chain(n=3)

    reasons = Client().explain_cache(run, "source")
    assert len(reasons) == 1 and "no earlier run" in reasons[0]


def test_zw_enable_cache_false_disables_caching_for_every_pipeline(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    basic.chain(n=3)
    monkeypatch.setenv("ZW_ENABLE_CACHE", "false")

    second = basic.chain(n=3)

    assert set(_statuses(second).values()) == {"completed"}
