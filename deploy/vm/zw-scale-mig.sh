#!/usr/bin/env bash
# Resize a worker instance group to what a queue wants, from `zw queues` (run it every minute
# from a cron job or a systemd timer on the scheduler's VM, with the stack's settings):
#   wanted = min(--max-workers, ceil((ready + running) / concurrency per worker))
# Scaling in stops VMs; each one's workers get SIGTERM (warm shutdown) on the way down.
#
# Usage: zw-scale-mig.sh QUEUE MAX_WORKERS CONCURRENCY
# Environment:
#   ZW_RESIZE_COMMAND  what sets the group's size; "{size}" is replaced by the number. Default:
#                      gcloud compute instance-groups managed resize $ZW_MIG --zone $ZW_ZONE --size {size}
#   ZW_MIG, ZW_ZONE    the default command's instance group (zw-workers-QUEUE) and zone
#   ZW_BIN             the zw executable (default: zw on PATH)
set -euo pipefail

if [ "$#" -ne 3 ]; then
    echo "usage: zw-scale-mig.sh QUEUE MAX_WORKERS CONCURRENCY" >&2
    exit 2
fi
queue="$1" max_workers="$2" concurrency="$3"
zw="${ZW_BIN:-zw}"
default_resize="gcloud compute instance-groups managed resize ${ZW_MIG:-zw-workers-$queue} --zone ${ZW_ZONE:-europe-west4-a} --size {size}"
resize="${ZW_RESIZE_COMMAND:-$default_resize}"

wanted="$("$zw" queues --json --max-workers "$max_workers" --concurrency "$concurrency" |
    python3 -c 'import json, sys
queue = sys.argv[1]
rows = [json.loads(line) for line in sys.stdin if line.strip()]
print(next((r["wanted"] for r in rows if r["queue"] == queue), 0))' "$queue")"
echo "zw-scale-mig: queue $queue wants $wanted worker(s)" >&2
# Word splitting is wanted (the command and its arguments), globbing is not.
set -f
placeholder='{size}'
command="${resize//"$placeholder"/$wanted}"
# shellcheck disable=SC2086
exec $command
