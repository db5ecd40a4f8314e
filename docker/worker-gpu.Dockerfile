# GPU worker: `zw worker` on the "gpu" queue, one step at a time (pool solo: a CUDA context
# cannot be shared with forked pool children), node name gpu@<hostname>. Needs the NVIDIA
# container runtime on the host. From the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t zenml-workers-worker-gpu:0.1.0 .
# Build arguments as in worker.Dockerfile (EXTRAS, TEAM_REQUIREMENTS, TEAM_CODE).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# Extras of this project (pyproject.toml): torch, and what examples/quickstart.py imports.
ARG EXTRAS=torch,postgres,numpy,pandas
# pip requirements file of the team's packages, resolved together with this project's.
ARG TEAM_REQUIREMENTS=docker/team/requirements.txt
# Folder of the team's pipeline modules: copied to /opt/zw-team, which is on PYTHONPATH.
ARG TEAM_CODE=docker/team

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/zw-team

# Ubuntu's security updates replace exact versions, so pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && groupadd --system --gid 10001 zw \
    && useradd --system --uid 10001 --gid zw --create-home --home-dir /home/zw zw

WORKDIR /app
COPY pyproject.toml README.md ./
COPY zenml_workers ./zenml_workers
COPY scheduler ./scheduler
COPY stores ./stores
COPY ${TEAM_REQUIREMENTS} /opt/zw-team-requirements.txt
# "." is this project, not a registry package; its dependencies are bounded in pyproject.toml.
# PyPI's Linux torch wheel bundles its own CUDA libraries. One resolution for both, and
# `pip check`, so a team pin that breaks ours fails the build.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[${EXTRAS}]" -r /opt/zw-team-requirements.txt \
    && pip check
# Last: code changes most often and needs no reinstall. Root-owned, so steps cannot rewrite it.
COPY ${TEAM_CODE} /opt/zw-team/

USER 10001:10001
WORKDIR /home/zw

HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A zenml_workers.worker inspect ping --timeout 10 -d gpu@$HOSTNAME"]

ENTRYPOINT ["zw", "worker"]
CMD ["--queues", "gpu", "--concurrency", "1", "--pool", "solo", "--hostname", "gpu@%h"]
