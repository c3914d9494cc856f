#!/bin/bash
# DevStack plugin of cloudlet (enable_plugin cloudlet ..., see devstack/settings), following
# DevStack's plugin contract and its lib/placement (service user, catalog entry, uwsgi,
# auth_token). It sets up what the all-in-one does (tools/aio: install.sh, then up.sh with
# etc/nova.conf, etc/cloudlet-api.conf, etc/nova-api-paste.sed, setup_keystone.py), with the
# same options, in the same order:
#   install      this repository, editable, with its cloudlet-api and client extras (the
#                compute driver is in the same package; Nova and libvirt-python are DevStack's)
#   post-config  compute hosts: nova.conf's compute driver and [cloudlet]; cloudlet-api.conf;
#                nova-api's api-paste.ini with the cloudlet filter; the service user, service
#                and endpoints in Keystone; the panels' Horizon files when horizon is enabled
#   extra        cloudlet-api under uwsgi
# shellcheck disable=SC2154  # DevStack's variables (DEST, NOVA_CONF, ...) and devstack/settings'

# Save trace setting
_XTRACE_CLOUDLET=$(set +o | grep xtrace)
set +o xtrace

CLOUDLET_SERVICE_LISTEN_ADDRESS=${CLOUDLET_SERVICE_LISTEN_ADDRESS:-$(ipv6_unquote "$SERVICE_LISTEN_ADDRESS")}
CLOUDLET_API_URL="http://$CLOUDLET_SERVICE_HOST:$CLOUDLET_SERVICE_PORT"

function install_cloudlet {
    setup_develop "$CLOUDLET_DIR" api,client
}

# compute hosts: Nova copies nova.conf into nova-cpu.conf when it starts n-cpu
function configure_cloudlet_compute {
    if [[ "$VIRT_DRIVER" != libvirt ]]; then
        die $LINENO "the cloudlet compute driver extends Nova's libvirt driver: set VIRT_DRIVER=libvirt"
    fi
    iniset "$NOVA_CONF" DEFAULT compute_driver cloudlet.CloudletDriver
    iniset "$NOVA_CONF" cloudlet cache_dir "$NOVA_INSTANCES_PATH/_cloudlet"
    iniset "$NOVA_CONF" cloudlet base_import_dir "$CLOUDLET_BASE_IMPORT_DIR"
    sudo install -d -o "$STACK_USER" "$CLOUDLET_BASE_IMPORT_DIR"
}

function configure_cloudlet_api {
    sudo install -d -o "$STACK_USER" "$CLOUDLET_CONF_DIR" "$CLOUDLET_API_STATE_DIR"
    rm -f "$CLOUDLET_API_CONF"
    iniset "$CLOUDLET_API_CONF" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    # Nova's message bus, where the compute hosts listen (their cell's with superconductor)
    if [[ "$CELLSV2_SETUP" == singleconductor ]]; then
        iniset_rpc_backend cloudlet "$CLOUDLET_API_CONF" DEFAULT
    else
        iniset_rpc_backend cloudlet "$CLOUDLET_API_CONF" DEFAULT "nova_cell${NOVA_CPU_CELL}"
    fi
    iniset "$CLOUDLET_API_CONF" api state_path "$CLOUDLET_API_STATE_DIR"
    iniset "$CLOUDLET_API_CONF" api import_url_allow "$CLOUDLET_IMPORT_URL_ALLOW"
    configure_keystone_authtoken_middleware "$CLOUDLET_API_CONF" cloudlet
    # the service's own identity: reads only which compute host runs a server
    configure_keystoneauth "$CLOUDLET_API_CONF" cloudlet service_user
    # the site's policy file: the defaults, commented out (an operator uncomments a rule to
    # change it); kept across stacks, as tools/aio/up.sh does
    if [[ ! -f "$CLOUDLET_CONF_DIR/policy.yaml" ]]; then
        oslopolicy-sample-generator --namespace cloudlet_api \
            --output-file "$CLOUDLET_CONF_DIR/policy.yaml"
    fi
    iniset "$CLOUDLET_API_CONF" oslo_policy policy_file "$CLOUDLET_CONF_DIR/policy.yaml"
    iniset "$CLOUDLET_API_CONF" glance region_name "$REGION_NAME"
    iniset "$CLOUDLET_API_CONF" nova region_name "$REGION_NAME"
    iniset "$CLOUDLET_API_CONF" oslo_messaging_notifications driver noop
    setup_logging "$CLOUDLET_API_CONF"

    local socket="$CLOUDLET_SERVICE_LISTEN_ADDRESS:$CLOUDLET_SERVICE_PORT"
    write_uwsgi_config "$CLOUDLET_API_UWSGI_CONF" "$CLOUDLET_API_UWSGI" "" "$socket" cloudlet-api
    # as tools/aio/services.sh serves it: the HTTP socket itself (not uwsgi's HTTP router),
    # threads, and chunked uploads of packages
    inidelete "$CLOUDLET_API_UWSGI_CONF" uwsgi http
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi http-socket "$socket"
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi threads 4
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi http-chunked-input true
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi http-raw-body true
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi http-auto-chunked true
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi chunked-input-limit 4194304
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi chunked-input-timeout 60
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi socket-timeout 60
    iniset "$CLOUDLET_API_UWSGI_CONF" uwsgi env "CLOUDLET_API_CONFIG=$CLOUDLET_API_CONF"
}

# nova-api hosts: DevStack copies Nova's api-paste.ini afresh on every stack.sh
function configure_cloudlet_nova_actions {
    if ! grep -q '^\[filter:cloudlet\]' "$NOVA_API_PASTE_INI"; then
        sed -i -f "$CLOUDLET_DIR/etc/nova-api-paste.sed" "$NOVA_API_PASTE_INI"
    fi
}

function create_cloudlet_accounts {
    create_service_user cloudlet admin
    get_or_create_service cloudlet cloudlet "Cloudlet: base VMs, overlays, VM synthesis"
    get_or_create_endpoint cloudlet "$REGION_NAME" "$CLOUDLET_API_URL" "$CLOUDLET_API_URL" \
        "$CLOUDLET_API_URL"
}

# The panels (cloudlet_dashboard, installed with this repository): its enabled files and
# settings snippets, as tools/aio/services.sh copies them. Horizon collects the static files
# in init_horizon, after post-config.
function configure_cloudlet_dashboard {
    local kind files
    for kind in enabled local_settings.d; do
        files=("$CLOUDLET_DIR/cloudlet_dashboard/$kind"/_*.py)
        if [[ -e "${files[0]}" ]]; then
            mkdir -p "$HORIZON_DIR/openstack_dashboard/local/$kind"
            cp "${files[@]}" "$HORIZON_DIR/openstack_dashboard/local/$kind/"
        elif [[ $kind == enabled ]]; then
            die $LINENO "no enabled files in $CLOUDLET_DIR/cloudlet_dashboard/enabled"
        fi
    done
}

function start_cloudlet_api {
    run_process cloudlet-api "$(which uwsgi) --procname-prefix cloudlet-api --ini $CLOUDLET_API_UWSGI_CONF"
    echo "Waiting for cloudlet-api to start..."
    if ! wait_for_service "$SERVICE_TIMEOUT" "$CLOUDLET_API_URL"; then
        die $LINENO "cloudlet-api did not start"
    fi
}

function cleanup_cloudlet {
    remove_uwsgi_config "$CLOUDLET_API_UWSGI_CONF" cloudlet-api
    sudo rm -rf "$CLOUDLET_API_STATE_DIR"
}

if [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing cloudlet"
    install_cloudlet
elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
    echo_summary "Configuring cloudlet"
    if is_service_enabled n-cpu; then
        configure_cloudlet_compute
    fi
    if is_service_enabled cloudlet-api; then
        configure_cloudlet_api
    fi
    if is_service_enabled n-api && [[ "$(trueorfalse True CLOUDLET_NOVA_ACTIONS)" == True ]]; then
        configure_cloudlet_nova_actions
    fi
    if is_service_enabled cloudlet-api; then
        create_cloudlet_accounts
    fi
    if is_service_enabled horizon; then
        configure_cloudlet_dashboard
    fi
elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
    if is_service_enabled cloudlet-api; then
        echo_summary "Starting cloudlet-api"
        start_cloudlet_api
    fi
fi

if [[ "$1" == "unstack" ]]; then
    stop_process cloudlet-api
fi

if [[ "$1" == "clean" ]]; then
    cleanup_cloudlet
fi

# Restore xtrace
$_XTRACE_CLOUDLET
