# Common settings of the all-in-one scripts (sourced). Everything lives under $AIO_DIR.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
AIO_DIR=${AIO_DIR:-/opt/cloudlet-aio}
AIO_VENV=${AIO_VENV:-$AIO_DIR/venv}
AIO_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
AIO_TOOLS=$AIO_REPO/tools/aio
V=$AIO_VENV/bin
PG_BIN=/usr/lib/postgresql/15/bin
VIRSH="virsh -c qemu:///system"
export AIO_DIR AIO_VENV AIO_REPO

T0=$(date +%s.%N); LAST=$T0
step() {  # print the seconds the last step took
    local now; now=$(date +%s.%N)
    printf 'aio: %-40s %6.1f s (total %6.1f s)\n' "$1" "$(echo "$now-$LAST" | bc)" "$(echo "$now-$T0" | bc)"
    LAST=$now
}
die() { echo "aio: error: $*" >&2; exit 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pidof_service() { cat "$AIO_DIR/state/$1.pid" 2>/dev/null || true; }
