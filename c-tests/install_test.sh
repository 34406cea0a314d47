#!/usr/bin/env bash
# Installs the build into a temporary prefix, checks the installed layout,
# then builds and runs a consumer with pkg-config (shared and static) and
# with a CMake project using find_package(ioengine CONFIG).
set -euo pipefail
build=$1
consumer_src=$2
soname=$3
cc=${CC:-cc}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
cmake --install "$build" --prefix "$prefix" >/dev/null

libdir="$prefix/lib"
[ -d "$libdir" ] || libdir=$(dirname "$(find "$prefix" -name 'libioengine.a' -print -quit)")
real=$(basename "$(find "$libdir" -maxdepth 1 -name 'libioengine.so.*.*.*' -print -quit)")
[ -n "$real" ] && [ -f "$libdir/$real" ] && [ ! -L "$libdir/$real" ] || { echo "no real shared library in $libdir"; exit 1; }
[ "$(readlink "$libdir/$soname")" = "$real" ] || { echo "$soname does not point to $real"; exit 1; }
[ "$(readlink "$libdir/libioengine.so")" = "$soname" ] || { echo "libioengine.so does not point to the soname"; exit 1; }
for f in "$libdir/libioengine.a" "$prefix/include/ioengine.h" "$libdir/pkgconfig/ioengine.pc" \
         "$libdir/cmake/ioengine/ioengineConfig.cmake" "$libdir/cmake/ioengine/ioengineConfigVersion.cmake"; do
  [ -f "$f" ] || { echo "missing after install: $f"; exit 1; }
done
echo "installed layout ok: $real, soname link, dev link, static lib, header, pc file, CMake package"

export PKG_CONFIG_PATH="$libdir/pkgconfig"
echo "pkg-config: $(pkg-config --modversion ioengine): $(pkg-config --cflags --libs ioengine)"
"$cc" -std=c11 -Wall -Wextra -Werror "$consumer_src/consumer.c" -o "$work/consumer_pc" \
  $(pkg-config --cflags --libs ioengine) -Wl,-rpath,"$libdir"
"$work/consumer_pc"
# The program must load the installed library, not one from the build tree.
# (ldd's output is captured first: grep -q closing the pipe early would make
# ldd die of SIGPIPE, which pipefail reports as a failure.)
deps=$(ldd "$work/consumer_pc")
grep -q "$libdir/$soname" <<<"$deps" || { echo "consumer did not resolve the installed library"; echo "$deps"; exit 1; }

"$cc" -std=c11 -Wall -Wextra -Werror "$consumer_src/consumer.c" -o "$work/consumer_static" \
  $(pkg-config --cflags ioengine) "$libdir/libioengine.a" $(pkg-config --libs-only-l --static ioengine | sed 's/-lioengine//')
deps=$(ldd "$work/consumer_static")
if grep -q libioengine <<<"$deps"; then echo "static consumer links the shared library"; exit 1; fi
"$work/consumer_static"

cmake -S "$consumer_src" -B "$work/cmake-consumer" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/cmake-consumer" >/dev/null
"$work/cmake-consumer/consumer"
"$work/cmake-consumer/consumer_static"
echo "install: ok"
