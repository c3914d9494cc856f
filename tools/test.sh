#!/usr/bin/env bash
# Command 2 of the README: set up what is missing, then lint and run the whole test suite
# (unit tests and end-to-end tests on real QEMU guests), then the Nova driver's tests in Nova's own
# functional framework (stestr, not pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
.venv/bin/ruff check cloudlet tests benchmarks cloudlet_nova nova
.venv/bin/pytest -ra "$@"
exec .venv/bin/python -m stestr --test-path cloudlet_nova/tests run
