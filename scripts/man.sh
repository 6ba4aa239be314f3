#!/usr/bin/env bash
# Writes Viridian's manual pages, made from the commands' own clap definitions:
# OUT/man1/viridian.1 and viridian-GROUP.1 (one per command group), and
# OUT/man8/viridiand.8. Usage: scripts/man.sh OUT
set -euo pipefail
out=${1:?usage: scripts/man.sh OUT (the folder to write man1/ and man8/ into)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p cli --bin viridian
"$target/release/viridian" man --out "$out/man1"
cargo run --release -q -p man_pages --example viridiand -- "$out/man8"
