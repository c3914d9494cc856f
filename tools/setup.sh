#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine: Debian packages, the project venv (.venv) with
# cloudlet installed, the cached test guest and bookworm-backports' QEMU beside the system's.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio kmod zstd xz-utils
              python3-venv procps libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
              fuse3 nginx-light iproute2 libvirt-dev pkg-config)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.cloudlet-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "setup: installing cloudlet and its Python dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi

# The Nova driver (cloudlet_nova) and Nova's functional-test framework: nova 34 and its OpenStack
# dependencies, pinned by tools/openstack-constraints.txt (libvirt-python builds on libvirt-dev).
nova_stamp=.venv/.cloudlet-nova-installed
if [ ! -f "$nova_stamp" ] || [ setup.cfg -nt "$nova_stamp" ] \
        || [ tools/openstack-constraints.txt -nt "$nova_stamp" ]; then
    echo "setup: installing nova 34 and the cloudlet Nova driver into .venv"
    .venv/bin/pip install -q -c tools/openstack-constraints.txt -e '.[test,nova,nova-test]'
    # Nova's functional tests read api-paste.ini from <site-packages>/etc/nova (a source tree's
    # layout); the wheel installs it under .venv/etc
    sp=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -e "$sp/etc" ] || ln -s "$PWD/.venv/etc" "$sp/etc"
    touch "$nova_stamp"
fi

# cloudlet-api (the REST service) and what it needs on top of the driver (keystonemiddleware,
# oslo.policy, microversion-parse, jsonschema, WebOb), and its client (openstacksdk, osc-lib,
# the `openstack` command), with the same constraints file.
api_stamp=.venv/.cloudlet-api-installed
if [ ! -f "$api_stamp" ] || [ setup.cfg -nt "$api_stamp" ] \
        || [ tools/openstack-constraints.txt -nt "$api_stamp" ]; then
    echo "setup: installing cloudlet-api and its client's dependencies into .venv"
    .venv/bin/pip install -q -c tools/openstack-constraints.txt \
        -e '.[test,nova,nova-test,api,client]'
    touch "$api_stamp"
fi

# The Horizon plugin (cloudlet_dashboard) and its unit tests: Horizon 27 (Django 5.2), with the
# same constraints file.
dashboard_stamp=.venv/.cloudlet-dashboard-installed
if [ ! -f "$dashboard_stamp" ] || [ setup.cfg -nt "$dashboard_stamp" ] \
        || [ tools/openstack-constraints.txt -nt "$dashboard_stamp" ]; then
    echo "setup: installing Horizon 27 for the cloudlet dashboard into .venv"
    .venv/bin/pip install -q -c tools/openstack-constraints.txt \
        -e '.[test,nova,nova-test,api,client,dashboard]'
    touch "$dashboard_stamp"
fi

tools/testguest/build.sh

# The newest QEMU of bookworm-backports, unpacked beside the system QEMU (never over it): the
# second pass of tools/test.sh runs the QEMU tests on it; CLOUDLET_QEMU=<path> selects it.
newer=$(tools/qemu-backports/install.sh | tail -n 1)
echo "setup: bookworm-backports QEMU: CLOUDLET_QEMU=$newer"
