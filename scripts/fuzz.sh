#!/usr/bin/env bash
# Fuzzes ioe-nbd's protocol state machine (tools/ioe-nbd/session.c: the
# handshake, option haggling and request parsing) with libFuzzer for
# SECONDS (default 60), starting from the corpus kept in the repository.
#
#   bash scripts/fuzz.sh [SECONDS] [--merge]
#
# New inputs go to a scratch directory; --merge adds those that reach new
# code to tools/ioe-nbd/fuzz/corpus (minimised), to be committed. An input
# that crashes is saved as build/fuzz/crash-*; copy it into the corpus
# (named crash-WHAT) so that ctest's nbd_fuzz_replay keeps it as a
# regression test. Needs clang with libFuzzer (Debian: clang and
# libclang-rt-N-dev); without it, says so and exits 0 (ctest still replays
# the corpus with the C compiler).
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

out=build/fuzz
mkdir -p "$out"
src=tools/ioe-nbd
flags=(-g -O1 -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I "$src")
if ! command -v clang >/dev/null ||
   ! clang "${flags[@]}" "$src/fuzz/fuzz_session.c" "$src/session.c" -o "$out/fuzz_session" 2>"$out/build.log"; then
  echo "fuzz.sh: SKIP: no clang with libFuzzer here (see $out/build.log); the corpus is still replayed by ctest"
  exit 0
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
corpus=$src/fuzz/corpus
before=$(ls "$corpus" | wc -l)
echo "fuzz.sh: fuzz_session for ${seconds}s from $before kept inputs"
# -max_len: a 64 KiB write payload (the harness's largest) and its header.
if ! "$out/fuzz_session" -max_total_time="$seconds" -max_len=80000 -timeout=10 -rss_limit_mb=2048 \
     -print_final_stats=1 -artifact_prefix="$out/" "$scratch" "$corpus" >"$out/fuzz.log" 2>&1; then
  tail -40 "$out/fuzz.log"
  echo "fuzz.sh: FAILED: the input is in $out/ (crash-*, leak-*, timeout-*); add it to $corpus as a regression"
  exit 1
fi
grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$out/fuzz.log" | sed 's/^/fuzz.sh: /' || true
grep -E "^Done [0-9]+ runs" "$out/fuzz.log" | sed 's/^/fuzz.sh: /' || true
if [ "$merge" = 1 ]; then
  "$out/fuzz_session" -merge=1 -max_len=80000 "$corpus" "$scratch" >"$out/merge.log" 2>&1
  echo "fuzz.sh: corpus $before -> $(ls "$corpus" | wc -l) inputs (commit $corpus)"
fi
echo "fuzz.sh: ok, no crash, leak or timeout"
