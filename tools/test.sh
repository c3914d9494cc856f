#!/usr/bin/env bash
# Command 2 of the README: set up what is missing, then lint and run the whole test suite
# (unit tests and end-to-end tests on real QEMU guests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
.venv/bin/ruff check cloudlet tests benchmarks
exec .venv/bin/pytest -ra "$@"
