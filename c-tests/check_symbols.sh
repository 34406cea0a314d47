#!/usr/bin/env bash
# The shared library exports exactly the functions the header declares, all
# with the ioe_ prefix, and carries the soname libioengine.so.<major>
# (libioengine.so.0.<minor> while the major version is 0).
set -euo pipefail
so=$1
header=$2

exported=$(nm -D --defined-only "$so" | awk '{print $3}' | sed 's/@.*//' | sort -u)
foreign=$(grep -v '^ioe_' <<<"$exported" || true)
if [ -n "$foreign" ]; then
  echo "symbols without the ioe_ prefix are exported:"; echo "$foreign"; exit 1
fi

# A declaration's name is the ioe_ identifier right before its "(".
declared=$(grep -E '^[a-z][a-z0-9_ *]* \**ioe_[a-z0-9_]+\(' "$header" | grep -oE 'ioe_[a-z0-9_]+\(' | tr -d '(' | sort -u)
if [ "$declared" != "$exported" ]; then
  echo "header declarations and exported symbols differ:"
  diff <(echo "$declared") <(echo "$exported") || true
  exit 1
fi

soname=$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
major=$(grep -oE 'IOE_VERSION_MAJOR [0-9]+' "$header" | awk '{print $2}')
minor=$(grep -oE 'IOE_VERSION_MINOR [0-9]+' "$header" | awk '{print $2}')
abi=$major
[ "$major" = 0 ] && abi="0.$minor"
if [ "$soname" != "libioengine.so.$abi" ]; then
  echo "soname is '$soname', expected libioengine.so.$abi"; exit 1
fi
echo "symbols: $(wc -l <<<"$exported") ioe_* functions exported, all declared; soname $soname"

# Every declared function is called somewhere in the C test suite.
tests_dir=$(dirname "$0")
missing=""
for fn in $declared; do
  grep -qw "$fn" "$tests_dir"/test_*.c "$tests_dir"/test_*.cpp || missing="$missing $fn"
done
if [ -n "$missing" ]; then
  echo "functions no C test calls:$missing"; exit 1
fi
echo "every declared function is called by the C tests"
