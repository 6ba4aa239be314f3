#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs Viridian's whole test suite:
# unit tests, interop tests against qemu-img and libvhdi, crash tests, and the
# end-to-end tests that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./scripts/setup.sh

# Clippy's default groups are errors in CI.
cargo clippy --workspace --all-targets --release -- -D warnings

# The guest image that the end-to-end tests boot, cached under .cache/guest.
if [ -x guest/build.sh ]; then
    ./guest/build.sh
fi

if command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --release --no-fail-fast "$@"
else
    cargo test --workspace --release --no-fail-fast "$@"
fi
