#!/bin/bash
# Start a real all-in-one OpenStack on 127.0.0.1 with the cloudlet compute driver:
# PostgreSQL, RabbitMQ, Keystone, Glance (file store), Placement, Nova API/conductor/scheduler/
# compute (CloudletDriver), libvirtd. Networking: a STAND-IN for neutron-server
# (neutron_standin.py, empty read-only answers; servers boot with --nic none).
# Idempotent: when everything already runs it does nothing; a partial stack is stopped and
# started afresh (fresh databases). State, configs and logs: $AIO_DIR (default /opt/cloudlet-aio).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=$AIO_DIR
SERVICES=(keystone placement glance nova-api neutron-standin nova-conductor nova-scheduler
          nova-compute)

all_up() {
    for s in "${SERVICES[@]}"; do alive "$(pidof_service "$s")" || return 1; done
    [ -f "$A/pg/postmaster.pid" ] && rabbitmqctl -q -n rabbit@localhost status >/dev/null 2>&1
}
if all_up; then echo "aio: already up (tools/aio/down.sh stops it)"; exit 0; fi
[ -d "$A/state" ] && "$AIO_TOOLS/down.sh" >/dev/null 2>&1 || true

"$AIO_TOOLS/install.sh"
step "install (cached when unchanged)"

rm -rf "$A/pg" "$A/state" "$A/logs" "$A/etc"
mkdir -p "$A/pg" "$A/state/nova/instances" "$A/state/nova/locks" "$A/logs" \
    "$A/state/glance/"{images,staging,tasks,locks} "$A/etc/"{keystone,glance,placement,nova} \
    "$A/etc/keystone/"{fernet-keys,credential-keys}
chmod 755 "$A" "$A/state" "$A/state/nova" "$A/state/nova/instances"  # QEMU's user reaches disks
render() { sed -e "s|@AIO_DIR@|$A|g" -e "s|@AIO_VENV@|$AIO_VENV|g" "$AIO_TOOLS/etc/$1" > "$2"; }
render keystone.conf "$A/etc/keystone/keystone.conf"
render placement.conf "$A/etc/placement/placement.conf"
render glance-api.conf "$A/etc/glance/glance-api.conf"
render nova.conf "$A/etc/nova/nova.conf"
cp "$AIO_VENV/etc/nova/api-paste.ini" "$A/etc/nova/"  # nova-api under uwsgi reads it from there

chown postgres:postgres "$A/pg"
su postgres -s /bin/bash -c "$PG_BIN/initdb -D $A/pg -U postgres --auth=trust >/dev/null && \
  $PG_BIN/pg_ctl -D $A/pg -l $A/pg/server.log -o '-c listen_addresses=127.0.0.1 -c port=5432 \
  -c unix_socket_directories=$A/pg -c max_connections=300' -w start >/dev/null"
PSQL="$PG_BIN/psql -h 127.0.0.1 -U postgres -q"
for db in keystone glance placement nova_api nova nova_cell0; do $PSQL -c "CREATE DATABASE $db"; done
$PSQL -c "CREATE USER os WITH SUPERUSER PASSWORD 'ospass'"
step "postgres"

(cd /var/lib/rabbitmq && RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
  RABBITMQ_NODE_PORT=5672 ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT=25672 \
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
  HOME=/var/lib/rabbitmq setsid nohup su rabbitmq -s /bin/sh -c /usr/lib/rabbitmq/bin/rabbitmq-server \
  > "$A/logs/rabbitmq.out" 2>&1 & echo $! > "$A/state/rabbitmq.pid")
# Debian's udev rule makes /dev/kvm root:kvm 0660 (libvirt-qemu is in group kvm); without udev
# it stays root-only here, libvirt then finds its QEMU user unable to open it and re-probes QEMU
# on every domain define (~10 s each, most of a boot). Nova still runs guests under TCG
# (virt_type = qemu): KVM is exposed on these machines but hangs guests.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then chgrp kvm /dev/kvm; chmod 0660 /dev/kvm; fi
if ! $VIRSH version >/dev/null 2>&1; then
    /usr/sbin/virtlogd -d; /usr/sbin/libvirtd -d; touch "$A/state/libvirtd.ours"
fi
for _ in $(seq 1 60); do rabbitmqctl -q -n rabbit@localhost status >/dev/null 2>&1 && break; sleep 1; done
rabbitmqctl -q -n rabbit@localhost add_user openstack ospass >/dev/null 2>&1 || true
rabbitmqctl -q -n rabbit@localhost set_permissions openstack ".*" ".*" ".*" >/dev/null
step "rabbitmq + libvirtd"

uwsgi_start() {  # NAME PORT MODULE ENV=VALUE
    # Connection: close: uwsgi's keep-alive reset nova-compute's connections to Placement
    env "$4" setsid nohup "$V/uwsgi" --http-socket "127.0.0.1:$2" --module "$3" \
        --virtualenv "$AIO_VENV" --master --processes 1 --threads 4 --die-on-term --lazy-apps \
        --need-app --buffer-size 65535 --http-chunked-input --http-raw-body --http-auto-chunked \
        --add-header 'Connection: close' --chunked-input-limit 4194304 --chunked-input-timeout 60 \
        --socket-timeout 60 --pidfile "$A/state/$1.pid" >> "$A/logs/$1-uwsgi.log" 2>&1 &
    for _ in $(seq 1 120); do
        curl -s -o /dev/null "http://127.0.0.1:$2/" && return 0
        sleep 0.5
        [ -f "$A/state/$1.pid" ] && ! alive "$(pidof_service "$1")" && break  # uwsgi gave up
    done
    die "$1 did not answer on port $2 (see $A/logs/$1-uwsgi.log)"
}
K="$V/keystone-manage --config-file $A/etc/keystone/keystone.conf"
$K db_sync
$K fernet_setup --keystone-user root --keystone-group root
$K credential_setup --keystone-user root --keystone-group root
$K bootstrap --bootstrap-password adminpass --bootstrap-admin-url http://127.0.0.1:5000/v3/ \
    --bootstrap-internal-url http://127.0.0.1:5000/v3/ --bootstrap-public-url http://127.0.0.1:5000/v3/ \
    --bootstrap-region-id RegionOne 2>/dev/null
uwsgi_start keystone 5000 keystone.wsgi.api:application \
    "OS_KEYSTONE_CONFIG_FILES=$A/etc/keystone/keystone.conf"
"$V/python" "$AIO_TOOLS/setup_keystone.py"
step "keystone"

"$V/placement-manage" --config-file "$A/etc/placement/placement.conf" db sync
"$V/glance-manage" --config-file "$A/etc/glance/glance-api.conf" db_sync >/dev/null 2>&1
NM="$V/nova-manage --config-file $A/etc/nova/nova.conf"
{ $NM api_db sync && $NM cell_v2 map_cell0 --database_connection \
    postgresql+psycopg2://os:ospass@127.0.0.1/nova_cell0 && $NM cell_v2 create_cell --name=cell1 \
    && $NM db sync; } > "$A/logs/nova-db-sync.log" 2>&1 || die "nova db sync: see $A/logs/nova-db-sync.log"
step "placement/glance/nova databases"

uwsgi_start placement 8778 placement.wsgi.api:application "OS_PLACEMENT_CONFIG_DIR=$A/etc/placement"
uwsgi_start glance 9292 glance.wsgi.api:application "OS_GLANCE_CONFIG_DIR=$A/etc/glance"
uwsgi_start nova-api 8774 nova.wsgi.osapi_compute:application "OS_NOVA_CONFIG_DIR=$A/etc/nova"
setsid nohup "$V/python" "$AIO_TOOLS/neutron_standin.py" > "$A/logs/neutron-standin.log" 2>&1 &
echo $! > "$A/state/neutron-standin.pid"
for s in conductor scheduler compute; do
    setsid nohup "$V/nova-$s" --config-file "$A/etc/nova/nova.conf" > "$A/logs/nova-$s.out" 2>&1 &
    echo $! > "$A/state/nova-$s.pid"
done
for _ in $(seq 1 90); do
    $NM cell_v2 discover_hosts >/dev/null 2>&1
    $NM cell_v2 list_hosts 2>/dev/null | grep -q " aio " && break
    alive "$(pidof_service nova-compute)" || die "nova-compute died: see $A/logs/nova-compute.out"
    sleep 2
done
step "nova services, compute registered"
echo "aio: up. source $AIO_TOOLS/adminrc; openstack ... (logs: $A/logs)"
