#!/bin/bash
# Stop everything tools/aio/up.sh started (by recorded pid / process group), remove its guests
# and the instance directories of servers left running. Ends the stack: the next up.sh starts a
# new one (fresh databases). Keeps the installed venv. Safe to run twice.
. "$(dirname "$0")/lib.sh"
. "$AIO_TOOLS/services.sh"
rm -f "$A/state/stack"
for s in horizon nova-compute nova-conductor nova-scheduler neutron-standin cloudlet-api nova-api glance placement \
         keystone; do
    stop_service "$s"
done
if $VIRSH version >/dev/null 2>&1; then
    for d in $($VIRSH list --all --uuid 2>/dev/null); do
        # only the all-in-one's guests: their disks live under $A
        $VIRSH dumpxml "$d" 2>/dev/null | grep -q "$A/" || continue
        $VIRSH destroy "$d" >/dev/null 2>&1
        $VIRSH undefine --managed-save "$d" >/dev/null 2>&1 || $VIRSH undefine "$d" >/dev/null 2>&1
        echo "aio: removed guest $d"
    done
fi
# the instance directories (named by server uuid) of servers nobody deleted; the image caches
# (_base, _cloudlet) stay
for d in "$A"/state/nova/instances/*-*-*-*-*/; do
    [ -d "$d" ] || continue
    rm -rf "$d"; echo "aio: removed instance directory $(basename "$d")"
done
for s in libvirtd rabbitmq postgres; do stop_service "$s"; done
rm -f "$A"/state/*.pid
step "down"
