#!/bin/bash
# Install what the all-in-one needs (Debian packages + its own venv); idempotent: a stamp holds
# the hash of the inputs, including the path of this checkout (the venv's editable install of
# cloudlet points at it), and nothing is done when it matches. Never touches the project's .venv.
# Includes Horizon (the checkout's `dashboard` extra) and, for tools/aio/browser.py, Debian's
# chromium + chromium-driver and selenium.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

APT_PACKAGES=(postgresql rabbitmq-server libvirt-daemon-system libvirt-daemon-driver-qemu
              libvirt-clients libvirt-dev qemu-system-x86 qemu-utils python3-venv python3-dev
              gcc pkg-config bc curl busybox-static chromium chromium-driver)
PIP_PACKAGES=("nova==34.*" "keystone==30.*" "glance==33.*" "openstack-placement==16.*"
              python-openstackclient uwsgi psycopg2-binary "libvirt-python>=9.0" "pyroute2>=0.7"
              selenium)
CONSTRAINTS=$AIO_REPO/tools/openstack-constraints.txt

stamp_now() {
    { printf '%s\n' "$AIO_REPO" "${APT_PACKAGES[@]}" "${PIP_PACKAGES[@]}"; cat "$CONSTRAINTS" "$0";
      cat "$AIO_REPO/setup.cfg"; } | sha256sum | cut -d' ' -f1
}
mkdir -p "$AIO_DIR"
if [ "$(cat "$AIO_DIR/.installed" 2>/dev/null)" = "$(stamp_now)" ]; then
    echo "aio: packages up to date"; exit 0
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    # no init system here: keep package scripts from starting the daemons (up.sh starts them)
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi
step "apt packages"
[ -x "$V/python" ] || python3 -m venv "$AIO_VENV"
"$V/pip" install -q --upgrade pip
"$V/pip" install -q -c "$CONSTRAINTS" "${PIP_PACKAGES[@]}" -e "${AIO_REPO}[nova,api,client,dashboard]"
step "pip install (venv $AIO_VENV)"
installed=$(cd / && "$V/python" -c 'import cloudlet_nova, os
print(os.path.dirname(os.path.dirname(cloudlet_nova.__file__)))')
[ "$installed" = "$AIO_REPO" ] || \
    die "the venv's cloudlet_nova is $installed, not this checkout's ($AIO_REPO)"
stamp_now > "$AIO_DIR/.installed"
