#!/usr/bin/env bash
# Prepare a fresh Debian machine for `make demo`, `make test` and `make bench`.
#
# Usage: scripts/setup.sh [--demo | --no-services]
#   (default)      system services (redis-server, postgresql, docker-compose) and network tools
#                  (iproute2, util-linux, hostname) + .venv with [ml,test]
#   --no-services  only the virtualenv with [ml,test] (unit tests, lint)
#   --demo         only the virtualenv with [numpy,pandas] (the quickstart's needs); no servers
# Environment: ZW_SETUP_PROFILE=full|no-services|demo (same as the flags), ZW_VENV (default .venv),
#   ZW_TORCH_VERSION (default 2.13.0), PYTHON (default python3).
#
# Idempotent: apt runs only when a binary is missing, and pip runs only when pyproject.toml or
# this script changed since the last successful run (a stamp file inside the virtualenv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
self=scripts/setup.sh

profile="${ZW_SETUP_PROFILE:-full}"
for arg in "$@"; do
    case "$arg" in
        --demo) profile=demo ;;
        --no-services) profile=no-services ;;
        --full) profile=full ;;
        -h | --help) sed -n '2,13p' "$self"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg'; use --demo, --no-services or --full." >&2; exit 2 ;;
    esac
done
case "$profile" in
    full | no-services) extras="ml,test" ;;
    demo) extras="numpy,pandas" ;;
    *) echo "setup.sh: ZW_SETUP_PROFILE must be full, no-services or demo, not '$profile'." >&2; exit 2 ;;
esac

venv="${ZW_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="${ZW_TORCH_VERSION:-2.13.0}"
torch_cpu_index="https://download.pytorch.org/whl/cpu"

log() { printf 'setup: %s\n' "$*" >&2; }

# ---- system packages -------------------------------------------------------------------------
apt_missing=()
if ! command -v "$python" >/dev/null 2>&1; then
    apt_missing+=(python3 python3-venv)
elif [ ! -x "$venv/bin/python" ] && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian splits ensurepip out of python3; without it `python3 -m venv` fails.
    apt_missing+=(python3-venv)
fi
if [ "$profile" = full ]; then
    command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_missing+=(postgresql)
    command -v docker-compose >/dev/null 2>&1 || apt_missing+=(docker-compose)
    # `ip`, `unshare` and `hostname` build the "hosts" of the multi-host and partition tests.
    command -v ip >/dev/null 2>&1 || apt_missing+=(iproute2)
    command -v unshare >/dev/null 2>&1 || apt_missing+=(util-linux)
    command -v hostname >/dev/null 2>&1 || apt_missing+=(hostname)
    # The deployment-file tests: shell scripts linted, k8s manifests validated with node.
    command -v shellcheck >/dev/null 2>&1 || apt_missing+=(shellcheck)
    command -v npm >/dev/null 2>&1 || apt_missing+=(npm)
fi

if [ "${#apt_missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "setup.sh: missing system packages (${apt_missing[*]}) and not root; install them with apt-get as root, then rerun." >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: missing ${apt_missing[*]} and this is not a Debian/Ubuntu machine; install them with your package manager, then rerun." >&2
        exit 1
    fi
    log "installing ${apt_missing[*]} with apt-get"
    "${sudo[@]}" apt-get update -qq
    # --no-install-recommends: docker-compose would otherwise pull in the whole Docker engine.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# ---- node validators of the k8s manifests (tests/k8s/package.json) -----------------------------
k8s_dir=tests/k8s
k8s_stamp="$k8s_dir/node_modules/.zw-setup.stamp"
if [ "$profile" = full ] && ! { [ -f "$k8s_stamp" ] && [ "$(cat "$k8s_stamp")" = "$(sha256sum <"$k8s_dir/package.json")" ]; }; then
    log "installing the Kubernetes and KEDA schema validators into $k8s_dir (npm)"
    # No lock file: package.json pins the three packages it names.
    npm install --prefix "$k8s_dir" --no-audit --no-fund --no-package-lock --loglevel=error >/dev/null
    sha256sum <"$k8s_dir/package.json" >"$k8s_stamp"
fi

# ---- virtualenv --------------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

key="$(cat pyproject.toml "$self" | sha256sum | cut -d' ' -f1)"
stamp_of() { printf '%s/.zw-setup-%s.stamp' "$venv" "$1"; }
stamp_ok() { [ -f "$(stamp_of "$1")" ] && [ "$(cat "$(stamp_of "$1")")" = "$key" ]; }

# The [ml,test] install is a superset of [ml], so a full stamp satisfies the demo too.
if stamp_ok "$extras" || { [ "$extras" = numpy,pandas ] && stamp_ok "ml,test"; }; then
    log "$venv is up to date (profile $profile)"
    exit 0
fi

if [[ "$extras" == *ml* ]] && ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    # PyPI's Linux torch wheel is the multi-GB CUDA build; take the CPU build from the PyTorch
    # index when it answers (a local wheel via pip's find-links also wins: 2.x+cpu sorts above 2.x).
    # The index is probed first because pip retries an unreachable index for every package.
    torch_index=()
    if "$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
        "$torch_cpu_index" >/dev/null 2>&1; then
        torch_index=(--extra-index-url "$torch_cpu_index")
    fi
    log "installing torch==$torch_version ${torch_index[*]}"
    "${pip[@]}" install -q "${torch_index[@]}" "torch==$torch_version"
fi

log "installing the project with [$extras] into $venv"
"${pip[@]}" install -q -e ".[$extras]"
printf '%s' "$key" >"$(stamp_of "$extras")"
log "done (profile $profile)"
