#!/usr/bin/env bash
# Storage benchmarks of issue 2, side by side in one run: a raw file vs our
# dynamic VHD (crates/vhd_bench drives both through the same loop) vs
# `qemu-img bench` on a raw file and on a QEMU vpc (dynamic VHD) file.
#
#   scripts/bench-storage.sh [ROUNDS]        (default 3; root: it drops caches)
#
# Every figure is the median of ROUNDS runs, each timed from outside the
# process (start, open, all I/O, the final flush, exit) the same way for every
# contender, after `sync` and dropping the page cache. Prints a markdown table;
# the raw timings go to $WORK/log. Environment: CARGO_TARGET_DIR, BENCH_DIR
# (parent of the scratch folder, default /var/tmp: not tmpfs), KEEP=1 keeps it,
# QEMU_RANDOM=0 skips QEMU's random-write rows (QEMU vpc takes minutes there).
set -euo pipefail

ROUNDS=${1:-3}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

command -v qemu-img >/dev/null || { echo "bench-storage: qemu-img missing; run scripts/setup.sh" >&2; exit 1; }
BENCH_NAME=bench-storage
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_init vhd-bench

GIB=$((1 << 30))
N64=16384    # 1 GiB in 64 KiB requests
N4=65536     # 256 MiB in 4 KiB requests, distinct random offsets over 1 GiB

# --- sequential 64 KiB and random 4 KiB allocating writes, sequential reads ---
new_raw() { rm -f "$WORK/raw.img"; truncate -s $GIB "$WORK/raw.img"; }
new_vhd() { rm -f "$WORK/ours.vhd"; "$B" create-dynamic "$WORK/ours.vhd" --size $GIB; }
new_qraw() { rm -f "$WORK/q.raw"; qemu-img create -q -f raw "$WORK/q.raw" $GIB; }
new_qvpc() { rm -f "$WORK/q.vpc"; qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$WORK/q.vpc" $GIB; }
nothing() { :; }

for cache in direct buffered; do
    if [ $cache = direct ]; then qcache=(-t none -n); qio=(-t none -n); else qcache=(-t writeback); qio=(-t writeback); fi
    eval "w_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern seq-write --count $N64; }"
    eval "w_vhd() { \"\$B\" run --file \"\$WORK/ours.vhd\" --format vhd --cache $cache --pattern seq-write --count $N64; }"
    eval "r_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern seq-read --count $N64; }"
    eval "r_vhd() { \"\$B\" run --file \"\$WORK/ours.vhd\" --format vhd --cache $cache --pattern seq-read --count $N64; }"
    eval "x_raw() { \"\$B\" run --file \"\$WORK/raw.img\" --format raw --cache $cache --pattern rand-write --bs 4K --count $N4; }"
    eval "x_vhd() { \"\$B\" run --file \"\$WORK/ours.vhd\" --format vhd --cache $cache --pattern rand-write --bs 4K --count $N4; }"
    w_qraw() { qemu-img bench -w "${qcache[@]}" -s 65536 -c $N64 -d 1 -f raw "$WORK/q.raw"; }
    w_qvpc() { qemu-img bench -w "${qcache[@]}" -s 65536 -c $N64 -d 1 -f vpc "$WORK/q.vpc"; }
    r_qraw() { qemu-img bench "${qcache[@]}" -s 65536 -c $N64 -d 1 -f raw "$WORK/q.raw"; }
    r_qvpc() { qemu-img bench "${qcache[@]}" -s 65536 -c $N64 -d 1 -f vpc "$WORK/q.vpc"; }
    # qemu-img bench has no random-offset mode: qemu-io gets the same offsets as write commands.
    x_qraw() { qemu-io "${qio[@]}" -f raw "$WORK/q.raw" <"$WORK/rand.qio" >/dev/null; }
    x_qvpc() { qemu-io "${qio[@]}" -f vpc "$WORK/q.vpc" <"$WORK/rand.qio" >/dev/null; }

    measure "$cache/seqw/raw" new_raw w_raw "$cache/seqw/ours" new_vhd w_vhd \
        "$cache/seqw/qraw" new_qraw w_qraw "$cache/seqw/qvpc" new_qvpc w_qvpc
    # Reads of what the last write round left: every block allocated.
    measure "$cache/seqr/raw" nothing r_raw "$cache/seqr/ours" nothing r_vhd \
        "$cache/seqr/qraw" nothing r_qraw "$cache/seqr/qvpc" nothing r_qvpc
    if [ $cache = buffered ]; then
        r_raw >/dev/null; r_vhd >/dev/null; r_qraw >/dev/null; r_qvpc >/dev/null
        WARM=1 measure "warm/seqr/raw" nothing r_raw "warm/seqr/ours" nothing r_vhd \
            "warm/seqr/qraw" nothing r_qraw "warm/seqr/qvpc" nothing r_qvpc
    fi

    "$B" offsets --size $GIB --bs 4K --count $N4 | awk '{ print "write -q -P 0x5a " $1 " 4k" } END { print "quit" }' >"$WORK/rand.qio"
    if [ "${QEMU_RANDOM:-1}" = 1 ]; then
        measure "$cache/rand4k/raw" new_raw x_raw "$cache/rand4k/ours" new_vhd x_vhd \
            "$cache/rand4k/qraw" new_qraw x_qraw "$cache/rand4k/qvpc" new_qvpc x_qvpc
    else
        measure "$cache/rand4k/raw" new_raw x_raw "$cache/rand4k/ours" new_vhd x_vhd
    fi
done

# --- chain depth 1 vs 8: the same 1 GiB of data, block i in layer i mod depth ---
for d in 1 8; do
    mkdir -p "$WORK/chain$d"
    "$B" chain --dir "$WORK/chain$d" --depth $d --size $GIB >"$WORK/chain$d.leaf"
done
c_r1() { "$B" run --file "$(cat "$WORK/chain1.leaf")" --format vhd --cache buffered --pattern seq-read --count $N64; }
c_r8() { "$B" run --file "$(cat "$WORK/chain8.leaf")" --format vhd --cache buffered --pattern seq-read --count $N64; }
measure "chain/1" nothing c_r1 "chain/8" nothing c_r8
c_r1 >/dev/null; c_r8 >/dev/null
WARM=1 measure "warmchain/1" nothing c_r1 "warmchain/8" nothing c_r8

# --- merge 1 GiB of allocated data into parents of growing virtual size, vs cp ---
merge_setup() {
    rm -f "$WORK/p.vhd" "$WORK/c.vhd"
    "$B" create-dynamic "$WORK/p.vhd" --size "$MERGE_SIZE"
    "$B" create-diff "$WORK/c.vhd" --parent "$WORK/p.vhd"
    "$B" run --file "$WORK/c.vhd" --format vhd --cache buffered --pattern seq-write --count $N64 >>"$LOG"
}
merge_run() { "$B" merge "$WORK/c.vhd"; }
merge_4G() { MERGE_SIZE=4G merge_setup; }
merge_8G() { MERGE_SIZE=8G merge_setup; }
merge_64G() { MERGE_SIZE=64G merge_setup; }
cp_setup() {
    rm -f "$WORK/cp.dst"
    [ -f "$WORK/cp.src" ] || { truncate -s $GIB "$WORK/cp.src"; "$B" run --file "$WORK/cp.src" --format raw --cache buffered --pattern seq-write --count $N64 >>"$LOG"; }
}
cp_run() { cp "$WORK/cp.src" "$WORK/cp.dst" && sync -d "$WORK/cp.dst"; }
measure "merge/4G" merge_4G merge_run "merge/8G" merge_8G merge_run \
    "merge/64G" merge_64G merge_run "merge/cp" cp_setup cp_run

# --- the table ---
cell() { if [ -n "${T[$1]:-}" ]; then echo "${T[$1]} s ($(mbs "${T[$1]}" "$2") MB/s)"; else echo "not run"; fi; }

echo
echo "Storage benchmarks, $(date -u +%F), $(nproc) cores, $(uname -r), $(qemu-img --version | head -1), vhd at $(git rev-parse --short HEAD 2>/dev/null || echo '?'); median of $ROUNDS (min–max in the log)"
echo
echo "| workload | cache | raw file (vhd-bench) | ours: dynamic VHD | QEMU raw | QEMU vpc | ours ÷ raw | ours ÷ QEMU vpc | target | result |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for cache in direct buffered; do
    label=$([ $cache = direct ] && echo O_DIRECT || echo "buffered + fdatasync")
    r=$(ratio "${T[$cache/seqw/raw]}" "${T[$cache/seqw/ours]}"); q=$(ratio "${T[$cache/seqw/qvpc]}" "${T[$cache/seqw/ours]}")
    echo "| 1 GiB seq. 64 KiB allocating write | $label | $(cell $cache/seqw/raw $GIB) | $(cell $cache/seqw/ours $GIB) | $(cell $cache/seqw/qraw $GIB) | $(cell $cache/seqw/qvpc $GIB) | $r | $q× | ≥ 0.95 of raw, ≥ 1.3× vpc | $(verdict "$r" 0.95), $(verdict "$q" 1.3) |"
    r=$(ratio "${T[$cache/seqr/raw]}" "${T[$cache/seqr/ours]}"); q=$(ratio "${T[$cache/seqr/qvpc]}" "${T[$cache/seqr/ours]}")
    echo "| 1 GiB seq. 64 KiB read | $label | $(cell $cache/seqr/raw $GIB) | $(cell $cache/seqr/ours $GIB) | $(cell $cache/seqr/qraw $GIB) | $(cell $cache/seqr/qvpc $GIB) | $r | $q× | ≥ 0.98 of raw | $(verdict "$r" 0.98) |"
    r=$(ratio "${T[$cache/rand4k/raw]}" "${T[$cache/rand4k/ours]}"); q=—
    [ -z "${T[$cache/rand4k/qvpc]:-}" ] || q=$(ratio "${T[$cache/rand4k/qvpc]}" "${T[$cache/rand4k/ours]}")
    echo "| 64 Ki random 4 KiB allocating writes over 1 GiB (qemu-io) | $label | $(cell $cache/rand4k/raw $((N4 * 4096))) | $(cell $cache/rand4k/ours $((N4 * 4096))) | $(cell $cache/rand4k/qraw $((N4 * 4096))) | $(cell $cache/rand4k/qvpc $((N4 * 4096))) | $r | ${q/%[0-9]/&×} | ≥ 0.90 of raw | $(verdict "$r" 0.90) |"
done
r=$(ratio "${T[warm/seqr/raw]}" "${T[warm/seqr/ours]}"); q=$(ratio "${T[warm/seqr/qvpc]}" "${T[warm/seqr/ours]}")
echo "| 1 GiB seq. 64 KiB read, all in the page cache (CPU cost only) | buffered, warm | $(cell warm/seqr/raw $GIB) | $(cell warm/seqr/ours $GIB) | $(cell warm/seqr/qraw $GIB) | $(cell warm/seqr/qvpc $GIB) | $r | $q× | (≥ 0.98 of raw) | $(verdict "$r" 0.98) |"
echo
echo "| workload | figure | comparison | ratio | target | result |"
echo "|---|---|---|---|---|---|"
r=$(ratio "${T[chain/1]}" "${T[chain/8]}")
echo "| 1 GiB seq. 64 KiB read through a chain of 8 (block i in layer i mod 8), buffered, cold cache | depth 8: $(cell chain/8 $GIB) | depth 1, same data: $(cell chain/1 $GIB) | $r | ≥ 0.90 of depth 1 | $(verdict "$r" 0.90) |"
r=$(ratio "${T[warmchain/1]}" "${T[warmchain/8]}")
echo "| same, all in the page cache (CPU cost of the chain only) | depth 8: $(cell warmchain/8 $GIB) | depth 1: $(cell warmchain/1 $GIB) | $r | (≥ 0.90 of depth 1) | $(verdict "$r" 0.90) |"
for v in 4G 8G 64G; do
    r=$(ratio "${T[merge/cp]}" "${T[merge/$v]}")
    echo "| merge of a child holding 1 GiB into an empty $v dynamic parent (incl. flush) | $(cell merge/$v $GIB) | \`cp\` of a 1 GiB file + fdatasync: $(cell merge/cp $GIB) | $r | ≥ 0.80 of cp | $(verdict "$r" 0.80) |"
done
echo
echo "merge time, 8G and 64G parent ÷ 4G parent: $(ratio "${T[merge/8G]}" "${T[merge/4G]}"), $(ratio "${T[merge/64G]}" "${T[merge/4G]}") (1.00 = proportional to allocated data only)"
