#!/bin/bash
# Stop everything tools/aio/up.sh started (by recorded pid / process group), remove its guests.
# Keeps the installed venv; up.sh starts afresh. Safe to run twice.
. "$(dirname "$0")/lib.sh"
A=$AIO_DIR
stop() {  # NAME PID TIMEOUT
    local n=$1 p=$2 t=${3:-15}
    alive "$p" || return 0
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p"
    for _ in $(seq 1 "$((t * 5))"); do alive "$p" || break; sleep 0.2; done
    if alive "$p"; then kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p"; echo "aio: $n killed"
    else echo "aio: $n stopped"; fi
}
for s in nova-compute nova-conductor nova-scheduler neutron-standin nova-api glance placement \
         keystone; do
    stop "$s" "$(pidof_service "$s")" 10
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
if [ -f "$A/state/libvirtd.ours" ]; then
    stop libvirtd "$(cat /run/libvirtd.pid 2>/dev/null)" 10
    stop virtlogd "$(cat /run/virtlogd.pid 2>/dev/null)" 10
    rm -f "$A/state/libvirtd.ours"
fi
if alive "$(pidof_service rabbitmq)"; then
    rabbitmqctl -q -n rabbit@localhost stop >/dev/null 2>&1
    stop rabbitmq "$(pidof_service rabbitmq)" 10
    epmd -kill >/dev/null 2>&1 || true
fi
if [ -f "$A/pg/postmaster.pid" ]; then
    su postgres -s /bin/bash -c "$PG_BIN/pg_ctl -D $A/pg -m fast stop" >/dev/null && \
        echo "aio: postgres stopped"
fi
rm -f "$A"/state/*.pid
step "down"
