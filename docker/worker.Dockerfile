# CPU worker: consumes the "cpu" queue. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t zenml-workers-worker .
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

# The worker answers a broadcast ping from its own node name (celery@<container hostname>).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "celery -A zenml_workers.worker inspect ping --timeout 10 -d celery@$HOSTNAME"]

ENTRYPOINT ["celery", "-A", "zenml_workers.worker", "worker"]
CMD ["-Q", "cpu", "--loglevel=INFO", "-E"]
