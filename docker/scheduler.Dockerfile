# Scheduler: plans runs, dispatches ready steps to the queues and recovers expired leases.
#   docker build -f docker/scheduler.Dockerfile -t zenml-workers-scheduler:0.1.0 .
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 zw \
    && useradd --system --uid 10001 --gid zw --create-home --home-dir /home/zw zw

WORKDIR /app
COPY pyproject.toml README.md ./
COPY zenml_workers ./zenml_workers
COPY scheduler ./scheduler
COPY stores ./stores
# "." is this project, not a registry package; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres]"

USER 10001:10001
WORKDIR /home/zw

# No HEALTHCHECK: the scheduler serves no port; compose restarts it when it exits.
ENTRYPOINT ["zw", "scheduler"]
