# CPU worker: `zw worker` on the "cpu" queue, node name cpu@<hostname>. From the repository root:
#   docker build -f docker/worker.Dockerfile -t zenml-workers-worker:0.1.0 .
# The team's packages and code go in with build arguments (paths inside the build context):
#   docker build -f docker/worker.Dockerfile -t zenml-workers-worker:0.1.0 \
#     --build-arg TEAM_REQUIREMENTS=docker/team/requirements.txt --build-arg TEAM_CODE=docker/team .
# or, from the team's own repository, on top of this image: docker/examples/team-worker.Dockerfile.
FROM python:3.11.9-slim-bookworm

# Extras of this project (pyproject.toml); the default has what examples/quickstart.py imports.
ARG EXTRAS=postgres,numpy,pandas
# pip requirements file of the team's packages, resolved together with this project's.
ARG TEAM_REQUIREMENTS=docker/team/requirements.txt
# Folder of the team's pipeline modules: copied to /opt/zw-team, which is on PYTHONPATH.
ARG TEAM_CODE=docker/team

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/zw-team

RUN groupadd --system --gid 10001 zw \
    && useradd --system --uid 10001 --gid zw --create-home --home-dir /home/zw zw

WORKDIR /app
COPY pyproject.toml README.md ./
COPY zenml_workers ./zenml_workers
COPY scheduler ./scheduler
COPY stores ./stores
COPY ${TEAM_REQUIREMENTS} /opt/zw-team-requirements.txt
# "." is this project, not a registry package; its dependencies are bounded in pyproject.toml.
# One resolution for both, and `pip check`, so a team pin that breaks ours fails the build.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[${EXTRAS}]" -r /opt/zw-team-requirements.txt \
    && pip check
# Last: code changes most often and needs no reinstall. Root-owned, so steps cannot rewrite it.
COPY ${TEAM_CODE} /opt/zw-team/

USER 10001:10001
WORKDIR /home/zw

# The worker answers a broadcast ping from its own node name.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "celery -A zenml_workers.worker inspect ping --timeout 10 -d cpu@$HOSTNAME"]

ENTRYPOINT ["zw", "worker"]
CMD ["--queues", "cpu", "--hostname", "cpu@%h"]
