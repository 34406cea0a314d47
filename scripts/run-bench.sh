#!/usr/bin/env bash
# The main job: builds the library and ioe-bench with CMake (installing cmake
# if missing) and runs ioe-bench. Without arguments it runs a short,
# self-checking read/write workload on a temporary file; any arguments are
# passed to ioe-bench (see `bash scripts/run-bench.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq cmake >/dev/null
fi
build_dir=${IOENGINE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" --target ioe-bench -j "$(nproc)" >/dev/null
exec "$build_dir/bench/ioe-bench" "$@"
