#!/usr/bin/env bash
# Drain this VM's zenml-workers workers when the cloud announces a preemption (a spot or
# preemptible VM about to be taken back): stop every zw-worker@ unit, which sends SIGTERM to
# each worker's main process; Celery's warm shutdown takes no new step, finishes or hands back
# the running ones, and the scheduler requeues whatever the VM takes down with it.
#
# Run by zw-preemption-watch.service. Settings (environment):
#   ZW_PREEMPTION_URL     the metadata endpoint that tells of a preemption; default by cloud:
#                         GCE  .../computeMetadata/v1/instance/preempted (answers TRUE)
#                         AWS  .../latest/meta-data/spot/instance-action (200 with a notice)
#   ZW_CLOUD              gce (default) or aws: how to ask and what a notice looks like
#   ZW_DRAIN_COMMAND      what drains the workers (default: systemctl stop --no-block 'zw-worker@*')
#   ZW_POLL_INTERVAL_S    seconds between looks when the endpoint cannot wait (default 5)
set -uo pipefail

cloud="${ZW_CLOUD:-gce}"
interval="${ZW_POLL_INTERVAL_S:-5}"
drain="${ZW_DRAIN_COMMAND:-systemctl stop --no-block zw-worker@*.service}"

case "$cloud" in
    gce) url="${ZW_PREEMPTION_URL:-http://metadata.google.internal/computeMetadata/v1/instance/preempted}" ;;
    aws) url="${ZW_PREEMPTION_URL:-http://169.254.169.254/latest/meta-data/spot/instance-action}" ;;
    *) echo "zw-preemption-watch: ZW_CLOUD must be gce or aws, not '$cloud'" >&2; exit 2 ;;
esac

log() { printf 'zw-preemption-watch: %s\n' "$*" >&2; }

# Whether the endpoint announces a preemption now.
preempted() {
    local body
    if [ "$cloud" = gce ]; then
        # wait_for_change blocks until the value changes (or the timeout), so this loop is cheap.
        body="$(curl -sf -H 'Metadata-Flavor: Google' "$url?wait_for_change=true&timeout_sec=60")" || return 1
        [ "$body" = TRUE ]
    else
        local token
        token="$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
            "${url%%/latest/*}/latest/api/token")" || token=""
        body="$(curl -sf ${token:+-H "X-aws-ec2-metadata-token: $token"} "$url")" || return 1
        [ -n "$body" ]
    fi
}

log "watching $url"
until preempted; do
    sleep "$interval"
done
log "preemption notice: draining the workers ($drain)"
# Word splitting is wanted (the command and its arguments), globbing is not: systemctl
# matches zw-worker@*.service against its units itself.
set -f
# shellcheck disable=SC2086
exec $drain
