#!/usr/bin/env bash
# Install the system tools `make build` needs, with apt, when they are missing (root only).
#   readelf, objcopy (binutils), patchelf: build.spec's RPATH fix and staticx
#   musl-gcc (musl-tools): builds staticx's patched bootloader
#   ldd (libc-bin): staticx; patch: applies packaging/staticx-jobd.patch
#   gcc + libc6-dev (nss.h): staticx's libnssfix.so, without which it refuses glibc programs
set -euo pipefail
need=()
command -v readelf >/dev/null && command -v objcopy >/dev/null || need+=(binutils)
command -v patchelf >/dev/null || need+=(patchelf)
command -v musl-gcc >/dev/null || need+=(musl-tools)
command -v ldd >/dev/null || need+=(libc-bin)
command -v patch >/dev/null || need+=(patch)
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/include/nss.h ] || need+=(libc6-dev)
[ ${#need[@]} -eq 0 ] && exit 0
exec bash "$(dirname "$0")/apt-install.sh" "${need[@]}"
