#!/bin/bash
# Build the distribution guest: a Debian 12 system as cloud images make it (systemd, DHCP on the
# first NIC through ifupdown, openssh-server, python3), the headline workload of the benchmarks
# and the guest of the distribution end-to-end test.
#
# Usage: tools/distroguest/build.sh [CACHEDIR]
#        CACHEDIR defaults to ${CLOUDLET_DISTRO_GUEST_DIR:-$HOME/.cache/cloudlet/distroguest}
# Prints the guest's directory, CACHEDIR/<recipe digest>, as the last line on stdout.
#
# The recipe is this script and everything beside it (tools/distroguest/); its digest names the
# output directory, so a changed recipe builds a new guest and an unchanged one is reused at once.
# A guest is built in CACHEDIR/.work.* and renamed into place whole: a directory named by a
# digest is always complete. Debian packages come from the mirror the machine's apt uses
# (CLOUDLET_DEBIAN_MIRROR overrides it).
#
# Output (in CACHEDIR/<digest>/):
#   vmlinuz, initrd.img  the guest's own kernel (linux-image-cloud-amd64) and initramfs
#   disk.raw             DISK_GIB GiB sparse ext4 root filesystem, 4 KiB blocks
#   id_ed25519[.pub]     the key root logs in with over ssh (authorized_keys in the image)
#   debs/                the customisation's application as .deb files: nginx-light and what
#                        it needs beyond the base, and cloudlet-notes (notes-app/: a Python web
#                        application over sqlite, a systemd unit, nginx proxying port 80 to it)
#   guest.json           how to boot it: kernel, initrd, disk, append, memory_mib, nic,
#                        ready_port (the guest's sshd, port 22), ssh_key, debs, app_port, and
#                        what the build cost (seconds, MB)
#
# The guest: root=/dev/vda (ext4), console=ttyS0, net.ifnames=0 and `allow-hotplug eth0` + `iface
# eth0 inet dhcp` (as Debian's cloud images), a virtio NIC, 1 GiB of RAM, no init_on_free. Apt's,
# dpkg's and the filesystems' periodic timers are masked so nothing starts by itself during a
# measurement. sshd's host keys are made once here and shared by every VM of this guest: a test
# image, not one to expose.
set -euo pipefail

HERE="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
CACHEDIR="${1:-${CLOUDLET_DISTRO_GUEST_DIR:-$HOME/.cache/cloudlet/distroguest}}"
SUITE=bookworm
PACKAGES="systemd-sysv,udev,ifupdown,isc-dhcp-client,iproute2,netbase,openssh-server,python3,\
e2fsprogs,linux-image-cloud-amd64"
APP_PACKAGES="nginx-light"  # installed by the customisation from debs/, not in the base
APPEND="console=ttyS0 root=/dev/vda rw net.ifnames=0 mitigations=off"
MEMORY_MIB=1024
DISK_GIB=3
READY_PORT=22
APP_PORT=80
MASKED_TIMERS="apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
fstrim.timer"

log() { echo "distroguest: $*" >&2; }
die() { echo "distroguest: error: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: mmdebstrap needs root here"
    SUDO="sudo"
fi

# ensure_pkg PACKAGE CHECK-PATH: install PACKAGE unless CHECK-PATH exists.
ensure_pkg() {
    local pkg="$1" check="$2"
    [ -e "$check" ] && return 0
    log "installing $pkg"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -o DPkg::Lock::Timeout=600 -y -qq \
        --no-install-recommends "$pkg" >&2 \
        || { $SUDO apt-get update -qq >&2 \
            && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -o DPkg::Lock::Timeout=600 \
                -y -qq --no-install-recommends "$pkg" >&2; } \
        || die "cannot install $pkg"
}
ensure_pkg mmdebstrap /usr/bin/mmdebstrap
ensure_pkg e2fsprogs /sbin/mke2fs
ensure_pkg openssh-client /usr/bin/ssh-keygen

# The Debian mirror the machine's apt reaches for $SUITE (deb822 or one-line sources).
host_mirror() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s { print $1; exit }'
}
MIRROR="${CLOUDLET_DEBIAN_MIRROR:-$(host_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian/}"

DIGEST="$(cd "$HERE" && find . -type f -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)"
mkdir -p "$CACHEDIR"
CACHEDIR="$(readlink -f "$CACHEDIR")"
OUT="$CACHEDIR/$DIGEST"
if [ -f "$OUT/guest.json" ]; then
    log "up to date in $OUT"
    echo "$OUT"
    exit 0
fi
exec 9>"$CACHEDIR/.lock"
flock -w 1800 9 || die "timed out waiting for another build in $CACHEDIR"
if [ -f "$OUT/guest.json" ]; then  # built by the run we waited for
    echo "$OUT"
    exit 0
fi

STARTED=$(date +%s)
WORK="$(mktemp -d "$CACHEDIR/.work.XXXXXX")"
# --one-file-system: a build killed inside mmdebstrap may leave its /proc, /sys mounted there
trap '$SUDO rm -rf --one-file-system "$WORK"' EXIT
ROOT="$WORK/root"

ssh-keygen -q -t ed25519 -N "" -C "cloudlet distribution guest" -f "$WORK/id_ed25519"
mkdir "$WORK/debs"
dpkg-deb --root-owner-group -Zxz --build "$HERE/notes-app" "$WORK/debs/cloudlet-notes_all.deb" >&2

log "mmdebstrap $SUITE from $MIRROR"
# The customise hooks run in the new root: the cloud image's network set-up, root's ssh key,
# the application's packages downloaded against exactly this system (what it lacks), timers.
$SUDO env WORK="$WORK" APP_PACKAGES="$APP_PACKAGES" MASKED_TIMERS="$MASKED_TIMERS" \
    mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
    --customize-hook='echo cloudlet-distro >"$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 cloudlet-distro\n" >"$1/etc/hosts"' \
    --customize-hook='printf "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
    --customize-hook='printf "%s\n" "auto lo" "iface lo inet loopback" "" \
        "allow-hotplug eth0" "iface eth0 inet dhcp" >"$1/etc/network/interfaces"' \
    --customize-hook='install -d -m 700 "$1/root/.ssh" &&
        install -m 600 "$WORK/id_ed25519.pub" "$1/root/.ssh/authorized_keys"' \
    --customize-hook='chroot "$1" systemctl mask $MASKED_TIMERS' \
    --customize-hook='mkdir -p "$1/tmp/debs/partial" &&
        chroot "$1" apt-get install -qq --download-only --no-install-recommends \
            -o Dir::Cache::archives=/tmp/debs/ $APP_PACKAGES &&
        cp "$1"/tmp/debs/*.deb "$WORK/debs/" && rm -rf "$1/tmp/debs"' \
    "$SUITE" "$ROOT" "$MIRROR" >&2
$SUDO chown -R "$(id -u):$(id -g)" "$WORK/debs"

KVER="$(basename "$(ls -d "$ROOT"/lib/modules/*)")"
[ -f "$ROOT/boot/vmlinuz-$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] \
    || die "no kernel and initrd for $KVER in /boot of the new system"
$SUDO install -m 644 -o "$(id -u)" -g "$(id -g)" "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
$SUDO install -m 644 -o "$(id -u)" -g "$(id -g)" "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
ROOT_MB=$($SUDO du -sm "$ROOT" | cut -f1)

log "making the ${DISK_GIB} GiB ext4 root filesystem (4 KiB blocks) from ${ROOT_MB} MB"
truncate -s "${DISK_GIB}G" "$WORK/disk.raw"
# inode tables and journal written now, so the guest's ext4lazyinit does not write them later
$SUDO mke2fs -q -t ext4 -b 4096 -L cloudlet-root -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$ROOT" "$WORK/disk.raw"
$SUDO chown "$(id -u):$(id -g)" "$WORK/disk.raw"
$SUDO rm -rf --one-file-system "$ROOT"

SECONDS_TAKEN=$(($(date +%s) - STARTED))
DISK_MB=$(du -sm "$WORK/disk.raw" | cut -f1)
OUTPUT_MB=$(du -sm "$WORK" | cut -f1)
cat >"$WORK/guest.json" <<EOF
{
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "disk": "disk.raw",
  "append": "$APPEND",
  "memory_mib": $MEMORY_MIB,
  "nic": "virtio",
  "ready_port": $READY_PORT,
  "ssh_user": "root",
  "ssh_key": "id_ed25519",
  "debs": "debs",
  "app_port": $APP_PORT,
  "kernel_version": "$KVER",
  "suite": "$SUITE",
  "mirror": "$MIRROR",
  "build_seconds": $SECONDS_TAKEN,
  "root_tree_mb": $ROOT_MB,
  "disk_allocated_mb": $DISK_MB,
  "output_mb": $OUTPUT_MB
}
EOF
mv -T "$WORK" "$OUT"
trap - EXIT
log "built in $OUT in ${SECONDS_TAKEN} s (${OUTPUT_MB} MB on disk, ${DISK_GIB} GiB disk sparse)"
echo "$OUT"
