#!/usr/bin/env bash
# Viridian's demo: installs what is missing, builds, builds the test guest, starts
# viridiand on a temporary data dir, creates a generation 1 VM whose IDE 0:0 disk is
# the guest's bootable VHD, starts it, shows the serial console as it boots, shuts it
# down, and cleans up. Runs unattended (no stdin needed); run it as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./scripts/setup.sh

# VIRIDIAN_DEMO_PROFILE=debug builds faster (for trying changes); release by default.
profile="${VIRIDIAN_DEMO_PROFILE:-release}"
echo "demo: building viridiand, viridian and viridian-worker ($profile)"
if [ "$profile" = release ]; then
    cargo build --release -q -p daemon -p cli -p worker
else
    cargo build -q -p daemon -p cli -p worker
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
[ "$profile" = release ] && bin="$target/release" || bin="$target/debug"

guest="$(./guest/build.sh | tail -1)"
echo "demo: test guest in $guest"

tmp="$(mktemp -d /tmp/viridian-demo.XXXXXX)"
daemon_pid=""
cleanup() {
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        # Turn off whatever still runs, then stop the daemon.
        "$bin/viridian" vm stop demo >/dev/null 2>&1 || true
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

export VIRIDIAN_SOCKET="$tmp/viridian.sock"
"$bin/viridiand" --data-dir "$tmp/data" --storage-root "$tmp" --socket "$VIRIDIAN_SOCKET" </dev/null >"$tmp/viridiand.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do
    [ -S "$VIRIDIAN_SOCKET" ] && break
    sleep 0.1
done
[ -S "$VIRIDIAN_SOCKET" ] || { cat "$tmp/viridiand.log"; echo "demo: viridiand did not start" >&2; exit 1; }

v() { echo "+ viridian $*"; "$bin/viridian" "$@" </dev/null; }

v host
cp "$guest/boot.vhd" "$tmp/demo-boot.vhd"
v vm create demo --cpus 1 --memory 256M --generation 1
v vm disk add demo "$tmp/demo-boot.vhd" --controller ide --number 0 --location 0
v vm start demo
v vm list

echo "demo: waiting for the guest to boot (SeaBIOS, syslinux, Linux; slow under TCG)"
for _ in $(seq 1 120); do
    if "$bin/viridian" vm console demo --log </dev/null 2>/dev/null | grep -q "VIRIDIAN-GUEST: ready"; then
        break
    fi
    sleep 1
done
echo "----- serial console of VM demo (viridian vm console demo --log) -----"
# (terminal control sequences from the firmware and the shell are dropped for display)
"$bin/viridian" vm console demo --log </dev/null | tr -d '\r' |
    sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' | grep -v '^\s*$' | tail -n 25
echo "-----------------------------------------------------------------------"
"$bin/viridian" vm console demo --log </dev/null | grep -q "VIRIDIAN-GUEST: ready" ||
    { echo "demo: the guest did not reach its ready marker" >&2; exit 1; }

v vm shutdown demo
v vm list
v vm delete demo
echo "demo: done"
