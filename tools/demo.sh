#!/usr/bin/env bash
# Command 1 of the README: set up, then run the standalone job end to end on a real guest:
# base VM -> customised VM resumed from the base's memory -> overlay -> base exported and imported
# into a second, empty cloudlet home -> synthesis there -> the guest answers with the customised
# content (disk) and the state that only lived in RAM; then the same overlay from a URL (a web
# server with Range support) with early start, and through `cloudlet serve` as an upload.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
GUEST=${CLOUDLET_GUEST_DIR:-$HOME/.cache/cloudlet/testguest}
WORK=${CLOUDLET_DEMO_DIR:-/tmp/cloudlet-demo}
rm -rf "$WORK"; mkdir -p "$WORK"
export PATH="$PWD/.venv/bin:$PATH"
guest() { .venv/bin/python -c "import json,sys; print(json.load(open('$GUEST/guest.json'))['$1'])"; }
port() { .venv/bin/python -c "from cloudlet.hypervisor.qemu import free_port; print(free_port())"; }

echo "== 1. base VM: boot the test guest, snapshot it once it serves HTTP (cloudlet home A)"
export CLOUDLET_HOME="$WORK/home-a"
cloudlet base create "$GUEST/$(guest disk)" --name testguest \
    --kernel "$GUEST/$(guest kernel)" --initrd "$GUEST/$(guest initrd)" \
    --append "$(guest append)" --memory "$(guest memory_mib)" \
    --ready-marker "$(guest ready_marker)"
cloudlet base list

echo "== 2. overlay: resume the base from memory, customise it, capture what changed"
cloudlet overlay create testguest --script tools/demo/customize.sh -o "$WORK/app.overlay"
cloudlet overlay show "$WORK/app.overlay"

echo "== 3. move the base to an empty cloudlet home B (export + import, every digest verified)"
cloudlet base export testguest "$WORK/testguest.cbase"
export CLOUDLET_HOME="$WORK/home-b"
cloudlet base import "$WORK/testguest.cbase"

echo "== 4. synthesize in home B and ask the resumed guest"
DISK_PORT=$(port); RAM_PORT=$(port)
cloudlet synthesize "$WORK/app.overlay" --check-and-exit \
    --forward "tcp:$DISK_PORT:80" --forward "tcp:$RAM_PORT:8080" \
    --check-url "http://127.0.0.1:$DISK_PORT/" --check-url "http://127.0.0.1:$RAM_PORT/"

echo "== 5. early start from a URL: the guest resumes before the overlay has arrived"
WEB_PORT=$(port)
busybox httpd -f -p "127.0.0.1:$WEB_PORT" -h "$WORK" & WEB_PID=$!
SERVE_PID=""
trap 'kill $WEB_PID $SERVE_PID 2>/dev/null || true' EXIT
DISK_PORT=$(port)
cloudlet synthesize "http://127.0.0.1:$WEB_PORT/app.overlay" --check-and-exit --wait-complete \
    --forward "tcp:$DISK_PORT:80" --check-url "http://127.0.0.1:$DISK_PORT/"

echo "== 6. the synthesis server: upload the overlay to \`cloudlet serve\` and ask the guest"
API_PORT=$(port)
cloudlet serve --listen "127.0.0.1:$API_PORT" > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 100); do [ -s "$CLOUDLET_HOME/server.token" ] && break; sleep 0.1; done
DISK_PORT=$(port)
cloudlet synthesize --server "http://127.0.0.1:$API_PORT" "$WORK/app.overlay" --check-and-exit \
    --forward "tcp:$DISK_PORT:80" --check-url "http://127.0.0.1:$DISK_PORT/"
echo "demo: done (files in $WORK)"
