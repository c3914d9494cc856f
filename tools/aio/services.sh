# shellcheck shell=bash
# How each service of the all-in-one starts, stops and is checked (sourced by up.sh, down.sh,
# restart.sh after lib.sh). Daemons run in their own session (setsid) with their pid in
# $AIO_DIR/state/<name>.pid, so stopping one stops its whole process group and nothing else.
A=$AIO_DIR
# the order up.sh starts them in (down.sh stops them in reverse)
SERVICES=(postgres rabbitmq libvirtd keystone placement glance nova-api cloudlet-api
          neutron-standin nova-conductor nova-scheduler nova-compute horizon)
# shellcheck disable=SC2034  # PSQL, NM: for up.sh and restart.sh
PSQL="$PG_BIN/psql -h 127.0.0.1 -U postgres -q"
# shellcheck disable=SC2034
NM="$V/nova-manage --config-file $A/etc/nova/nova.conf"

service_alive() {  # NAME
    case $1 in
        postgres) [ -f "$A/pg/postmaster.pid" ] && alive "$(head -1 "$A/pg/postmaster.pid")" ;;
        libvirtd) $VIRSH version >/dev/null 2>&1 ;;
        *) alive "$(pidof_service "$1")" ;;
    esac
}

stop_pid() {  # NAME PID TIMEOUT: TERM its process group, KILL after TIMEOUT seconds
    local n=$1 p=$2 t=${3:-15}
    alive "$p" || return 0
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p"
    for _ in $(seq 1 "$((t * 5))"); do alive "$p" || break; sleep 0.2; done
    if alive "$p"; then kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p"; echo "aio: $n killed"
    else echo "aio: $n stopped"; fi
}

stop_service() {  # NAME
    case $1 in
        postgres)
            service_alive postgres || return 0
            su postgres -s /bin/bash -c "$PG_BIN/pg_ctl -D $A/pg -m fast stop" >/dev/null && \
                echo "aio: postgres stopped" ;;
        rabbitmq)
            service_alive rabbitmq || return 0
            rabbitmqctl -q -n rabbit@localhost stop >/dev/null 2>&1
            stop_pid rabbitmq "$(pidof_service rabbitmq)" 10
            epmd -kill >/dev/null 2>&1 || true ;;
        libvirtd)  # only the one up.sh started: other users of this machine may need theirs
            [ -f "$A/state/libvirtd.ours" ] || return 0
            stop_pid libvirtd "$(cat /run/libvirtd.pid 2>/dev/null)" 10
            stop_pid virtlogd "$(cat /run/virtlogd.pid 2>/dev/null)" 10
            rm -f "$A/state/libvirtd.ours" ;;
        *) stop_pid "$1" "$(pidof_service "$1")" 10 ;;
    esac
    rm -f "$A/state/$1.pid"
}

uwsgi_start() {  # NAME PORT MODULE ENV=VALUE...
    local name=$1 port=$2 module=$3; shift 3
    rm -f "$A/state/$name.pid"
    # Connection: close: uwsgi's keep-alive reset nova-compute's connections to Placement
    env "$@" setsid nohup "$V/uwsgi" --http-socket "127.0.0.1:$port" --module "$module" \
        --virtualenv "$AIO_VENV" --master --processes 1 --threads 4 --die-on-term --lazy-apps \
        --need-app --buffer-size 65535 --http-chunked-input --http-raw-body --http-auto-chunked \
        --add-header 'Connection: close' --chunked-input-limit 4194304 --chunked-input-timeout 60 \
        --socket-timeout 60 --pidfile "$A/state/$name.pid" >> "$A/logs/$name-uwsgi.log" 2>&1 &
    local deadline=$((SECONDS + 60))
    while [ $SECONDS -lt $deadline ]; do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && return 0
        sleep 0.5
        [ -f "$A/state/$name.pid" ] && ! alive "$(pidof_service "$name")" && break  # gave up
    done
    die "$name did not answer on port $port within 60 s (see $A/logs/$name-uwsgi.log)"
}

horizon_prepare() {  # the plugin's enabled files, settings, policy, static files (when changed)
    local od stamp now
    od=$(cd / && "$V/python" -c 'import openstack_dashboard, os
print(os.path.dirname(openstack_dashboard.__file__))')
    ln -sfn "$A/etc/horizon/local_settings.py" "$od/local/local_settings.py"
    # the plugin's enabled files and settings snippets (Horizon's plugin convention), replacing
    # the ones copied before
    while read -r f; do rm -f "$od/local/$f"; done < <(cat "$A/state/horizon/enabled" 2>/dev/null)
    : > "$A/state/horizon/enabled"
    for f in "$AIO_REPO"/cloudlet_dashboard/{enabled,local_settings.d}/_*.py; do
        [ -f "$f" ] || continue
        local d; d=$(basename "$(dirname "$f")")
        cp "$f" "$od/local/$d/"; echo "$d/$(basename "$f")" >> "$A/state/horizon/enabled"
    done
    # collectstatic + offline compression take a minute: only when their inputs changed
    now=$( { cat "$A/etc/horizon/local_settings.py" "$A/state/horizon/enabled" "$A/.installed"
             if [ -d "$AIO_REPO/cloudlet_dashboard" ]; then
                 find "$AIO_REPO/cloudlet_dashboard" -type f ! -name '*.pyc' -print0 | sort -z \
                     | xargs -0 -r cat
             fi; } | sha256sum | cut -d' ' -f1)
    stamp=$A/state/horizon/static.stamp
    [ -d "$A/state/horizon/static" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$now" ] && return 0
    rm -rf "$A/state/horizon/static"
    (cd / && DJANGO_SETTINGS_MODULE=openstack_dashboard.settings "$V/django-admin" collectstatic \
         --noinput -v 0 && DJANGO_SETTINGS_MODULE=openstack_dashboard.settings \
         "$V/django-admin" compress --force -v 0) > "$A/logs/horizon-static.log" 2>&1 \
        || die "horizon: collectstatic/compress failed (see $A/logs/horizon-static.log)"
    echo "$now" > "$stamp"
}

daemon_start() {  # NAME COMMAND...: output in logs/NAME.out
    local name=$1; shift
    setsid nohup "$@" > "$A/logs/$name.out" 2>&1 &
    echo $! > "$A/state/$name.pid"
}

start_service() {  # NAME (the stack's files exist: up.sh made them)
    case $1 in
        postgres)
            su postgres -s /bin/bash -c "$PG_BIN/pg_ctl -D $A/pg -l $A/pg/server.log -o \
'-c listen_addresses=127.0.0.1 -c port=5432 -c unix_socket_directories=$A/pg -c max_connections=300' \
                -w start >/dev/null" ;;
        rabbitmq)
            (cd /var/lib/rabbitmq && RABBITMQ_NODENAME=rabbit@localhost \
              RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672 ERL_EPMD_ADDRESS=127.0.0.1 \
              RABBITMQ_DIST_PORT=25672 \
              RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
              HOME=/var/lib/rabbitmq setsid nohup su rabbitmq -s /bin/sh \
              -c /usr/lib/rabbitmq/bin/rabbitmq-server > "$A/logs/rabbitmq.out" 2>&1 &
              echo $! > "$A/state/rabbitmq.pid")
            local deadline=$((SECONDS + 60))
            while [ $SECONDS -lt $deadline ]; do
                rabbitmqctl -q -n rabbit@localhost status >/dev/null 2>&1 && break; sleep 1
            done
            rabbitmqctl -q -n rabbit@localhost add_user openstack ospass >/dev/null 2>&1 || true
            rabbitmqctl -q -n rabbit@localhost set_permissions openstack ".*" ".*" ".*" >/dev/null \
                || die "rabbitmq did not start within 60 s (see $A/logs/rabbitmq.out)" ;;
        libvirtd)  # shared with whoever else uses this machine: started only when none runs
            # Debian's udev rule makes /dev/kvm root:kvm 0660 (libvirt-qemu is in group kvm);
            # without udev it stays root-only here, libvirt then finds its QEMU user unable to
            # open it and re-probes QEMU on every domain define (~10 s each, most of a boot).
            # Nova still runs guests under TCG (virt_type = qemu): KVM is exposed on these
            # machines but hangs guests.
            if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
                chgrp kvm /dev/kvm; chmod 0660 /dev/kvm
            fi
            service_alive libvirtd && return 0
            /usr/sbin/virtlogd -d; /usr/sbin/libvirtd -d; touch "$A/state/libvirtd.ours"
            for _ in $(seq 1 30); do service_alive libvirtd && return 0; sleep 1; done
            die "libvirtd did not answer within 30 s" ;;
        keystone) uwsgi_start keystone 5000 keystone.wsgi.api:application \
                      "OS_KEYSTONE_CONFIG_FILES=$A/etc/keystone/keystone.conf" ;;
        placement) uwsgi_start placement 8778 placement.wsgi.api:application \
                       "OS_PLACEMENT_CONFIG_DIR=$A/etc/placement" ;;
        glance) uwsgi_start glance 9292 glance.wsgi.api:application \
                    "OS_GLANCE_CONFIG_DIR=$A/etc/glance" ;;
        # nova-api.conf names its log file: under uwsgi oslo.log would take the name of the
        # outermost Python frame ("<frozen importlib._bootstrap>.log")
        nova-api) uwsgi_start nova-api 8774 nova.wsgi.osapi_compute:application \
                      "OS_NOVA_CONFIG_DIR=$A/etc/nova" \
                      "OS_NOVA_CONFIG_FILES=api-paste.ini;nova.conf;nova-api.conf" ;;
        cloudlet-api) uwsgi_start cloudlet-api 8790 cloudlet_api.wsgi:application \
                          "CLOUDLET_API_CONFIG=$A/etc/cloudlet/cloudlet-api.conf" ;;
        horizon)
            horizon_prepare
            uwsgi_start horizon 8080 openstack_dashboard.wsgi:application \
                "UWSGI_STATIC_MAP=/static=$A/state/horizon/static" ;;
        neutron-standin) daemon_start neutron-standin "$V/python" "$AIO_TOOLS/neutron_standin.py" ;;
        nova-conductor|nova-scheduler|nova-compute)
            daemon_start "$1" "$V/$1" --config-file "$A/etc/nova/nova.conf" ;;
        *) die "no service '$1' (services: ${SERVICES[*]})" ;;
    esac
}
