#!/usr/bin/env bash
# Line coverage of the vmkit workspace with cargo-llvm-cov, gated by coverage/threshold.
#   bash coverage/run.sh           # summary + gate
#   bash coverage/run.sh --html    # also writes coverage/report/html/index.html
# The threshold only goes up; lowering it needs a reason in the commit message.
set -euo pipefail
cd "$(dirname "$0")/.."
threshold=$(tr -d '[:space:]' < coverage/threshold)
# Benches are measured by their own runs, not by the test suite; the guest programs are
# built for another target and are never instrumented.
ignore='(/benches/|examples/guests/)'
extra=()
if [ "${1:-}" = "--html" ]; then
    extra=(--html --output-dir coverage/report)
fi
cargo llvm-cov --workspace --locked \
    --ignore-filename-regex "$ignore" \
    --fail-under-lines "$threshold" \
    --summary-only "${extra[@]}"
echo "line coverage is at or above the ${threshold}% gate"
