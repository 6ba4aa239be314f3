#!/usr/bin/env bash
# Storage benchmarks of issue 5, side by side in one run: a raw file vs our
# dynamic VHDX (crates/vhd_bench drives both through the same loop) vs
# `qemu-img bench`/`qemu-io` on a raw file and on a QEMU vhdx file, both VHDX
# files with 32 MiB blocks (Hyper-V's default and ours).
#
#   scripts/bench-vhdx.sh [ROUNDS]        (default 3; root: it drops caches)
#
# Every figure is the median of ROUNDS runs, each timed from outside the process
# (start, open, all I/O, the final flush, exit) the same way for every contender,
# after `sync` and dropping the page cache; in each round the contenders take
# turns, so slow drift of the machine hits all alike. Prints a markdown table;
# the raw timings go to $WORK/log. Environment: CARGO_TARGET_DIR, BENCH_DIR
# (parent of the scratch folder, default /var/tmp: not tmpfs), KEEP=1 keeps it.
set -euo pipefail

ROUNDS=${1:-3}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

command -v qemu-img >/dev/null || { echo "bench-vhdx: qemu-img missing; run scripts/setup.sh" >&2; exit 1; }
BENCH_NAME=bench-vhdx
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_init vhdx-bench

GIB=$((1 << 30))
N64=16384    # 1 GiB in 64 KiB requests
N4=65536     # 256 MiB in 4 KiB requests, distinct random offsets over 1 GiB

new_raw() { rm -f "$WORK/raw.img"; truncate -s $GIB "$WORK/raw.img"; }
new_ours() { rm -f "$WORK/ours.vhdx"; "$B" create-dynamic "$WORK/ours.vhdx" --size $GIB --block-size 32M; }
new_qraw() { rm -f "$WORK/q.raw"; qemu-img create -q -f raw "$WORK/q.raw" $GIB; }
new_qvhdx() { rm -f "$WORK/q.vhdx"; qemu-img create -q -f vhdx -o subformat=dynamic,block_size=32M "$WORK/q.vhdx" $GIB; }
nothing() { :; }
"$B" offsets --size $GIB --bs 4K --count $N4 | awk '{ print "write -q -P 0x5a " $1 " 4k" } END { print "quit" }' >"$WORK/rand.qio"

for cache in direct buffered; do
    if [ $cache = direct ]; then qc=(-t none -n); else qc=(-t writeback); fi
    eval "w_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern seq-write --count $N64; }"
    eval "w_ours() { \"\$B\" run --file \"\$WORK/ours.vhdx\" --format vhdx --cache $cache --pattern seq-write --count $N64; }"
    eval "r_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern seq-read --count $N64; }"
    eval "r_ours() { \"\$B\" run --file \"\$WORK/ours.vhdx\" --format vhdx --cache $cache --pattern seq-read --count $N64; }"
    eval "x_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern rand-write --bs 4K --count $N4; }"
    eval "x_ours() { \"\$B\" run --file \"\$WORK/ours.vhdx\" --format vhdx --cache $cache --pattern rand-write --bs 4K --count $N4; }"
    w_qraw() { qemu-img bench -w "${qc[@]}" -s 65536 -c $N64 -d 1 -f raw "$WORK/q.raw"; }
    w_qvhdx() { qemu-img bench -w "${qc[@]}" -s 65536 -c $N64 -d 1 -f vhdx "$WORK/q.vhdx"; }
    r_qraw() { qemu-img bench "${qc[@]}" -s 65536 -c $N64 -d 1 -f raw "$WORK/q.raw"; }
    r_qvhdx() { qemu-img bench "${qc[@]}" -s 65536 -c $N64 -d 1 -f vhdx "$WORK/q.vhdx"; }
    x_qraw() { qemu-io "${qc[@]}" -f raw "$WORK/q.raw" <"$WORK/rand.qio" >/dev/null; }
    x_qvhdx() { qemu-io "${qc[@]}" -f vhdx "$WORK/q.vhdx" <"$WORK/rand.qio" >/dev/null; }

    measure "$cache/seqw/raw" new_raw w_raw "$cache/seqw/ours" new_ours w_ours \
        "$cache/seqw/qraw" new_qraw w_qraw "$cache/seqw/qvhdx" new_qvhdx w_qvhdx
    measure "$cache/seqr/raw" nothing r_raw "$cache/seqr/ours" nothing r_ours \
        "$cache/seqr/qraw" nothing r_qraw "$cache/seqr/qvhdx" nothing r_qvhdx
    measure "$cache/rand4k/raw" new_raw x_raw "$cache/rand4k/ours" new_ours x_ours \
        "$cache/rand4k/qraw" new_qraw x_qraw "$cache/rand4k/qvhdx" new_qvhdx x_qvhdx
done
# The files every contender wrote must read back as QEMU sees them.
qemu-img check -q -f vhdx "$WORK/ours.vhdx"

cell() { echo "${T[$1]} s ($(mbs "${T[$1]}" "$2") MB/s)"; }

echo
echo "VHDX benchmarks, $(date -u +%F), $(nproc) cores, $(uname -r), $(qemu-img --version | head -1), load $(cut -d' ' -f1-3 /proc/loadavg), vhd at $(git rev-parse --short HEAD 2>/dev/null || echo '?'); median of $ROUNDS"
echo
echo "| workload | cache | raw file (vhd-bench) | ours: dynamic VHDX | QEMU raw | QEMU vhdx | ours ÷ raw | ours ÷ QEMU vhdx | target | result |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for cache in direct buffered; do
    label=$([ $cache = direct ] && echo O_DIRECT || echo "buffered + fdatasync")
    r=$(ratio "${T[$cache/seqw/raw]}" "${T[$cache/seqw/ours]}"); q=$(ratio "${T[$cache/seqw/qvhdx]}" "${T[$cache/seqw/ours]}")
    echo "| 1 GiB seq. 64 KiB allocating write | $label | $(cell $cache/seqw/raw $GIB) | $(cell $cache/seqw/ours $GIB) | $(cell $cache/seqw/qraw $GIB) | $(cell $cache/seqw/qvhdx $GIB) | $r | $q× | ≥ 0.95 of raw, ≥ 1.1× QEMU vhdx | $(verdict "$r" 0.95), $(verdict "$q" 1.1) |"
    r=$(ratio "${T[$cache/seqr/raw]}" "${T[$cache/seqr/ours]}"); q=$(ratio "${T[$cache/seqr/qvhdx]}" "${T[$cache/seqr/ours]}")
    echo "| 1 GiB seq. 64 KiB read | $label | $(cell $cache/seqr/raw $GIB) | $(cell $cache/seqr/ours $GIB) | $(cell $cache/seqr/qraw $GIB) | $(cell $cache/seqr/qvhdx $GIB) | $r | $q× | (as raw) | $(verdict "$r" 0.95) |"
    r=$(ratio "${T[$cache/rand4k/raw]}" "${T[$cache/rand4k/ours]}"); q=$(ratio "${T[$cache/rand4k/qvhdx]}" "${T[$cache/rand4k/ours]}")
    echo "| 64 Ki random 4 KiB allocating writes over 1 GiB | $label | $(cell $cache/rand4k/raw $((N4 * 4096))) | $(cell $cache/rand4k/ours $((N4 * 4096))) | $(cell $cache/rand4k/qraw $((N4 * 4096))) | $(cell $cache/rand4k/qvhdx $((N4 * 4096))) | $r | $q× | ≥ 0.90 of raw | $(verdict "$r" 0.90) |"
done
