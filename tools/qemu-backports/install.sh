#!/usr/bin/env bash
# Install the newest QEMU of Debian's bookworm-backports BESIDE the system QEMU 7.2, never over it.
#
# Usage: tools/qemu-backports/install.sh [OUTDIR]
#        OUTDIR defaults to ${CLOUDLET_QEMU_BACKPORTS_DIR:-$HOME/.cache/cloudlet/qemu-backports}
#
# 1. Adds an apt sources entry for bookworm-backports (same mirror URI as the machine's bookworm
#    entry). Backports are NotAutomatic: nothing is upgraded from them unless asked by name.
# 2. `apt-get download`s qemu-system-x86, qemu-system-common, qemu-system-data, qemu-utils and
#    seabios from bookworm-backports and unpacks them with `dpkg -x` into OUTDIR/root. Their
#    shared libraries all come from bookworm (checked with ldd below); the ipxe ROMs of
#    bookworm's ipxe-qemu (system) are the same for both QEMUs.
# 3. Writes OUTDIR/bin/qemu-system-x86_64 and OUTDIR/bin/qemu-img: wrappers that run the unpacked
#    binaries with LD_LIBRARY_PATH, QEMU_MODULE_DIR and `-L` for the unpacked firmware (its seabios first, then
#    QEMU's own data). `CLOUDLET_QEMU=OUTDIR/bin/qemu-system-x86_64` makes cloudlet use them
#    (qemu-img is taken from the same directory).
#
# Idempotent and cached: a stamp records the hash of this script and the package versions; when
# they have not changed, the script exits at once. Prints the wrapper's path on its last line.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
OUTDIR="${1:-${CLOUDLET_QEMU_BACKPORTS_DIR:-$HOME/.cache/cloudlet/qemu-backports}}"
SUITE=bookworm-backports
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios)
SOURCES=/etc/apt/sources.list.d/cloudlet-$SUITE.sources
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! apt-cache policy 2>/dev/null | grep -q " $SUITE/main "; then
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" {print $1; exit}')
    [ -n "$mirror" ] || { echo "qemu-backports: no bookworm apt source to take the mirror from" >&2; exit 1; }
    echo "qemu-backports: adding $SUITE from $mirror ($SOURCES)"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$SUITE" /usr/share/keyrings/debian-archive-keyring.gpg | $SUDO tee "$SOURCES" >/dev/null
    $SUDO apt-get update -qq
fi

versions=""
for pkg in "${PACKAGES[@]}"; do
    v=$(apt-cache madison "$pkg" | awk -F' [|] ' -v s="$SUITE/main" 'index($3, s) {print $2; exit}')
    [ -n "$v" ] || { echo "qemu-backports: $pkg is not in $SUITE" >&2; exit 1; }
    versions+="$pkg=$v "
done
want="$(sha256sum "$SCRIPT" | cut -d' ' -f1) $versions"
stamp="$OUTDIR/.stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$OUTDIR/bin/qemu-system-x86_64" ]; then
    echo "$OUTDIR/bin/qemu-system-x86_64"
    exit 0
fi

echo "qemu-backports: unpacking ${versions}into $OUTDIR"
work=$(mktemp -d "${TMPDIR:-/tmp}/qemu-backports.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && chmod 755 . && apt-get download -qq $versions 2>&1 | grep -v "unsandboxed" >&2 || true)
ls "$work"/*.deb >/dev/null
mkdir -p "$work/root" "$work/bin"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
if ldd "$work/root/usr/bin/qemu-system-x86_64" "$work/root/usr/bin/qemu-img" | grep "not found" >&2; then
    echo "qemu-backports: the unpacked QEMU needs libraries this machine lacks (above)" >&2
    exit 1
fi
root="$OUTDIR/root"
cat > "$work/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
# cloudlet: QEMU from $SUITE unpacked in $root (tools/qemu-backports/install.sh)
QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu" \\
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/seabios" -L "$root/usr/share/qemu" "\$@"
WRAP
cat > "$work/bin/qemu-img" <<WRAP
#!/bin/sh
# cloudlet: qemu-img from $SUITE unpacked in $root (tools/qemu-backports/install.sh)
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
exec "$root/usr/bin/qemu-img" "\$@"
WRAP
chmod 755 "$work/bin/"*
mkdir -p "$(dirname "$OUTDIR")"
rm -rf "$OUTDIR.old"
[ ! -e "$OUTDIR" ] || mv "$OUTDIR" "$OUTDIR.old"
mkdir -p "$OUTDIR"
mv "$work/root" "$work/bin" "$OUTDIR/"
rm -rf "$OUTDIR.old"
echo "$want" > "$stamp"
echo "$OUTDIR/bin/qemu-system-x86_64"
