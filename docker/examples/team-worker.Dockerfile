# A team's worker image on top of zenml-workers' own: copy this file into the team's repository.
# Build the base once, in the zenml-workers repository (or `docker-compose build worker-cpu`):
#   docker build -f docker/worker.Dockerfile -t zenml-workers-worker:0.1.0 .
# then, in the team's repository (its pipeline packages under src/, its pins in requirements.txt):
#   docker build -f team-worker.Dockerfile -t registry.example.com/ml-team/zw-worker:1.0 .
#   docker push registry.example.com/ml-team/zw-worker:1.0    # ZW_WORKER_IMAGE on worker VMs
# For the GPU worker, the same with FROM zenml-workers-worker-gpu:0.1.0 (its pip is the venv's).
# Keep a .dockerignore like zenml-workers' own, so .env, keys and certificates stay out.
FROM zenml-workers-worker:0.1.0

# The base runs as zw (10001); installing into its Python needs root (0) for these two steps.
USER 0:0
COPY requirements.txt /opt/zw-team-requirements.txt
# `pip check` fails the build when a team pin breaks a package zenml-workers needs.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -r /opt/zw-team-requirements.txt \
    && pip check
# The team's pipeline packages, laid out as on the clients that submit: workers import steps by
# module name from /opt/zw-team (PYTHONPATH). Root-owned, so steps cannot rewrite them.
COPY src/ /opt/zw-team/

# Entrypoint (`zw worker`), command and health check are the base image's.
USER 10001:10001
