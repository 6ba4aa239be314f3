#!/usr/bin/env bash
# Installs everything Viridian needs to build, run and test, idempotently.
# Run as root on Debian 12. Safe to run again: it only installs what is missing.
set -euo pipefail

APT_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-block-extra ovmf seabios ipxe-qemu
    busybox-static cpio gzip python3 python3-libvhdi
    iproute2 util-linux nftables dnsmasq-base
    syslinux syslinux-common mtools dosfstools
    build-essential pkg-config curl ca-certificates
    groff-base man-db
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    # A package counts as present only when dpkg has it fully installed.
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
# qemu-img must be the same QEMU as qemu-system (a newer qemu-utils from elsewhere
# is replaced by Debian's, so every interop test checks against one QEMU).
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --allow-downgrades "${missing[@]}" </dev/null
fi

# A qemu-utils of another QEMU (say a backport) is removed by apt when Debian's
# qemu-system-x86 goes in, or stays and disagrees with it: pin it to the same version.
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
qemu_version=$(pkg_version qemu-system-x86)
if [ -z "$(pkg_version qemu-utils)" ] || [ "$(pkg_version qemu-utils)" != "$qemu_version" ] \
    || ! command -v qemu-img >/dev/null 2>&1; then
    echo "setup: installing qemu-utils $qemu_version to match qemu-system-x86"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --allow-downgrades "qemu-utils=$qemu_version" </dev/null \
        || { apt-get update -qq && apt-get install -y -qq --allow-downgrades "qemu-utils=$qemu_version" </dev/null; }
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: no Rust toolchain found; installing Debian's (needs Rust >= 1.80)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cargo rustc </dev/null
    fi
fi
echo "setup: $(cargo --version), $(qemu-system-x86_64 --version | head -1), $(qemu-img --version | head -1)"

# Generation 1 firmware: Debian's SeaBIOS rebuilt with ATA DMA (see the script).
"$(dirname "$0")/build-seabios.sh"

# Schemathesis (API fuzzing against the daemon's own OpenAPI document), pinned.
if ! python3 -m pip show schemathesis 2>/dev/null | grep -qx "Version: $(sed -n 's/^schemathesis==//p' "$(dirname "$0")/requirements-test.txt")"; then
    echo "setup: installing $(grep '^schemathesis' "$(dirname "$0")/requirements-test.txt")"
    python3 -m pip install -q -r "$(dirname "$0")/requirements-test.txt"
fi
