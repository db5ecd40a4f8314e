"""Bad stacks fail at submit time with one sentence, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from stores.metadata.models import RunRow
from stores.metadata.store import MetadataStore
from tests.pipelines import basic
from zenml_workers import submit
from zenml_workers.errors import ArtifactStoreCredentialsError, ArtifactStoreError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings


@pytest.fixture(autouse=True)
def _close() -> None:
    yield
    close_stacks()


def _runs(url: str) -> int:
    store = MetadataStore(url)
    try:
        with store.read() as s:
            return s.execute(select(func.count()).select_from(RunRow)).scalar_one()
    finally:
        store.dispose()


@pytest.mark.services
def test_submit_with_a_wrong_s3_secret_names_the_setting_and_writes_nothing(
    s3_server, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        artifact_uri=f"s3://{s3_server.make_bucket()}/a",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key="wrong-secret",
        s3_region=s3_server.region,
    )
    with pytest.raises(ArtifactStoreCredentialsError, match="ZW_S3_SECRET_ACCESS_KEY"):
        submit(basic.chain, settings=settings, n=2)
    assert _runs(settings.resolved_metadata_url()) == 0


@pytest.mark.services
def test_submit_to_a_missing_bucket_says_to_create_it(s3_server, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        artifact_uri="s3://no-such-bucket-zw/a",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key,
        s3_region=s3_server.region,
    )
    with pytest.raises(ArtifactStoreError, match="ZW_ARTIFACT_URI"):
        submit(basic.chain, settings=settings, n=2)
    assert _runs(settings.resolved_metadata_url()) == 0


@pytest.mark.services
def test_submit_with_an_unreachable_broker_records_the_run_for_the_scheduler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from stores.metadata import queries as q
    from stores.metadata.models import StepRunRow
    from tests.services.process import free_port

    settings = Settings(
        home=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0", secret_key="k"
    )
    handle = submit(basic.chain, settings=settings, n=2)

    assert handle.status == "running"
    with MetadataStore(settings.resolved_metadata_url()).read() as s:
        queued = s.execute(
            select(StepRunRow.queued_at).where(
                StepRunRow.run_id == handle.id, StepRunRow.status == "queued"
            )
        ).scalars()
        assert list(queued) == [q.UNSENT]  # the scheduler's next pass sends it
    warning = next(r.getMessage() for r in caplog.records if "broker" in r.getMessage())
    assert "cannot reach the broker at redis://127.0.0.1" in warning
    assert "zw scheduler" in warning and "ZW_BROKER_URL" in warning
