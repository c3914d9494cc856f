#!/usr/bin/env bash
# Command 2 of the README: set up what is missing, then lint, run the dashboard's unit tests
# (Django's runner) and the whole test suite
# (unit tests and end-to-end tests on real QEMU guests), then the QEMU-dependent tests (marker
# `qemu`, except those going through libvirt) again on bookworm-backports' QEMU
# (tools/qemu-backports/install.sh), then the Nova driver's tests in Nova's own functional
# framework (stestr, not pytest). Extra arguments go to both pytest passes. With CLOUDLET_QEMU
# set, only that QEMU is tested (one pass, without the cross-version tests, which need the
# system QEMU as the session's).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
.venv/bin/ruff check cloudlet tests benchmarks cloudlet_nova cloudlet_api cloudletclient \
    cloudlet_dashboard nova
# The Horizon plugin's unit tests, in Django's test runner as Horizon's own (no guest needed)
.venv/bin/python -m django test cloudlet_dashboard --settings=cloudlet_dashboard.test.settings
if [ -n "${CLOUDLET_QEMU:-}" ]; then
    echo "test: QEMU $CLOUDLET_QEMU"
    .venv/bin/pytest -ra -m "not cross_version" "$@"
else
    .venv/bin/pytest -ra "$@"
    newer=$(tools/qemu-backports/install.sh | tail -n 1)
    echo "test: second pass, the QEMU-dependent tests on $newer"
    rc=0
    CLOUDLET_QEMU=$newer .venv/bin/pytest -ra -m "qemu and not cross_version and not libvirt" "$@" \
        || rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"  # 5: the arguments selected no QEMU test
fi
exec .venv/bin/python -m stestr --test-path cloudlet_nova/tests run
