#!/usr/bin/env bash
# Our vhost-user-blk backend and qemu-storage-daemon's, paired in ONE guest: the same
# QEMU gets two vhost-user-blk-pci disks with the same device properties, one served by
# our backend (the worker's, run standalone by `vhost_blk`'s `serve` example) from a
# fixed VHD, one by qemu-storage-daemon from a raw file. The guest alternates between
# them (A B B A each round) with 1 MiB O_DIRECT sequential writes and reads of 512 MiB,
# so both see the same host at nearly the same moment: the host's swings, which move
# separate runs by ±30 % here, fall on both alike.
#
# Usage: crates/worker/bench/paired.sh [ROUNDS]   (root; builds release binaries first)
# Prints each pass and, per direction, the median of ours ÷ qsd over the rounds.
set -euo pipefail
cd "$(dirname "$0")/../../.."
rounds="${1:-6}"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p vhost_blk --example serve
serve="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/serve"
guest="$(./guest/build.sh | tail -1)"
tmp="$(mktemp -d /tmp/viridian-paired.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# Told apart in the guest by size: ours 600 MiB (1228800 sectors), qsd's 601 MiB.
truncate -s 600M "$tmp/ours.raw"
qemu-img convert -q -f raw -O vpc -o subformat=fixed,force_size=on "$tmp/ours.raw" "$tmp/ours.vhd"
rm "$tmp/ours.raw"
truncate -s 601M "$tmp/qsd.raw"
cp "$guest/boot.raw" "$tmp/boot.raw"

script='find() { for d in /sys/block/vd*; do [ "$(cat $d/size)" = "$1" ] && echo /dev/${d##*/}; done; }
ours=$(find 1228800); qsd=$(find 1230848)
cs() { t=$(cut -d" " -f1 /proc/uptime); echo "${t%.*}${t#*.}"; }
pass() { # name dev
  t0=$(cs); dd if=/dev/zero of=$2 bs=1M count=512 oflag=direct 2>/dev/null; t1=$(cs)
  echo "PAIRED $1 write $((512 * 100 / (t1 - t0)))"
  t0=$(cs); dd if=$2 of=/dev/null bs=1M count=512 iflag=direct 2>/dev/null; t1=$(cs)
  echo "PAIRED $1 read $((512 * 100 / (t1 - t0)))"
}
# A first pass each, not counted: both files get their blocks allocated.
dd if=/dev/zero of=$ours bs=1M count=512 oflag=direct 2>/dev/null
dd if=/dev/zero of=$qsd bs=1M count=512 oflag=direct 2>/dev/null
i=0; while [ $i -lt ROUNDS ]; do
  pass ours $ours; pass qsd $qsd; pass qsd $qsd; pass ours $ours
  i=$((i+1))
done'
{ printf '#viridian-guest-script\n%s\n' "${script//ROUNDS/$rounds}"; } >"$tmp/cfg.raw"
truncate -s 1M "$tmp/cfg.raw"

"$serve" "$tmp/ours.vhd" "$tmp/ours.sock" 1 </dev/null >"$tmp/serve.log" 2>&1 &
pids+=($!)
qemu-storage-daemon \
    --blockdev driver=file,node-name=f0,filename="$tmp/qsd.raw",cache.direct=off \
    --blockdev driver=raw,node-name=d0,file=f0 \
    --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path="$tmp/qsd.sock",writable=on,num-queues=1 \
    </dev/null >"$tmp/qsd.log" 2>&1 &
pids+=($!)
while [ ! -S "$tmp/ours.sock" ] || [ ! -S "$tmp/qsd.sock" ]; do sleep 0.01; done

# PAIRED_QSD_FIRST=1 puts qemu-storage-daemon's disk first on the PCI bus (and in
# the guest's device order), to show the position does not decide the result.
devices=(-device vhost-user-blk-pci,chardev=c0,num-queues=1 -device vhost-user-blk-pci,chardev=c1,num-queues=1)
if [ "${PAIRED_QSD_FIRST:-0}" = 1 ]; then
    devices=(-device vhost-user-blk-pci,chardev=c1,num-queues=1 -device vhost-user-blk-pci,chardev=c0,num-queues=1)
fi
echo "load average: $(cut -d" " -f1-3 /proc/loadavg)"
qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc,memory-backend=m0 -m 256M -no-reboot \
    -object memory-backend-memfd,id=m0,size=256M,share=on \
    -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 \
    -drive file="$tmp/cfg.raw",format=raw,if=ide,index=1 \
    -chardev socket,id=c0,path="$tmp/ours.sock" -chardev socket,id=c1,path="$tmp/qsd.sock" \
    "${devices[@]}" \
    -serial file:"$tmp/guest.log" </dev/null
grep -qa "VIRIDIAN-GUEST: command exited 0" "$tmp/guest.log" \
    || { echo "the guest's script failed:" >&2; tr -d '\r' <"$tmp/guest.log" | tail -20 >&2; exit 1; }

tr -d '\r' <"$tmp/guest.log" | grep -a '^PAIRED' | python3 -c '
import sys, statistics
runs = {}
for line in sys.stdin:
    _, who, op, mbps = line.split()
    runs.setdefault((who, op), []).append(int(mbps))
for op in ("write", "read"):
    o, q = runs[("ours", op)], runs[("qsd", op)]
    # Each round is A B B A: pair its two passes of each, as sums.
    ratios = [(o[2*i] + o[2*i+1]) / (q[2*i] + q[2*i+1]) for i in range(len(o) // 2)]
    print(f"{op:5}  ours MB/s {o}")
    print(f"{op:5}  qsd  MB/s {q}")
    print(f"{op:5}  ours / qsd per round {[round(r, 2) for r in ratios]}  median {statistics.median(ratios):.2f}")
'
