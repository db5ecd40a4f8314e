#!/usr/bin/env bash
# Start-up script of an instance group's worker VMs (GCE managed instance group metadata
# "startup-script", or an AWS launch template's user data): installs zenml-workers, writes the
# stack's settings from the cloud's secret store, and starts one worker per queue plus the
# preemption watcher. Idempotent: it runs again on every boot.
#
# Instance metadata / tags it reads (environment when run by hand):
#   ZW_QUEUES_HERE         queues this VM's workers consume, e.g. "cpu" or "gpu" (default cpu)
#   ZW_WORKER_CONCURRENCY  steps per worker (default: the number of CPUs; 1 for gpu)
#   ZW_PACKAGE             what pip installs (default "zenml-workers[postgres]"; pin a version)
#   ZW_TEAM_REQUIREMENTS   a requirements file with the team's step code and packages (optional)
#   ZW_STACK_SECRET        the secret holding stack.env (default zw-stack)
#   ZW_KEY_SECRET          the secret holding the signing key (default zw-signing-key)
#   ZW_CLOUD               gce (default) or aws
set -euo pipefail

queues="${ZW_QUEUES_HERE:-cpu}"
cloud="${ZW_CLOUD:-gce}"
package="${ZW_PACKAGE:-zenml-workers[postgres]}"
prefix=/opt/zenml-workers
conf=/etc/zenml-workers

log() { printf 'zw-startup: %s\n' "$*" >&2; }

# Read a secret's value from the cloud's secret store.
secret() {
    case "$cloud" in
        gce) gcloud secrets versions access latest --secret="$1" ;;
        aws) aws secretsmanager get-secret-value --secret-id "$1" --query SecretString --output text ;;
        *) log "ZW_CLOUD must be gce or aws, not '$cloud'"; exit 2 ;;
    esac
}

id zw >/dev/null 2>&1 || useradd --system --home-dir /var/lib/zenml-workers --shell /usr/sbin/nologin zw

if [ ! -x "$prefix/venv/bin/zw" ]; then
    log "installing $package"
    python3 -m venv "$prefix/venv"
    "$prefix/venv/bin/pip" install --quiet "$package"
    if [ -n "${ZW_TEAM_REQUIREMENTS:-}" ]; then
        "$prefix/venv/bin/pip" install --quiet -r "$ZW_TEAM_REQUIREMENTS"
    fi
fi

# Secrets: written with a umask that keeps them to root and the zw group, never echoed.
install -d -m 0750 -o root -g zw "$conf"
(umask 027 && secret "${ZW_KEY_SECRET:-zw-signing-key}" >"$conf/signing.key")
(umask 027 && secret "${ZW_STACK_SECRET:-zw-stack}" >"$conf/stack.env")
chgrp zw "$conf/signing.key" "$conf/stack.env"
grep -q '^ZW_SECRET_KEY_FILE=' "$conf/stack.env" || echo "ZW_SECRET_KEY_FILE=$conf/signing.key" >>"$conf/stack.env"
concurrency="${ZW_WORKER_CONCURRENCY:-$(nproc)}"
case "$queues" in gpu) concurrency=1 ;; esac
sed -i '/^ZW_WORKER_CONCURRENCY=/d' "$conf/stack.env"
echo "ZW_WORKER_CONCURRENCY=$concurrency" >>"$conf/stack.env"
echo "ZW_CLOUD=$cloud" >"$conf/preemption.env"

# The units ship in the package's deploy/vm folder; copied next to the venv by the image build
# or fetched with the package's source.
install -d "$prefix/bin"
install -m 0755 "$(dirname "$0")/zw-preemption-watch.sh" "$prefix/bin/zw-preemption-watch.sh"
install -m 0644 "$(dirname "$0")/zw-worker@.service" /etc/systemd/system/zw-worker@.service
install -m 0644 "$(dirname "$0")/zw-preemption-watch.service" /etc/systemd/system/zw-preemption-watch.service
systemctl daemon-reload
systemctl enable --now zw-preemption-watch.service
for queue in ${queues//,/ }; do
    systemctl enable --now "zw-worker@$queue.service"
done
log "started workers for: $queues (concurrency $concurrency)"
