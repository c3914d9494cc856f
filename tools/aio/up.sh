#!/bin/bash
# Start a real all-in-one OpenStack on 127.0.0.1 with the cloudlet compute driver:
# PostgreSQL, RabbitMQ, Keystone, Glance (file store), Placement, Nova API/conductor/scheduler/
# compute (CloudletDriver), libvirtd, cloudlet-api (the cloudlet REST service, catalog type
# `cloudlet`). Networking: a STAND-IN for neutron-server
# (neutron_standin.py, empty read-only answers; servers boot with --nic none).
#
#   tools/aio/up.sh            start what is not running; a new stack (fresh databases) only when
#                              there is none (first run, or after down.sh)
#   tools/aio/up.sh --fresh    stop everything and start a new stack (wipes its databases, images)
#
# State, configs and logs: $AIO_DIR (default /opt/cloudlet-aio).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$AIO_TOOLS/services.sh"
FRESH=false
case "${1:-}" in
    --fresh) FRESH=true ;;
    "") ;;
    *) die "usage: $0 [--fresh]" ;;
esac
[ "$(id -u)" = 0 ] || die "run it as root (it starts system daemons and installs Debian packages)"
STACK=$A/state/stack  # written once a new stack is fully set up; down.sh removes it

all_up() {
    for s in "${SERVICES[@]}"; do service_alive "$s" || return 1; done
}
if ! $FRESH && [ -f "$STACK" ] && all_up; then
    echo "aio: already up (tools/aio/down.sh stops it)"; exit 0
fi

"$AIO_TOOLS/install.sh"
step "install (cached when unchanged)"

NEW=false
if $FRESH || [ ! -f "$STACK" ]; then
    NEW=true
    [ -d "$A/state" ] && { "$AIO_TOOLS/down.sh" >/dev/null 2>&1 || true; }
    rm -rf "$A/pg" "$A/state" "$A/logs" "${A:?}/etc"
    mkdir -p "$A/pg" "$A/state/nova/instances" "$A/state/nova/locks" "$A/logs" \
        "$A/state/glance/"{images,staging,tasks,locks} "$A/etc/"{keystone,glance,placement,nova} \
        "$A/etc/keystone/"{fernet-keys,credential-keys} "$A/import"
    chmod 755 "$A" "$A/state" "$A/state/nova" "$A/state/nova/instances"  # QEMU's user reaches disks
    chown postgres:postgres "$A/pg"
    su postgres -s /bin/bash -c "$PG_BIN/initdb -D $A/pg -U postgres --auth=trust >/dev/null"
else
    echo "aio: starting what is not running (the stack's data is kept; --fresh starts anew)"
fi
# configs are rendered on every start: a changed template applies to the running stack's data
mkdir -p "$A/etc/cloudlet" "$A/state/cloudlet-api" "$A/etc/horizon" "$A/state/horizon"  # (added after stacks existed)
render() { sed -e "s|@AIO_DIR@|$A|g" -e "s|@AIO_VENV@|$AIO_VENV|g" "$AIO_TOOLS/etc/$1" > "$2"; }
render keystone.conf "$A/etc/keystone/keystone.conf"
render placement.conf "$A/etc/placement/placement.conf"
render glance-api.conf "$A/etc/glance/glance-api.conf"
render nova.conf "$A/etc/nova/nova.conf"
render nova-api.conf "$A/etc/nova/nova-api.conf"
render cloudlet-api.conf "$A/etc/cloudlet/cloudlet-api.conf"
render horizon-local_settings.py "$A/etc/horizon/local_settings.py"
# the site's cloudlet policy, read by cloudlet-api and Horizon: the defaults, commented out (an
# operator uncomments a rule to change it); kept across starts
[ -f "$A/etc/cloudlet/policy.yaml" ] || "$V/oslopolicy-sample-generator" --namespace cloudlet_api \
    --output-file "$A/etc/cloudlet/policy.yaml" >/dev/null 2>&1 \
    || die "oslopolicy-sample-generator --namespace cloudlet_api failed"
# nova-api under uwsgi reads it from there: Nova's, with the cloudlet filter (Nova API actions)
sed -f "$AIO_REPO/etc/nova-api-paste.sed" "$AIO_VENV/etc/nova/api-paste.ini" \
    > "$A/etc/nova/api-paste.ini"

ensure() {  # NAME: start it unless it runs
    service_alive "$1" && return 0
    start_service "$1"
    echo "aio: $1 started"
}

ensure postgres
if $NEW; then
    for db in keystone glance placement nova_api nova nova_cell0; do
        $PSQL -c "CREATE DATABASE $db"
    done
    $PSQL -c "CREATE USER os WITH SUPERUSER PASSWORD 'ospass'"
fi
step "postgres"
ensure rabbitmq
ensure libvirtd
step "rabbitmq + libvirtd"

if $NEW; then
    K="$V/keystone-manage --config-file $A/etc/keystone/keystone.conf"
    $K db_sync
    $K fernet_setup --keystone-user root --keystone-group root
    $K credential_setup --keystone-user root --keystone-group root
    $K bootstrap --bootstrap-password adminpass --bootstrap-admin-url http://127.0.0.1:5000/v3/ \
        --bootstrap-internal-url http://127.0.0.1:5000/v3/ \
        --bootstrap-public-url http://127.0.0.1:5000/v3/ --bootstrap-region-id RegionOne 2>/dev/null
fi
ensure keystone
if $NEW; then "$V/python" "$AIO_TOOLS/setup_keystone.py"; fi
step "keystone"

if $NEW; then
    "$V/placement-manage" --config-file "$A/etc/placement/placement.conf" db sync
    "$V/glance-manage" --config-file "$A/etc/glance/glance-api.conf" db_sync >/dev/null 2>&1
    { $NM api_db sync && $NM cell_v2 map_cell0 --database_connection \
        postgresql+psycopg2://os:ospass@127.0.0.1/nova_cell0 && $NM cell_v2 create_cell \
        --name=cell1 && $NM db sync; } > "$A/logs/nova-db-sync.log" 2>&1 \
        || die "nova db sync: see $A/logs/nova-db-sync.log"
    step "placement/glance/nova databases"
fi

for s in placement glance nova-api cloudlet-api neutron-standin nova-conductor nova-scheduler nova-compute \
         horizon; do
    ensure "$s"
done
registered() {  # (not a pipe into grep -q: with pipefail, nova-manage's SIGPIPE fails it)
    local hosts; hosts=$($NM cell_v2 list_hosts 2>/dev/null); [[ $hosts == *" aio "* ]]
}
deadline=$((SECONDS + 180))  # each round runs nova-manage twice: seconds under load
while [ $SECONDS -lt $deadline ]; do
    registered && break
    $NM cell_v2 discover_hosts >/dev/null 2>&1
    service_alive nova-compute || die "nova-compute died: see $A/logs/nova-compute.out and .log"
    service_alive libvirtd || die "libvirtd went away (started by another user of this machine)"
    sleep 2
done
registered || die "nova-compute did not register within 180 s (see $A/logs/nova-compute.log)"
touch "$STACK"
step "nova services, compute registered"
echo "aio: up. source $AIO_TOOLS/adminrc (or memberrc); openstack ... (logs: $A/logs)"
