#!/bin/bash
# The user-level flow on the all-in-one (tools/aio/up.sh first), with `openstack` commands as a
# user types them: a member of project A (`demo`) imports a base package, creates a base,
# captures an overlay and synthesizes from it with `openstack cloudlet ...` (cloudlet-api, in the
# catalog as type `cloudlet`), boots and uses the servers; a member of project B (`alt_demo`) can
# neither see nor use any of it; the operator (admin) runs cloudlet-manage, which reads nova.conf.
#   an engine package (.cbase, made with the standalone `cloudlet base create` + `base export`):
#   the operator registers it twice from [cloudlet] base_import_dir (the second uploads nothing);
#   A imports it through the API (`cloudlet base import`: uploaded, verified, listed, shown);
#   a tampered copy is refused with the digest named and leaves nothing in Glance. It is not
#   booted: a base Nova resumes must have been saved with Nova's device set (docs/nova.md),
#   which a standalone base was not.
#   -> the test guest as Glance images (kernel, ramdisk, raw disk) -> a plain server boots it
#   -> `openstack cloudlet base create` makes a base VM of that running server
#   -> project B's own images labelled with A's base id (a forged disk image naming A's memory
#      image, a forged pair, an overlay naming A's base disk image) end in ERROR on the host
#   -> boot from the base (resumed: no boot on the console, uptime continues from the snapshot)
#   -> customise (a file on disk, a file in RAM, over the serial console)
#   -> `openstack cloudlet overlay create --wait` -> `openstack cloudlet synthesize --wait` -> the
#      synthesized server answers with both files
#   -> project B: A's overlay cannot be shown, downloaded, deleted or synthesized, A's server not
#      captured (through the CLI and cloudlet-api's own answers); no token -> 401
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
API=http://127.0.0.1:8790  # cloudlet-api (tools/aio/services.sh)
CM="$V/cloudlet-manage --config-file $A/etc/nova/nova.conf"
INSTANCES=$A/state/nova/instances
GUEST=${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet/testguest}
FLAVOR=cloudlet.small

[ -f "$A/state/stack" ] || die "the all-in-one is not up: run tools/aio/up.sh"
rm -rf "$E"; mkdir -p "$E"
# a previous run's servers, overlays and bases (A's names must be unique for name lookups); a
# base is deleted by an admin or a project manager (cloudlet:base:delete), not by a member
mapfile -t OLD < <($O server list -f value -c ID)
[ ${#OLD[@]} = 0 ] || $O server delete --wait "${OLD[@]}"
mapfile -t OLD < <($O cloudlet overlay list -f value -c id)
[ ${#OLD[@]} = 0 ] || $O cloudlet overlay delete "${OLD[@]}"
mapfile -t OLD < <($O cloudlet base list -f value -c id)
[ ${#OLD[@]} = 0 ] || $OA cloudlet base delete "${OLD[@]}"
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

# -- projects: A owns its objects, B can neither see nor use them ------------------------------
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
b_boot_refused() {  # IMAGE: B's boot of its own IMAGE ends in ERROR with a cloudlet fault,
    # nothing resumed (no domain, no instance directory)
    local id st fault
    id=$($OB server create --flavor "$FLAVOR" --image "$1" --nic none vm-forged -f value -c id)
    for _ in $(seq 1 120); do
        st=$($OB server show "$id" -f value -c status); [ "$st" = ERROR ] && break
        [ "$st" = ACTIVE ] && die "project B resumed A's base through its own image $1"; sleep 1
    done
    [ "$st" = ERROR ] || die "B's boot of image $1 is $st, not ERROR, after 120 s"
    fault=$($OB server show "$id" -f json -c fault | "$V/python" -c \
        'import json, sys; print(json.load(sys.stdin)["fault"]["message"])')
    assert_contains "$fault" "Cloudlet image "  # the image at fault: B's disk or memory image
    echo "aio: B's image $1 refused: $fault"
    [ ! -e "$INSTANCES/$id" ] || die "instance directory of B's refused server left on the host"
    $VIRSH list --all --name | grep -qx "$($OA server show "$id" -f value \
        -c OS-EXT-SRV-ATTR:instance_name)" && die "a libvirt domain of B's refused server is left"
    $OB server delete --wait "$id"
}
forged_by_b() {  # NAME PROPERTY...: B's own 1 MiB image of random bytes, labelled as told
    local name=$1; shift
    $OB image create --disk-format raw --container-format bare --file "$E/forged.raw" "$@" \
        "$name" -f value -c id
}
b_refused() {  # WORDS COMMAND...: B's `openstack cloudlet ...` fails and says WORDS
    local words=$1; shift
    $OB cloudlet "$@" > "$E/b.out" 2>&1 && die "project B could: openstack cloudlet $*"
    grep -qiE -- "$words" "$E/b.out" || die "B's 'openstack cloudlet $*' said: $(cat "$E/b.out")"
}
api_call() {  # TOKEN METHOD PATH [BODY] -> the HTTP status; the body in $E/api.out
    curl -s -o "$E/api.out" -w '%{http_code}' -X "$2" "$API$3" -H "X-Auth-Token: $1" \
        -H 'Content-Type: application/json' ${4:+-d "$4"}
}
median_ms() {  # TOKEN PATH: median of 20 GETs, in ms (curl's total time)
    for _ in $(seq 1 20); do
        curl -s -o /dev/null -w '%{time_total}\n' "$API$2" -H "X-Auth-Token: $1"
    done | sort -n | sed -n 10,11p | awk '{s += $1} END {printf "%.1f", s / 2 * 1000}'
}

# -- 1. an engine package: registered by the operator (twice), imported by A ------------------
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
PKG_BASE_ID=$(awk '/^base_id /{print $2}' "$E/register.out")
[ -n "$PKG_IMAGE" ] && [ -n "$PKG_BASE_ID" ] || die "registration printed no disk image or base id"
N_IMAGES=$($OA image list -f value -c ID | wc -l)
$CM base register "$PACKAGE" --name e2e-package > "$E/register2.out"
[ "$(awk '/^disk_image /{print $2}' "$E/register2.out")" = "$PKG_IMAGE" ] || \
    die "registering the same package twice made new images"
[ "$($OA image list -f value -c ID | wc -l)" = "$N_IMAGES" ] || die "the second registration uploaded"
step "cloudlet-manage base register (twice)"
$O cloudlet base import "$PACKAGE" --name e2e-package --wait -f json > "$E/import.json" \
    2> "$E/import.err" || die "base import failed: $(cat "$E/import.err")"
step "CLI: cloudlet base import --wait"
$O cloudlet base list -f value -c name -c base_id > "$E/bases.out"
grep -qx "e2e-package $PKG_BASE_ID" "$E/bases.out" || die "base list: $(cat "$E/bases.out")"
step "CLI: cloudlet base list"
mapfile -t IMPORTED < <($O cloudlet base show e2e-package -f value -c id -c base_id)
[ "${IMPORTED[1]:-}" = "$PKG_BASE_ID" ] || die "the imported base's id is not the package's $PKG_BASE_ID"
step "CLI: cloudlet base show"
# a tampered package: one byte of the kernel changed inside the (valid) tar stream; prints the
# kernel's sha256 its manifest promises
KERNEL_SHA=$("$V/python" - "$PACKAGE" "$E/tampered.cbase" <<'PY'
import io, json, sys, tarfile, zstandard
src, dst = sys.argv[1:]
with open(src, "rb") as i, open(dst, "wb") as o, \
        zstandard.ZstdDecompressor().stream_reader(i) as r, \
        zstandard.ZstdCompressor().stream_writer(o) as w, \
        tarfile.open(fileobj=r, mode="r|") as tin, tarfile.open(fileobj=w, mode="w|") as tout:
    for m in tin:
        data = tin.extractfile(m).read()
        if m.name == "manifest.json":
            print(next(f["sha256"] for f in json.loads(data)["files"] if f["name"] == "kernel"))
        if m.name == "kernel":
            data = data[:4096] + bytes([data[4096] ^ 0xFF]) + data[4097:]
        tout.addfile(m, io.BytesIO(data))
PY
)
N_IMAGES=$($OA image list -f value -c ID | wc -l)
$O cloudlet base import "$E/tampered.cbase" --name e2e-tampered --wait > "$E/tampered.out" 2>&1 \
    && die "a tampered package was imported"
grep -q "member kernel has sha256 .*says $KERNEL_SHA" "$E/tampered.out" || \
    die "the tampered package's refusal does not name the kernel's digest: $(cat "$E/tampered.out")"
[ "$($OA image list -f value -c ID | wc -l)" = "$N_IMAGES" ] || \
    die "a refused package left images in Glance"
echo "aio: tampered package refused: $(grep -o 'member kernel has sha256 [0-9a-f]*' "$E/tampered.out")"
step "CLI: tampered package refused, nothing in Glance"

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
$O cloudlet base create vm0 --name e2e-base --wait -f json > "$E/base.json" 2> "$E/base.err" \
    || die "base create failed: $(cat "$E/base.err")"
mapfile -t BASE < <($O cloudlet base show e2e-base -f value -c id -c base_id -c memory_image_id)
BASE_IMAGE=${BASE[0]:-}; BASE_MEMORY=${BASE[2]:-}
[ -n "$BASE_MEMORY" ] || die "base e2e-base has no memory image"
[ "$($O server show vm0 -f value -c status)" = ACTIVE ] || die "vm0 is not ACTIVE after base create"
echo "aio: base ${BASE[1]}: disk image $BASE_IMAGE, memory image $BASE_MEMORY"
step "CLI: cloudlet base create vm0 --wait"
# a package of this Nova-made base (resumable by Nova): the browser flow (browser.py) imports it
$O cloudlet base export e2e-base --file "$E/e2e-base.cbase"
[ -s "$E/e2e-base.cbase" ] || die "base export wrote nothing"
step "CLI: cloudlet base export e2e-base ($(du -m "$E/e2e-base.cbase" | cut -f1) MiB)"
refused_to_b "$BASE_IMAGE" "$BASE_MEMORY"
step "A's base images: project B cannot see or boot them"
# B's own images labelled with A's base (cached on the host since base create): by A's memory
# image (not B's to read), by a forged pair (Glance's content hashes are not the base's), and as
# an overlay naming A's base disk image; each refused on the host, nothing of A's base resumed
head -c 1M /dev/urandom > "$E/forged.raw"
FORGED_BY_MEMORY=$(forged_by_b forged-disk --property cloudlet_type=base-disk \
    --property cloudlet_base_id="${BASE[1]}" --property cloudlet_memory_image="$BASE_MEMORY")
b_boot_refused "$FORGED_BY_MEMORY"
FORGED_MEM=$(forged_by_b forged-mem --property cloudlet_type=base-memory \
    --property cloudlet_base_id="${BASE[1]}")
FORGED_DISK=$(forged_by_b forged-pair --property cloudlet_type=base-disk \
    --property cloudlet_base_id="${BASE[1]}" --property cloudlet_memory_image="$FORGED_MEM")
$OB image set --property cloudlet_disk_image="$FORGED_DISK" "$FORGED_MEM"
b_boot_refused "$FORGED_DISK"
FORGED_OVERLAY=$(forged_by_b forged-overlay --property cloudlet_type=overlay \
    --property cloudlet_base_id="${BASE[1]}" --property cloudlet_base_disk_image="$BASE_IMAGE")
b_boot_refused "$FORGED_OVERLAY"
$OB image delete "$FORGED_BY_MEMORY" "$FORGED_MEM" "$FORGED_DISK" "$FORGED_OVERLAY"
step "B's images forged with A's base id: refused on the host"
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
$O cloudlet overlay create vm1 --name app --wait -f json > "$E/capture.json" 2> "$E/capture.err" \
    || die "overlay create failed: $(cat "$E/capture.err")"
OVERLAY=$($O cloudlet overlay show app -f value -c id)
[ "$($O server show vm1 -f value -c status)" = ACTIVE ] || die "vm1 is not ACTIVE after capture"
assert_contains "$(guest_run vm1 'cat /ram.txt')" customised-in-ram
echo "aio: overlay $OVERLAY: $($O cloudlet overlay show app -f value -c size) bytes"
step "CLI: cloudlet overlay create vm1 --wait"
$O cloudlet overlay list -f value -c name | grep -qx app || die "overlay list has no 'app'"
step "CLI: cloudlet overlay list"

# -- 5. project B: refused everywhere, nothing changed ------------------------------------------
VM1=$($O server show vm1 -f value -c id)
TOKEN_A=$($O token issue -f value -c id)
TOKEN_B=$($OB token issue -f value -c id)
$OB cloudlet overlay list -f value -c id | grep -qx "$OVERLAY" && die "B lists A's overlay"
# the client looks the overlay up first (cloudlet-api: 404) and the server (Nova: 404)
NO_OVERLAY="no overlay with id or name '$OVERLAY'"
b_refused "$NO_OVERLAY" overlay show "$OVERLAY"
b_refused "$NO_OVERLAY" overlay download "$OVERLAY" --file "$E/b.overlay"
[ ! -e "$E/b.overlay" ] && [ ! -e "$E/b.overlay.part" ] || die "B's download left a file"
b_refused "$NO_OVERLAY" overlay delete "$OVERLAY"
b_refused "no server with id or name '$VM1'" overlay create "$VM1" --name stolen --wait
b_refused "$NO_OVERLAY" synthesize "$OVERLAY" --flavor "$FLAVOR" --no-network --name b1 --wait
# cloudlet-api's own answers to B, past the client's look-ups: 404 for each
b_api_404() {  # METHOD PATH [BODY]
    local code; code=$(api_call "$TOKEN_B" "$@")
    [ "$code" = 404 ] && grep -qiE "not (be )?found|not a cloudlet" "$E/api.out" || \
        die "cloudlet-api answered B's $1 $2 with $code: $(cat "$E/api.out")"
}
b_api_404 GET "/overlays/$OVERLAY/file"
b_api_404 DELETE "/overlays/$OVERLAY"
b_api_404 POST /overlays "{\"server_id\": \"$VM1\", \"name\": \"stolen\"}"
b_api_404 POST /syntheses "{\"overlay_id\": \"$OVERLAY\", \"name\": \"b1\",
    \"flavor_id\": \"$FLAVOR_ID\", \"network\": \"none\"}"
[ -z "$($OB cloudlet task list -f value -c id)" ] || die "project B has tasks"
[ "$($O cloudlet overlay show "$OVERLAY" -f value -c status)" = active ] || die "A's overlay changed"
refused_to_b "$OVERLAY"
code=$(api_call "" GET /overlays)
[ "$code" = 401 ] || die "cloudlet-api answered a request without a token with $code"
step "B refused A's overlay and server; no token: 401"

# -- 5b. Elijah's server action on Nova's endpoint (the cloudlet filter in nova-api's pipeline) --
NOVA=http://127.0.0.1:8774/v2.1  # nova-api (tools/aio/services.sh)
nova_action() {  # TOKEN SERVER BODY -> the HTTP status; the body in $E/nova.out
    curl -s -o "$E/nova.out" -w '%{http_code}' -X POST "$NOVA/servers/$2/action" \
        -H "X-Auth-Token: $1" -H 'Content-Type: application/json' -d "$3"
}
ACTION='{"cloudlet-overlay-finish": {"overlay-name": "app-nova", "after": "resume"}}'
code=$(nova_action "$TOKEN_B" "$VM1" "$ACTION")
[ "$code" = 404 ] || die "Nova answered B's overlay-finish of vm1 with $code: $(cat "$E/nova.out")"
code=$(nova_action "$TOKEN_A" "$VM1" "$ACTION")
[ "$code" = 202 ] || die "Nova answered A's overlay-finish of vm1 with $code: $(cat "$E/nova.out")"
NOVA_TASK=$("$V/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["task"]["id"])' \
    "$E/nova.out")
deadline=$((SECONDS + 300))
while STATE=$($O cloudlet task show "$NOVA_TASK" -f value -c state) && [ "$STATE" = running ] \
        && [ $SECONDS -lt $deadline ]; do
    sleep 2
done
[ "$STATE" = succeeded ] || die "the Nova action's task $NOVA_TASK is $STATE:" \
    "$($O cloudlet task show "$NOVA_TASK" -f value -c error)"
[ "$($O server show vm1 -f value -c status)" = ACTIVE ] || die "vm1 not ACTIVE after the action"
$O cloudlet overlay delete app-nova
step "Nova API: cloudlet-overlay-finish of vm1 (B: 404)"

# -- 6. synthesis: a new server from the overlay -----------------------------------------------
$O cloudlet synthesize app --flavor "$FLAVOR" --no-network --name app1 --wait -f json \
    > "$E/synth.json" 2> "$E/synth.err" || die "synthesize failed: $(cat "$E/synth.err")"
[ "$($O server show app1 -f value -c status)" = ACTIVE ] || die "app1 is not ACTIVE"
step "CLI: cloudlet synthesize app --wait"
OUT=$(guest_run app1 "cat /data/www/index.html /ram.txt")
assert_contains "$OUT" customised-on-disk
assert_contains "$OUT" customised-in-ram
echo "aio: app1 answers: $(echo "$OUT" | tr '\n' ' ')"
step "app1 answers with the customised content"
echo "aio: cloudlet-api latency, median of 20 (ms): base list $(median_ms "$TOKEN_A" /bases)," \
    "base show $(median_ms "$TOKEN_A" "/bases/$BASE_IMAGE"), overlay list" \
    "$(median_ms "$TOKEN_A" /overlays), overlay show $(median_ms "$TOKEN_A" "/overlays/$OVERLAY")"
step "API latency (4 x 20 GETs)"

# -- 7. a tampered overlay is refused, nothing left behind --------------------------------------
$O cloudlet overlay download app --file "$E/overlay"
step "CLI: cloudlet overlay download"
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

$O server delete --wait vm1 app1 vm3
$O image delete "$BAD"
$O cloudlet overlay delete app
$O cloudlet base delete e2e-base > "$E/delete.out" 2>&1 && die "a member deleted a base"
grep -q "policy does not allow cloudlet:base:delete" "$E/delete.out" || \
    die "a member's base delete: $(cat "$E/delete.out")"
$OA cloudlet base delete "$BASE_IMAGE" "${IMPORTED[0]}"  # an admin may (and a project manager)
[ -z "$($O cloudlet overlay list -f value -c id)$($O cloudlet base list -f value -c id)" ] || \
    die "A still has overlays or bases after deleting them"
step "clean up servers, overlay, bases"
echo "aio: e2e PASSED"
