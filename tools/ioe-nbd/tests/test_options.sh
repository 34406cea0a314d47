#!/usr/bin/env bash
# ioe-nbd's command line: --help and --version, then each mistake a user can
# make fails with a message naming it and the documented exit status, before
# anything is served.
set -uo pipefail
nbd=$1
fail() { echo "FAIL: $*"; exit 1; }
expect() { # STATUS PATTERN ARGS...: runs ioe-nbd ARGS, checks status and message
  local status=$1 pattern=$2; shift 2
  out=$(timeout 30 "$nbd" "$@" 2>&1); rc=$?
  [ "$rc" -eq "$status" ] || fail "ioe-nbd $* exited $rc, expected $status: $out"
  echo "$out" | grep -q -- "$pattern" || fail "ioe-nbd $*: no '$pattern' in: $out"
  echo "ok: ioe-nbd $* -> $rc"
}
img=$(mktemp); truncate -s 1M "$img"
trap 'rm -f "$img"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null' EXIT
"$nbd" --help | grep -q -- "--export-name" || fail "--help"
"$nbd" --version | grep -q "ioe-nbd" || fail "--version"
expect 1 "No such file" /nonexistent/disk.img
expect 1 "not a regular file or block device" /dev/null
expect 2 "no FILE" -p 0
expect 2 "unknown option" --frobnicate "$img"
expect 2 "port must be" -p 70000 "$img"
expect 2 "cache must be" --cache=sometimes "$img"
expect 2 "format=raw" -f qcow2 "$img"
expect 2 "after FILE" "$img" extra
expect 1 "cannot listen" -b 300.1.1.1 -p 0 "$img"
expect 1 "cannot listen" -k /nonexistent-dir/nbd.sock "$img"
# A busy port: a second server on the first one's port.
coproc FIRST { exec "$nbd" -b 127.0.0.1 -p 0 "$img" 2>&1; }
pid=$FIRST_PID
read -r -t 30 line <&"${FIRST[0]}" || fail "the first server did not start"
port=$(echo "$line" | sed -n 's/.* port \([0-9]*\).*/\1/p')
expect 1 "Address already in use" -b 127.0.0.1 -p "$port" "$img"
kill -TERM "$pid"; wait "$pid" 2>/dev/null
echo "options: ok"
