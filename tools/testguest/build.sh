#!/bin/bash
# Build the tiny Linux guest that cloudlet's tests and demos boot under QEMU.
#
# Usage: tools/testguest/build.sh [OUTDIR]
#        OUTDIR defaults to ${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet/testguest}
#
# Output (all in OUTDIR):
#   vmlinuz     Debian 12 kernel (linux-image-6.1.0-NN-amd64, via apt-get download + dpkg -x)
#   initrd.img  gzip newc cpio: busybox-static, the kernel modules below (+ their dependencies
#               from depmod), and /init. It is also the root filesystem (RAM only).
#   disk.raw    64 MiB ext4 (mke2fs -d), mounted at /data; www/index.html says "cloudlet base disk"
#   guest.json  how to boot it: kernel, initrd, disk, append (kernel cmdline), memory_mib,
#               ready_marker
#
# What the guest does (/init):
#   1. mounts proc, sysfs, devtmpfs; installs busybox applets;
#   2. insmods, in order: crc16 mbcache jbd2 crc32c_generic ext4 virtio_ring virtio
#      virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk e1000 virtio_balloon;
#   3. waits (bounded, 30 s) for /dev/vda, mounts it ext4 at /data;
#   4. eth0 = 10.0.2.15/24, default gw 10.0.2.2 (QEMU user networking);
#   5. starts busybox httpd -p 80 -h /data/www;
#   6. waits (bounded) for the NIC's link, then prints CLOUDLET-GUEST-READY on the console (ttyS0);
#   7. serves an interactive busybox shell (prompt "guest# ") on ttyS0 forever, respawned when
#      it exits, for scripted commands.
# Files written under / (not /data) live only in RAM: tests use that to prove a VM was resumed
# from a memory snapshot rather than rebooted. The kernel cmdline sets init_on_free=1 so freed
# guest pages are zero and deduplicate as zero chunks.
#
# Idempotent and cached: a stamp records the hash of this script and the versions of the kernel
# and busybox packages; when they have not changed, the script exits at once. Installs what it
# needs with apt-get (as root). Needs only the Debian mirrors.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
OUTDIR="${1:-${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet/testguest}}"
MODULES="crc16 mbcache jbd2 crc32c_generic ext4 virtio_ring virtio virtio_pci_legacy_dev
virtio_pci_modern_dev virtio_pci virtio_blk e1000 virtio_balloon"
APPEND="console=ttyS0 init_on_free=1 quiet loglevel=3 mitigations=off"
READY_MARKER="CLOUDLET-GUEST-READY"
MEMORY_MIB=256
DISK_MIB=64

log() { echo "testguest: $*" >&2; }
die() { echo "testguest: error: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install packages"
    SUDO="sudo"
fi

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# ensure_pkg PACKAGE CHECK-PATH: install PACKAGE unless CHECK-PATH exists.
ensure_pkg() {
    local pkg="$1" check="$2"
    [ -e "$check" ] && return 0
    log "installing $pkg"
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "$pkg" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "$pkg" >&2 || die "cannot install $pkg"
    fi
}

ensure_pkg busybox-static /bin/busybox
ensure_pkg e2fsprogs /sbin/mke2fs
ensure_pkg cpio /usr/bin/cpio
ensure_pkg kmod /sbin/depmod
ensure_pkg qemu-system-x86 /usr/bin/qemu-system-x86_64
ensure_pkg qemu-utils /usr/bin/qemu-img

# Which kernel package: linux-image-amd64 depends on the current linux-image-6.1.0-NN-amd64.
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
KPKG="$(kernel_pkg)"
if [ -z "$KPKG" ]; then
    apt_update_once
    KPKG="$(kernel_pkg)"
fi
[ -n "$KPKG" ] || die "apt-cache depends linux-image-amd64 names no kernel package"
KPKG_VERSION="$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: //p')"
BUSYBOX_VERSION="$(dpkg-query -W -f='${Version}' busybox-static)"
STAMP_TEXT="script=$(sha256sum "$SCRIPT" | cut -d' ' -f1)
kernel=$KPKG=$KPKG_VERSION
busybox=$BUSYBOX_VERSION"

mkdir -p "$OUTDIR"
OUTDIR="$(readlink -f "$OUTDIR")"
exec 9>"$OUTDIR/.lock"
flock -w 900 9 || die "timed out waiting for another build in $OUTDIR"

outputs_present() {
    local f
    for f in vmlinuz initrd.img disk.raw guest.json; do
        [ -s "$OUTDIR/$f" ] || return 1
    done
}
if outputs_present && [ -f "$OUTDIR/.stamp" ] && [ "$(cat "$OUTDIR/.stamp")" = "$STAMP_TEXT" ]; then
    log "up to date in $OUTDIR"
    exit 0
fi

WORK="$(mktemp -d "$OUTDIR/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "downloading $KPKG ($KPKG_VERSION)"
(cd "$WORK" && apt-get download -qq "$KPKG=$KPKG_VERSION" 2>/dev/null) \
    || { apt_update_once; (cd "$WORK" && apt-get download -qq "$KPKG"); } \
    || die "apt-get download $KPKG failed"
log "unpacking kernel package"
mkdir "$WORK/kpkg"
dpkg -x "$WORK"/"$KPKG"_*.deb "$WORK/kpkg"
KVER="${KPKG#linux-image-}"
KROOT="$WORK/kpkg"
[ -d "$KROOT/lib/modules/$KVER" ] || die "no lib/modules/$KVER in $KPKG"
cp "$KROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

log "resolving module dependencies (depmod -b)"
depmod -b "$KROOT" "$KVER"
MODDIR="$KROOT/lib/modules/$KVER"
declare -A MODPATH=() MODDEPS=() LOADED=()
while IFS= read -r line; do
    path="${line%%:*}"
    name="$(basename "$path")"
    name="${name%%.ko*}"
    name="${name//-/_}"
    MODPATH[$name]="$path"
    MODDEPS[$name]="${line#*:}"
done <"$MODDIR/modules.dep"
ORDER=()
# add_module NAME: its dependencies first (modules.dep lists the deepest last), then itself.
add_module() {
    local name="${1//-/_}" dep deps=() i
    [ -n "${LOADED[$name]:-}" ] && return 0
    [ -n "${MODPATH[$name]:-}" ] || die "module $name not in $KPKG"
    read -r -a deps <<<"${MODDEPS[$name]}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        dep="$(basename "${deps[$i]}")"
        add_module "${dep%%.ko*}"
    done
    LOADED[$name]=1
    ORDER+=("$name")
}
for m in $MODULES; do add_module "$m"; done
log "modules: ${ORDER[*]}"

log "building initramfs"
IR="$WORK/initramfs"
mkdir -p "$IR"/{bin,sbin,etc,proc,sys,dev,data,tmp,root,run,var/log,lib/modules,usr/bin,usr/sbin}
cp /bin/busybox "$IR/bin/busybox"
ln -s busybox "$IR/bin/sh"
: >"$IR/etc/modules.order"
for m in "${ORDER[@]}"; do
    src="$MODDIR/${MODPATH[$m]}"
    case "$src" in
        *.ko) cp "$src" "$IR/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$src" >"$IR/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$IR/lib/modules/$m.ko" ;;
        *) die "unknown module format: $src" ;;
    esac
    echo "$m" >>"$IR/etc/modules.order"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$IR/etc/passwd"
echo "root:x:0:" >"$IR/etc/group"
echo "cloudlet-guest" >"$IR/etc/hostname"
cat >"$IR/init" <<EOF
#!/bin/sh
# cloudlet test guest init (generated by tools/testguest/build.sh)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname -F /etc/hostname
for m in \$(cat /etc/modules.order); do
    insmod /lib/modules/\$m.ko || echo "init: insmod \$m failed"
done
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i + 1)); done
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /data || echo "init: mounting /dev/vda failed"
else
    echo "init: no /dev/vda after 30 s"
fi
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
# Ready means reachable: e1000 reports link up ~2 s after the driver loads, and a snapshot taken
# before that makes every VM resumed from it wait for the link again.
i=0
while [ "\$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ \$i -lt 100 ]; do
    sleep 0.1; i=\$((i + 1))
done
[ "\$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = 1 ] || echo "init: eth0 has no carrier after 10 s"
httpd -p 80 -h /data/www
echo "$READY_MARKER"
export PS1='guest# '
while true; do
    setsid cttyhack sh -i
    sleep 0.2
done
EOF
chmod 755 "$IR/init"
(cd "$IR" && find . -print0 | sort -z | cpio --null -o -H newc --owner=0:0 --quiet) \
    | gzip -6 >"$WORK/initrd.img"

log "building ${DISK_MIB} MiB ext4 disk"
DD="$WORK/diskdir"
mkdir -p "$DD/www"
echo "cloudlet base disk" >"$DD/www/index.html"
cat >"$DD/README" <<EOF
cloudlet test guest data disk (mounted at /data). www/ is served by busybox httpd on port 80.
EOF
truncate -s "${DISK_MIB}M" "$WORK/disk.raw"
mke2fs -q -t ext4 -L cloudlet-data -d "$DD" -E root_owner=0:0 "$WORK/disk.raw"

cat >"$WORK/guest.json" <<EOF
{
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "disk": "disk.raw",
  "append": "$APPEND",
  "memory_mib": $MEMORY_MIB,
  "ready_marker": "$READY_MARKER",
  "kernel_package": "$KPKG=$KPKG_VERSION"
}
EOF

rm -f "$OUTDIR/.stamp"
for f in vmlinuz initrd.img disk.raw guest.json; do
    mv -f "$WORK/$f" "$OUTDIR/$f"
done
printf '%s' "$STAMP_TEXT" >"$OUTDIR/.stamp"
log "built in $OUTDIR"
