#!/usr/bin/env bash
# Builds Viridian's generation 1 firmware: Debian's SeaBIOS (same source, same 256 KiB
# configuration as Debian's bios-256k.bin) with ATA DMA turned on, and installs it where
# viridiand looks for it by default.
#
# Why: SeaBIOS without ATA DMA (Debian's and QEMU's builds) reads an IDE disk in PIO,
# and QEMU's PIIX model turns every PIO sector into its own block request, so a boot
# loader loading a 15 MiB kernel and initramfs makes ~31,000 one-sector requests. Over
# the worker's NBD server each one is a socket round trip. With DMA, each BIOS disk
# read is one request (BENCHMARKS.md, "Generation 1 firmware").
#
# Idempotent: does nothing when the installed build carries this script's version stamp.
# The source comes from Debian's archive and is checked against pinned SHA-256 sums.
set -euo pipefail

VERSION=1.16.2
DEBIAN_REVISION=1
ORIG_SHA256=efa8d529442ad168056f94ac6666b1b3543c62ff7af6d9e020561f4d0e32f959
DEBIAN_SHA256=7970d1790903f8ebabebce7c1952764c41edaa1f8a915097c2119bb7877efa98
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEST="${VIRIDIAN_FIRMWARE_DIR:-/usr/local/share/viridian/firmware}"
STAMP="seabios $VERSION-$DEBIAN_REVISION bios-256k ATA_DMA=y"

if [ -f "$DEST/seabios.bin" ] && [ "$(cat "$DEST/seabios.stamp" 2>/dev/null)" = "$STAMP" ]; then
    exit 0
fi
echo "build-seabios: building $STAMP into $DEST"

work="$(mktemp -d /tmp/viridian-seabios.XXXXXX)"
trap 'rm -rf "$work"' EXIT
fetch() { # file sha256
    curl -fsS --retry 3 -o "$work/$1" "$MIRROR/pool/main/s/seabios/$1"
    if [ "$(sha256sum "$work/$1" | cut -d' ' -f1)" != "$2" ]; then
        echo "build-seabios: $1 from $MIRROR does not match its pinned SHA-256; not building" >&2
        exit 1
    fi
}
fetch "seabios_$VERSION.orig.tar.gz" "$ORIG_SHA256"
fetch "seabios_$VERSION-$DEBIAN_REVISION.debian.tar.xz" "$DEBIAN_SHA256"
tar -xzf "$work/seabios_$VERSION.orig.tar.gz" -C "$work"
src="$work/seabios-$VERSION"
tar -xJf "$work/seabios_$VERSION-$DEBIAN_REVISION.debian.tar.xz" -C "$src"
# Debian's patches, as its package applies them.
if [ -f "$src/debian/patches/series" ]; then
    while read -r patch; do
        case "$patch" in '' | '#'*) continue ;; esac
        patch -s -d "$src" -p1 <"$src/debian/patches/$patch"
    done <"$src/debian/patches/series"
fi

# Debian's bios-256k configuration is "QEMU=y ROM_SIZE=256" (debian/rules); ATA_DMA
# is the one change.
out="$src/out"
mkdir -p "$out"
printf 'CONFIG_QEMU=y\nCONFIG_ROM_SIZE=256\nCONFIG_ATA_DMA=y\n' >"$out/.config"
make_sb() { make -C "$src" PYTHON=python3 KCONFIG_CONFIG="$out/.config" OUT=out/ "$@"; }
make_sb oldnoconfig >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
if ! grep -qx 'CONFIG_ATA_DMA=y' "$out/.config"; then
    echo "build-seabios: the configuration did not keep ATA_DMA=y" >&2
    exit 1
fi
make_sb EXTRAVERSION="-viridian-ata-dma" out/bios.bin -j"$(nproc)" >>"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; exit 1; }
if [ "$(stat -c %s "$out/bios.bin")" != 262144 ]; then
    echo "build-seabios: out/bios.bin is not 256 KiB" >&2
    exit 1
fi

mkdir -p "$DEST"
install -m 0644 "$out/bios.bin" "$DEST/seabios.bin.tmp"
mv -f "$DEST/seabios.bin.tmp" "$DEST/seabios.bin"
echo "$STAMP" >"$DEST/seabios.stamp"
echo "build-seabios: installed $DEST/seabios.bin"
