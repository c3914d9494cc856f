#!/bin/bash
# The browser flow against the all-in-one's Horizon (after up.sh and e2e.sh): headless Chromium
# driven by selenium from the all-in-one's venv. Screenshots: $CLOUDLET_ARTIFACTS (default
# artifacts/browser/ in this checkout). See tools/aio/browser.py.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ -f "$AIO_DIR/state/stack" ] || die "the all-in-one is not up: run tools/aio/up.sh"
exec "$V/python" "$AIO_TOOLS/browser.py" "$@"
