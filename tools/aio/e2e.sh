#!/bin/bash
# The user-level flow on the all-in-one (tools/aio/up.sh first), with `openstack` commands and
# cloudlet-manage. A user (member of project A, `demo`) uploads images and boots and uses the
# servers; the operator (admin) runs cloudlet-manage, which reads nova.conf. Until the cloudlet
# API exists the images cloudlet-manage publishes belong to the admin's project: the operator
# hands a base's and an overlay's images to A (`openstack image set --project`). A member of
# project B (`alt_demo`) can neither see nor boot A's private base and overlay images.
#   the operator registers an engine package (.cbase, made with the standalone `cloudlet base
#   create` + `base export`, put in [cloudlet] base_import_dir) twice: the second uploads
#   nothing. It is not booted: a base Nova resumes must have been saved with Nova's device set
#   (docs/nova.md), which a standalone base was not.
#   -> the test guest as Glance images (kernel, ramdisk, raw disk) -> a plain server boots it
#   -> `cloudlet-manage base create` makes a base VM of that running server
#   -> boot from the base (resumed: no boot on the console, uptime continues from the snapshot)
#   -> customise (a file on disk, a file in RAM, over the serial console)
#   -> capture an overlay -> boot a new server from the overlay -> it answers with both files
#   -> a tampered overlay -> ERROR with a clear fault, nothing left on the host.
# The guest's serial console (a pty, logged to console.log) is how the test talks to it: the
# servers have no network (--nic none).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$AIO_TOOLS/adminrc"
A=$AIO_DIR
E=$A/e2e
OA="$V/openstack"                                                               # the operator
O="env OS_USERNAME=demo OS_PASSWORD=demopass OS_PROJECT_NAME=demo $V/openstack"  # A's member
OB="env OS_USERNAME=alt_demo OS_PASSWORD=alt_demopass OS_PROJECT_NAME=alt_demo $V/openstack"
CM="$V/cloudlet-manage --config-file $A/etc/nova/nova.conf"
INSTANCES=$A/state/nova/instances
GUEST=${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet/testguest}
FLAVOR=cloudlet.small

[ -f "$A/state/stack" ] || die "the all-in-one is not up: run tools/aio/up.sh"
rm -rf "$E"; mkdir -p "$E"
for s in vm0 vm1 vm2 vm3; do  # a previous run's servers
    $O server show "$s" >/dev/null 2>&1 && $O server delete --wait "$s"
done
# the packages `cloudlet-manage base register` may import ([cloudlet] base_import_dir)
IMPORT_DIR=$(awk -F' *= *' '/^base_import_dir/{print $2}' "$A/etc/nova/nova.conf")
[ -n "$IMPORT_DIR" ] || die "no [cloudlet] base_import_dir in $A/etc/nova/nova.conf"
mkdir -p "$IMPORT_DIR"

# -- talking to a guest over its serial console ---------------------------------------------
pty_of() {  # SERVER-ID -> the pty of its serial console (the admin sees the domain's name)
    local dom; dom=$($OA server show "$1" -f value -c OS-EXT-SRV-ATTR:instance_name)
    $VIRSH dumpxml "$dom" | "$V/python" -c 'import sys, xml.etree.ElementTree as E
print(E.fromstring(sys.stdin.read()).find("./devices/serial/source").get("path"))'
}
guest_run() {  # SERVER COMMAND -> its output (bounded wait: 60 s)
    local id log pty n out
    id=$($O server show "$1" -f value -c id); log=$INSTANCES/$id/console.log; pty=$(pty_of "$id")
    n=$RANDOM$RANDOM
    # QEMU reads the pty only while its other end is open (it polls for that once a second):
    # hold it open, raw and without echo (the guest's output must not come back as its input),
    # and drain what the guest prints (console.log has it too)
    exec {fd}<>"$pty"
    stty -F "$pty" raw -echo
    timeout 90 cat <&"$fd" >/dev/null & local drain=$!
    sleep 2
    printf '\necho E2E""-%s-begin; %s; echo E2E""-%s-end\n' "$n" "$2" "$n" >&"$fd"
    for _ in $(seq 1 120); do
        out=$(tr -d '\r' < "$log" | sed -n "/^E2E-$n-begin\$/,/^E2E-$n-end\$/p")
        if echo "$out" | grep -q "^E2E-$n-end\$"; then
            kill "$drain" 2>/dev/null; wait "$drain" 2>/dev/null || true; exec {fd}>&-
            echo "$out" | sed '1d;$d'; return 0
        fi
        sleep 0.5
    done
    kill "$drain" 2>/dev/null; exec {fd}>&-
    die "server $1 did not answer '$2' on its serial console within 60 s (log: $log)"
}
assert_contains() { echo "$1" | grep -qF -- "$2" || die "expected '$2' in: $1"; }

wait_console() {  # SERVER TEXT SECONDS: wait for TEXT in the server's console log
    local id; id=$($O server show "$1" -f value -c id)
    for _ in $(seq 1 "$3"); do
        grep -qF -- "$2" "$INSTANCES/$id/console.log" 2>/dev/null && return 0; sleep 1
    done
    die "no '$2' on $1's console within $3 s (log: $INSTANCES/$id/console.log)"
}

# -- projects: A owns its images, B can neither see nor boot them -----------------------------
give_to_a() {  # CLOUDLET-MANAGE OUTPUT: its images become project A's (private)
    local id
    for id in $(awk '/_image /{print $2}' "$1"); do
        $OA image set --project demo --private "$id"
        [ "$($O image show "$id" -f value -c visibility)" = private ] || \
            die "A cannot see image $id"
    done
}
refused_to_b() {  # IMAGE...: B neither sees nor boots them, through OSC and Nova's API
    local id token code
    for id in "$@"; do
        $OB image show "$id" > "$E/b.out" 2>&1 && die "project B sees A's private image $id"
        grep -qi "no image found\|not found" "$E/b.out" || \
            die "B's image show $id: $(cat "$E/b.out")"
    done
    $OB server create --flavor "$FLAVOR" --image "$1" --nic none vm-b > "$E/b.out" 2>&1 \
        && die "project B booted A's private image $1"
    token=$($OB token issue -f value -c id)  # Nova's API itself, not only OSC's image lookup
    code=$(curl -s -o "$E/b.out" -w '%{http_code}' -X POST http://127.0.0.1:8774/v2.1/servers \
        -H "X-Auth-Token: $token" -H 'OpenStack-API-Version: compute 2.37' \
        -H 'Content-Type: application/json' -d "{\"server\": {\"name\": \"vm-b\",
        \"imageRef\": \"$1\", \"flavorRef\": \"$FLAVOR_ID\", \"networks\": \"none\"}}")
    [ "$code" = 400 ] && grep -q "Can not find requested image" "$E/b.out" || \
        die "Nova's API answered B's boot of A's image $1 with $code: $(cat "$E/b.out")"
    [ -z "$($OB server list -f value -c ID)" ] || die "project B has a server"
}

# -- 1. an engine package registered (twice: the second uploads nothing) ---------------------
"$AIO_REPO/tools/testguest/build.sh" "$GUEST" >/dev/null
APPEND=$("$V/python" -c "import json; print(json.load(open('$GUEST/guest.json'))['append'])")
MARKER=$("$V/python" -c "import json; print(json.load(open('$GUEST/guest.json'))['ready_marker'])")
export CLOUDLET_HOME=$E/home
"$V/cloudlet" base create "$GUEST/disk.raw" --name e2e-guest --kernel "$GUEST/vmlinuz" \
    --initrd "$GUEST/initrd.img" --append "$APPEND" --memory 256 \
    --ready-marker "$MARKER" > "$E/base-create.log" 2>&1
PACKAGE=$IMPORT_DIR/e2e-guest.cbase
rm -f "$PACKAGE"
"$V/cloudlet" base export e2e-guest "$PACKAGE" > /dev/null
step "standalone base create + export"
$CM base register "$PACKAGE" --name e2e-package > "$E/register.out"
PKG_IMAGE=$(awk '/^disk_image /{print $2}' "$E/register.out")
[ -n "$PKG_IMAGE" ] || die "registration printed no disk image"
N_IMAGES=$($OA image list -f value -c ID | wc -l)
$CM base register "$PACKAGE" --name e2e-package > "$E/register2.out"
[ "$(awk '/^disk_image /{print $2}' "$E/register2.out")" = "$PKG_IMAGE" ] || \
    die "registering the same package twice made new images"
[ "$($OA image list -f value -c ID | wc -l)" = "$N_IMAGES" ] || die "the second registration uploaded"
step "cloudlet-manage base register (twice)"

# -- 2. the base, created in Nova from a running server -----------------------------------------
$OA flavor show "$FLAVOR" >/dev/null 2>&1 || $OA flavor create --ram 256 --disk 1 --vcpus 1 "$FLAVOR" >/dev/null
FLAVOR_ID=$($OA flavor show "$FLAVOR" -f value -c id)
KERNEL=$($O image create --disk-format aki --container-format aki --file "$GUEST/vmlinuz" \
         e2e-kernel -f value -c id)
RAMDISK=$($O image create --disk-format ari --container-format ari --file "$GUEST/initrd.img" \
          e2e-ramdisk -f value -c id)
GUEST_IMAGE=$($O image create --disk-format raw --container-format bare --file "$GUEST/disk.raw" \
              --property kernel_id="$KERNEL" --property ramdisk_id="$RAMDISK" \
              --property os_command_line="$APPEND" e2e-guest -f value -c id)
step "test guest into Glance (kernel, ramdisk, disk)"
$O server create --flavor "$FLAVOR" --image "$GUEST_IMAGE" --nic none --wait vm0 >/dev/null
step "boot vm0 (plain) to ACTIVE"
wait_console vm0 "$MARKER" 300
UPTIME0=$(guest_run vm0 "cut -d' ' -f1 /proc/uptime")
echo "aio: vm0 booted: guest uptime ${UPTIME0}s"
step "vm0 guest ready"
$CM base create "$($O server show vm0 -f value -c id)" --name e2e-base > "$E/base.out"
BASE_IMAGE=$(awk '/^disk_image /{print $2}' "$E/base.out")
[ -n "$BASE_IMAGE" ] || die "base create printed no disk image"
[ "$($O server show vm0 -f value -c status)" = ACTIVE ] || die "vm0 is not ACTIVE after base create"
echo "aio: base $(awk '/^base_id /{print $2}' "$E/base.out"): disk image $BASE_IMAGE"
step "cloudlet-manage base create vm0"
give_to_a "$E/base.out"
# shellcheck disable=SC2046
refused_to_b $(awk '/_image /{print $2}' "$E/base.out")
step "A's base images: project B cannot see or boot them"
$O server delete --wait vm0
step "delete vm0"

# -- 3. boot from the base: resumed, not booted ----------------------------------------------
$O server create --flavor "$FLAVOR" --image "$BASE_IMAGE" --nic none --wait vm1 >/dev/null
step "boot vm1 from the base to ACTIVE"
UPTIME=$(guest_run vm1 "cut -d' ' -f1 /proc/uptime")
$O console log show vm1 | grep -qF "$MARKER" && die "vm1's console shows a boot (the ready marker)"
[ "$(echo "$UPTIME >= $UPTIME0" | bc)" = 1 ] || \
    die "vm1's uptime ${UPTIME}s does not continue the snapshot's (vm0 had ${UPTIME0}s before it)"
echo "aio: vm1 resumed: guest uptime ${UPTIME}s (vm0 had ${UPTIME0}s before the snapshot), no boot on its console"
step "vm1 answers on its console"

# -- 4. customise, capture ---------------------------------------------------------------------
guest_run vm1 "echo customised-on-disk > /data/www/index.html && sync && echo customised-in-ram > /ram.txt" >/dev/null
$CM overlay capture "$($O server show vm1 -f value -c id)" --name e2e-overlay > "$E/capture.out"
OVERLAY=$(awk '/^overlay_image /{print $2}' "$E/capture.out")
[ -n "$OVERLAY" ] || die "capture printed no overlay image"
give_to_a "$E/capture.out"
[ "$($O server show vm1 -f value -c status)" = ACTIVE ] || die "vm1 is not ACTIVE after capture"
assert_contains "$(guest_run vm1 'cat /ram.txt')" customised-in-ram
echo "aio: overlay $OVERLAY: $($O image show "$OVERLAY" -f value -c size) bytes"
step "capture overlay (vm1 runs on)"
refused_to_b "$OVERLAY"
step "A's overlay: project B cannot see or boot it"

# -- 5. a new server from the overlay ----------------------------------------------------------
$O server create --flavor "$FLAVOR" --image "$OVERLAY" --nic none --wait vm2 >/dev/null
step "boot vm2 from the overlay to ACTIVE"
OUT=$(guest_run vm2 "cat /data/www/index.html /ram.txt")
assert_contains "$OUT" customised-on-disk
assert_contains "$OUT" customised-in-ram
echo "aio: vm2 answers: $(echo "$OUT" | tr '\n' ' ')"
step "vm2 answers with the customised content"

# -- 6. a tampered overlay is refused, nothing left behind --------------------------------------
$O image save --file "$E/overlay" "$OVERLAY"
"$V/python" - "$E/overlay" <<'PY'
import sys
p = sys.argv[1]; data = bytearray(open(p, "rb").read())
data[len(data) * 3 // 4] ^= 0xFF  # inside a frame
open(p, "wb").write(data)
PY
PROPS=$($O image show "$OVERLAY" -f json -c properties | "$V/python" -c 'import json, sys
p = json.load(sys.stdin)["properties"]
print(" ".join(f"--property {k}={v}" for k, v in p.items() if k.startswith("cloudlet_")))')
# shellcheck disable=SC2086
BAD=$($O image create --disk-format raw --container-format bare --file "$E/overlay" $PROPS \
      e2e-tampered -f value -c id)
$O server create --flavor "$FLAVOR" --image "$BAD" --nic none vm3 >/dev/null
for _ in $(seq 1 120); do
    S=$($O server show vm3 -f value -c status); [ "$S" = ERROR ] && break
    [ "$S" = ACTIVE ] && die "a tampered overlay booted"; sleep 1
done
[ "$S" = ERROR ] || die "vm3 is $S, not ERROR, after 120 s"
FAULT=$($O server show vm3 -f json -c fault | "$V/python" -c 'import json,sys; print(json.load(sys.stdin)["fault"]["message"])')
echo "aio: vm3 ERROR: $FAULT"
assert_contains "$FAULT" "$BAD"
VM3=$($O server show vm3 -f value -c id)
[ ! -e "$INSTANCES/$VM3" ] || die "instance directory of vm3 left on the host"
[ -z "$(ls -A "$INSTANCES/_cloudlet/tmp" 2>/dev/null)" ] || die "staging left in the base cache"
DOM3=$($OA server show "$VM3" -f value -c OS-EXT-SRV-ATTR:instance_name)
[ -n "$DOM3" ] || die "no libvirt domain name for vm3"
$VIRSH list --all --name | grep -qx "$DOM3" \
    && die "a libvirt domain of vm3 is left" || true
step "tampered overlay -> ERROR, nothing left"

$O server delete --wait vm1 vm2 vm3
$O image delete "$BAD"
step "clean up servers"
echo "aio: e2e PASSED"
