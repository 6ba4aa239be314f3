#!/usr/bin/env bash
# Builds Viridian's test guest from Debian's packages and caches it under
# .cache/guest/<key>/ at the repository root, where <key> names the package versions
# and this builder's own content. Prints that directory as the last line of output.
#
# Nothing is installed on the host: the kernel package is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`.
#
# The directory holds:
#   vmlinuz         Debian's cloud kernel (linux-image-cloud-amd64's dependency)
#   initramfs.img   busybox-static + guest/init + the virtio/ATA/SCSI modules (cpio, gzip)
#   boot.vhd        a dynamic VHD that boots under both firmwares: MBR, one FAT partition
#                   with syslinux, the kernel and the initramfs for SeaBIOS (generation 1,
#                   IDE 0:0), and EFI/BOOT/BOOTX64.EFI for OVMF (generation 2, SCSI): a
#                   unified kernel image (systemd's EFI stub + kernel + initramfs + command
#                   line). Console on the first serial port either way.
#   boot-fixed.vhd  the same disk as a fixed VHD
#   boot.raw        the same disk as a raw image
#   cmdline         the kernel command line boot.vhd uses, for direct kernel boot
#   versions        what went in
#
# Running it again is fast (well under a second) when the cache is current.
# Environment: VIRIDIAN_GUEST_CACHE overrides the cache root.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache_root="${VIRIDIAN_GUEST_CACHE:-$root/.cache/guest}"

die() { echo "guest/build.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing; run scripts/setup.sh first (it installs $2)"; }
need busybox busybox-static
need cpio cpio
need gzip gzip
need mkfs.vfat dosfstools
need mcopy mtools
need syslinux syslinux
need qemu-img qemu-utils
need objcopy binutils
need apt-get apt
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || die "/usr/lib/syslinux/mbr/mbr.bin is missing; run scripts/setup.sh first (it installs syslinux-common)"

# The versioned kernel package that linux-image-cloud-amd64 depends on.
kernel_meta() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-cloud-amd64\).*/\1/p' | head -1
}
kernel_pkg="$(kernel_meta)"
if [ -z "$kernel_pkg" ]; then
    apt-get update -qq </dev/null >/dev/null || die "apt-get update failed; check the network and /etc/apt/sources.list"
    kernel_pkg="$(kernel_meta)"
fi
[ -n "$kernel_pkg" ] || die "apt-cache knows no linux-image-cloud-amd64 with a linux-image-*-cloud-amd64 dependency"
kernel_ver="$(apt-cache show --no-all-versions "$kernel_pkg" | sed -n 's/^Version: //p' | head -1)"
busybox_ver="$(dpkg-query -W -f='${Version}' busybox-static)"
syslinux_ver="$(dpkg-query -W -f='${Version}' syslinux)"
stub_ver="$(apt-cache show --no-all-versions systemd-boot-efi 2>/dev/null | sed -n 's/^Version: //p' | head -1)"
[ -n "$stub_ver" ] || die "apt-cache knows no systemd-boot-efi (the EFI stub for the UEFI boot image)"
builder_hash="$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-12)"
versions="kernel=$kernel_pkg $kernel_ver busybox-static=$busybox_ver syslinux=$syslinux_ver systemd-boot-efi=$stub_ver builder=$builder_hash"
key="$(echo "$versions" | sha256sum | cut -c1-16)"
out="$cache_root/$key"

if [ -f "$out/versions" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache_root"
work="$(mktemp -d "$cache_root/.build.XXXXXX")"
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
echo "guest/build.sh: building the test guest ($versions)" >&2

# 1. The kernel and its modules, unpacked (never installed).
mkdir -p "$work/deb" "$work/kernel"
(cd "$work/deb" && apt-get download "$kernel_pkg=$kernel_ver" </dev/null >/dev/null 2>&1) ||
    die "apt-get download $kernel_pkg=$kernel_ver failed; check the network"
dpkg-deb -x "$work"/deb/*.deb "$work/kernel"
mkdir -p "$work/stubdeb" "$work/stub"
(cd "$work/stubdeb" && apt-get download "systemd-boot-efi=$stub_ver" </dev/null >/dev/null 2>&1) ||
    die "apt-get download systemd-boot-efi=$stub_ver failed; check the network"
dpkg-deb -x "$work"/stubdeb/*.deb "$work/stub"
efi_stub="$work/stub/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
[ -f "$efi_stub" ] || die "systemd-boot-efi has no linuxx64.efi.stub"
kver="${kernel_pkg#linux-image-}"
moddir="$work/kernel/lib/modules/$kver"
[ -d "$moddir" ] || die "$kernel_pkg has no lib/modules/$kver"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
busybox depmod -b "$work/kernel" "$kver"

# 2. The initramfs: busybox, /init, and the modules (with their dependencies).
wanted="virtio_pci virtio_blk virtio_scsi virtio_net ata_piix sd_mod sr_mod isofs button evdev"
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,mnt,etc,lib/modules/"$kver"}
cp /bin/busybox "$rootfs/bin/busybox"
cp "$here/init" "$rootfs/init"
chmod 0755 "$rootfs/init" "$rootfs/bin/busybox"
echo "$wanted" | tr ' ' '\n' > "$rootfs/etc/viridian-modules"
declare -A seen=()
add_module() {
    local name="$1" line path dep
    line="$(grep -E "/$name\.ko:" "$moddir/modules.dep" | head -1)" || true
    [ -n "$line" ] || die "module $name is not in $kernel_pkg"
    path="${line%%:*}"
    [ -n "${seen[$path]:-}" ] && return 0
    seen[$path]=1
    mkdir -p "$rootfs/lib/modules/$kver/$(dirname "$path")"
    cp "$moddir/$path" "$rootfs/lib/modules/$kver/$path"
    for dep in ${line#*:}; do
        dep="$(basename "$dep" .ko)"
        add_module "$dep"
    done
}
for m in $wanted; do add_module "$m"; done
cp "$moddir/modules.builtin" "$moddir/modules.order" "$rootfs/lib/modules/$kver/"
busybox depmod -b "$rootfs" "$kver"
(cd "$rootfs" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 > "$work/initramfs.img"

# 3. The bootable disk: MBR (syslinux), one FAT partition from 1 MiB with syslinux,
#    the kernel and the initramfs.
# no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can fail
# ("IO-APIC + timer doesn't work!") and panic; the check proves nothing for a VM.
cmdline="console=ttyS0 panic=-1 quiet no_timer_check"
echo "$cmdline" > "$work/cmdline"
part_start_sectors=2048
part_mib=48
disk="$work/boot.raw"
fs="$work/fs.img"
truncate -s "$((part_mib + 1))M" "$disk"
truncate -s "${part_mib}M" "$fs"
mkfs.vfat -n VIRIDIAN -h "$part_start_sectors" "$fs" >/dev/null
cat > "$work/syslinux.cfg" <<EOF
DEFAULT viridian
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL viridian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
EOF
# The UEFI boot program: a unified kernel image, so OVMF needs no boot loader config.
printf '%s' "$cmdline" > "$work/uki-cmdline"
echo 'NAME="Viridian test guest"' > "$work/uki-osrel"
objcopy \
    --add-section .osrel="$work/uki-osrel" --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$work/uki-cmdline" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$work/vmlinuz" --change-section-vma .linux=0x2000000 \
    --add-section .initrd="$work/initramfs.img" --change-section-vma .initrd=0x3000000 \
    "$efi_stub" "$work/BOOTX64.EFI"
export MTOOLS_SKIP_CHECK=1
mmd -i "$fs" ::/EFI ::/EFI/BOOT
mcopy -i "$fs" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$fs" "$work/vmlinuz" ::/vmlinuz
mcopy -i "$fs" "$work/initramfs.img" ::/initrd.img
mcopy -i "$fs" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$fs"
dd if="$fs" of="$disk" bs=1M seek=1 conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
# The partition table: one active FAT16 (LBA) partition; CHS fields say "use LBA".
/usr/bin/python3 - "$disk" "$part_start_sectors" "$((part_mib * 2048))" <<'EOF'
import struct, sys
path, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", start, count)
with open(path, "r+b") as f:
    f.seek(446)
    f.write(entry + bytes(48))
    f.seek(510)
    f.write(b"\x55\xaa")
EOF
rm -f "$fs"
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$disk" "$work/boot.vhd"
qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$disk" "$work/boot-fixed.vhd"

echo "$versions" > "$work/versions.tmp"
rm -rf "$work/deb" "$work/kernel" "$work/rootfs" "$work/syslinux.cfg" "$work/stubdeb" "$work/stub" \
    "$work/BOOTX64.EFI" "$work/uki-cmdline" "$work/uki-osrel"
mv "$work/versions.tmp" "$work/versions"
# Publish atomically: a concurrent builder that loses the race just discards its copy.
if mv -T "$work" "$out" 2>/dev/null; then
    trap - EXIT
fi
[ -f "$out/versions" ] || die "could not publish the guest into $out"
# Guests built from older package versions or an older builder are not used any more.
for old in "$cache_root"/*/; do
    old="${old%/}"
    [ "$old" != "$out" ] && [ -f "$old/versions" ] && rm -rf "$old"
done
echo "$out"
