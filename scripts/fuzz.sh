#!/usr/bin/env bash
# Fuzzes ioe-nbd with libFuzzer, SECONDS (default 60) per target, starting
# from the corpora kept in the repository:
#   session  the protocol state machine (tools/ioe-nbd/session.c: the
#            handshake, option haggling and request parsing)
#   options  the command line (tools/ioe-nbd/options.c)
#
#   bash scripts/fuzz.sh [SECONDS] [--merge]
#
# New inputs go to scratch directories; --merge adds those that reach new
# code to tools/ioe-nbd/fuzz/corpus/TARGET (minimised), to be committed. An
# input that crashes is saved as build/fuzz/crash-*; copy it into the
# target's corpus (named crash-WHAT) so that ctest's replay keeps it as a
# regression test. Needs clang with libFuzzer (Debian: clang and
# libclang-rt-N-dev); without it, says so and exits 0 (ctest still replays
# the corpora with the C compiler).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
merge=0
for arg in "$@"; do
  case "$arg" in
    --merge) merge=1 ;;
    *[!0-9]*) echo "usage: fuzz.sh [SECONDS] [--merge]" >&2; exit 2 ;;
    *) seconds=$arg ;;
  esac
done

if [ "$seconds" = 0 ]; then
  echo "fuzz.sh: SKIP: 0 seconds asked for (libFuzzer would take 0 as no limit)"
  exit 0
fi

out=${IOENGINE_BUILD_DIR:-build}/fuzz
mkdir -p "$out"
src=tools/ioe-nbd
flags=(-g -O1 -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I "$src" -I include)
# No clang or no libFuzzer runtime: skipped. A target that does not build: a failure.
probe="$out/probe.c"
printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' >"$probe"
if ! command -v clang >/dev/null || ! clang -fsanitize=fuzzer "$probe" -o "$out/probe" 2>"$out/build.log"; then
  echo "fuzz.sh: SKIP: no clang with libFuzzer here (see $out/build.log); the corpora are still replayed by ctest"
  exit 0
fi
for target in session options; do
  if ! clang "${flags[@]}" "$src/fuzz/fuzz_$target.c" "$src/$target.c" -o "$out/fuzz_$target" 2>"$out/build.log"; then
    cat "$out/build.log"
    echo "fuzz.sh: FAILED: fuzz_$target does not build"
    exit 1
  fi
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
# target, longest input, extra libFuzzer options
for spec in "session 80000" "options 512 -close_fd_mask=2"; do
  set -- $spec
  target=$1 max_len=$2
  shift 2
  corpus=$src/fuzz/corpus/$target
  mkdir -p "$scratch/$target" "$corpus"
  before=$(ls "$corpus" | wc -l)
  echo "fuzz.sh: $target for ${seconds}s from $before kept inputs"
  if ! "$out/fuzz_$target" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
       -print_final_stats=1 -artifact_prefix="$out/" "$@" "$scratch/$target" "$corpus" >"$out/$target.log" 2>&1; then
    tail -40 "$out/$target.log"
    echo "fuzz.sh: $target FAILED: the input is in $out/ (crash-*, leak-*, timeout-*); add it to $corpus as a regression"
    status=1
    continue
  fi
  grep -E "^Done [0-9]+ runs" "$out/$target.log" | sed "s/^/fuzz.sh: $target: /" || true
  grep -E "stat::peak_rss_mb" "$out/$target.log" | sed "s/^/fuzz.sh: $target: /" || true
  if [ "$merge" = 1 ]; then
    "$out/fuzz_$target" -merge=1 -max_len="$max_len" "$@" "$corpus" "$scratch/$target" >"$out/$target-merge.log" 2>&1
    echo "fuzz.sh: $target: corpus $before -> $(ls "$corpus" | wc -l) inputs (commit $corpus)"
  fi
done
[ "$status" = 0 ] && echo "fuzz.sh: ok, no crash, leak or timeout"
exit "$status"
