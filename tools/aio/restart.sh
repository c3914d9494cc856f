#!/bin/bash
# Restart services of a running all-in-one, keeping its data:
#   tools/aio/restart.sh nova-compute [glance ...]
# Services: postgres rabbitmq libvirtd keystone placement glance nova-api cloudlet-api
# neutron-standin nova-conductor nova-scheduler nova-compute horizon (libvirtd only if up.sh started it:
# another user of this machine may own the running one). tools/aio/up.sh starts whatever is not running.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$AIO_TOOLS/services.sh"
[ $# -gt 0 ] || die "usage: $0 SERVICE... (${SERVICES[*]})"
[ "$(id -u)" = 0 ] || die "run it as root"
[ -f "$A/state/stack" ] || die "no all-in-one stack here: run tools/aio/up.sh"
for s in "$@"; do
    [[ " ${SERVICES[*]} " == *" $s "* ]] || die "no service '$s' (services: ${SERVICES[*]})"
    if [ "$s" = libvirtd ] && service_alive libvirtd && [ ! -f "$A/state/libvirtd.ours" ]; then
        die "libvirtd was not started by the all-in-one: not restarting it"
    fi
done
for s in "$@"; do
    stop_service "$s"
    start_service "$s"
    step "$s restarted"
done
