#!/usr/bin/env bash
# Sequential reads of issue 23, side by side in one run: 1 GiB in 64 KiB requests
# at queue depth 1 from a raw file, our dynamic VHD and VHDX (crates/vhd_bench
# drives all three through the same loop), and `qemu-img bench` on a raw file
# and on QEMU's own vpc and vhdx files; O_DIRECT and buffered (cold cache).
# One more contender reads our VHD file itself as a raw image (its first GiB):
# the same extents of the same disk as the engine reads, so it tells what the
# file's place on the device does from what the engine does.
#
#   scripts/bench-reads.sh [ROUNDS] [RUNS]   (default 5 and 3; root: it drops caches)
#
# Every file is written in full once (64 KiB sequential writes, so every block is
# allocated), then each mode runs ROUNDS rounds. In a round every case runs RUNS
# times, the cases taking turns (a b c ... a b c ...), and the order of the cases
# is reversed every other round, so neither drift of the machine nor a case's
# place in the round favours one contender. Each figure is the median of a
# round's RUNS wall times of the whole process after `sync` and dropping the
# page cache. Prints one table per mode, a row per round; the raw timings go to
# $WORK/log. Environment as for scripts/bench-storage.sh (CARGO_TARGET_DIR,
# BENCH_DIR, KEEP=1).
set -euo pipefail

ROUNDS=${1:-5}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

command -v qemu-img >/dev/null || { echo "bench-reads: qemu-img missing; run scripts/setup.sh" >&2; exit 1; }
BENCH_NAME=bench-reads
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_init vhd-bench

GIB=$((1 << 30))
N64=16384 # 1 GiB in 64 KiB requests

# --- the files, written once ---
truncate -s $GIB "$WORK/raw.img"
"$B" run --file "$WORK/raw.img" --format raw --cache buffered --pattern seq-write --count $N64 >>"$LOG"
"$B" create-dynamic "$WORK/ours.vhd" --size $GIB
"$B" run --file "$WORK/ours.vhd" --format vhd --cache buffered --pattern seq-write --count $N64 >>"$LOG"
"$B" create-dynamic "$WORK/ours.vhdx" --size $GIB
"$B" run --file "$WORK/ours.vhdx" --format vhdx --cache buffered --pattern seq-write --count $N64 >>"$LOG"
qemu-img create -q -f raw "$WORK/q.raw" $GIB
qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$WORK/q.vpc" $GIB
qemu-img create -q -f vhdx -o subformat=dynamic "$WORK/q.vhdx" $GIB
for f in raw vpc vhdx; do
    qemu-img bench -w -t writeback -s 65536 -c $N64 -d 1 -f $f "$WORK/q.$f" >>"$LOG"
done
sync

CASES=(raw vhd vhdx vhdfile qraw qvpc qvhdx)
declare -A FILE=([raw]=raw.img [vhd]=ours.vhd [vhdx]=ours.vhdx [vhdfile]=ours.vhd [qraw]=q.raw [qvpc]=q.vpc [qvhdx]=q.vhdx)
declare -A FMT=([raw]=raw [vhd]=vhd [vhdx]=vhdx [vhdfile]=raw [qraw]=raw [qvpc]=vpc [qvhdx]=vhdx)

# read CASE: one timed process reading the whole disk of CASE in $CACHE mode.
read_case() {
    local c=$1
    if [ "${c:0:1}" = q ]; then
        local -a qc
        if [ "$CACHE" = direct ]; then qc=(-t none -n); else qc=(-t writeback); fi
        qemu-img bench "${qc[@]}" -s 65536 -c $N64 -d 1 -f "${FMT[$c]}" "$WORK/${FILE[$c]}"
    else
        "$B" run --file "$WORK/${FILE[$c]}" --format "${FMT[$c]}" --cache "$CACHE" --pattern seq-read --count $N64
    fi
}

declare -A R # median seconds per mode/round/case
for CACHE in direct buffered; do
    for ((r = 1; r <= ROUNDS; r++)); do
        order=("${CASES[@]}")
        if ((r % 2 == 0)); then
            order=()
            for ((i = ${#CASES[@]} - 1; i >= 0; i--)); do order+=("${CASES[i]}"); done
        fi
        declare -A vals=()
        for ((k = 0; k < RUNS; k++)); do
            for c in "${order[@]}"; do
                vals[$c]+="$(seconds "$CACHE/$r/$c" read_case "$c") "
            done
        done
        for c in "${CASES[@]}"; do
            # shellcheck disable=SC2086
            R[$CACHE/$r/$c]=$(median ${vals[$c]})
            # shellcheck disable=SC2086
            echo "bench-reads: $CACHE round $r $c ${R[$CACHE/$r/$c]} s ($(spread ${vals[$c]}))" >&2
        done
        R[$CACHE/$r/load]=$(cut -d' ' -f1 /proc/loadavg)
        R[$CACHE/$r/order]=${order[0]}…${order[-1]}
        unset vals
    done
done

# --- the tables ---
echo
echo "Sequential reads, $(date -u +%F), $(nproc) cores, $(uname -r), $(qemu-img --version | head -1), vhd at $(git rev-parse --short HEAD 2>/dev/null || echo '?'); 1 GiB in 64 KiB reads at queue depth 1, cold cache; each cell the median of $RUNS runs (all runs in the log)"
for CACHE in direct buffered; do
    label=$([ $CACHE = direct ] && echo O_DIRECT || echo buffered)
    echo
    echo "$label:"
    echo
    echo "| round | order | load | raw file | ours VHD | ours VHDX | the VHD file as raw | QEMU raw | QEMU vpc | QEMU vhdx | VHD ÷ raw | VHDX ÷ raw | VHD ÷ its file as raw | QEMU vpc ÷ QEMU raw | QEMU vhdx ÷ QEMU raw |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for ((r = 1; r <= ROUNDS; r++)); do
        k=$CACHE/$r
        echo "| $r | ${R[$k/order]} | ${R[$k/load]} | ${R[$k/raw]} s | ${R[$k/vhd]} s | ${R[$k/vhdx]} s | ${R[$k/vhdfile]} s | ${R[$k/qraw]} s | ${R[$k/qvpc]} s | ${R[$k/qvhdx]} s | $(ratio "${R[$k/raw]}" "${R[$k/vhd]}") | $(ratio "${R[$k/raw]}" "${R[$k/vhdx]}") | $(ratio "${R[$k/vhdfile]}" "${R[$k/vhd]}") | $(ratio "${R[$k/qraw]}" "${R[$k/qvpc]}") | $(ratio "${R[$k/qraw]}" "${R[$k/qvhdx]}") |"
    done
done
echo
echo "Ratios are of speed (the raw file's time ÷ the format's); the goal is VHD ÷ raw and VHDX ÷ raw ≥ 0.98 in every round."
