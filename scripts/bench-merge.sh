#!/usr/bin/env bash
# Merge vs cp, side by side in one run: a differencing layer holding MIB MiB
# (written whole, 64 KiB requests) merged into its empty dynamic parent by the
# engine, copying file to file (copy_file_range, the default) and through a
# buffer (the path before it, `vhd-bench merge --copy buffered`), against `cp`
# of a raw file holding the same data on the same file system, and against
# `cp` then `rm` of the source (what a merge removing its layer does to the
# files). The file-to-file merge runs twice: removing the layer afterwards
# (`viridian vhd merge`) and keeping it (`--keep-layers`: the merge step of a
# checkpoint deletion, which removes the layer later).
#
#   scripts/bench-merge.sh [MIB] [ROUNDS]    (default 512 MiB, 5 rounds; root)
#
# Each round runs every case once, in turn, each after its own untimed setup
# and `sync` + dropping the page cache (WARM=1 keeps it: sources in the page
# cache), and times the whole process: merge includes opening the chain, the
# target's flushes and (unless kept) removing the layer and syncing its
# folder; cp is followed by `sync -d` on the copy. FORMATS="vhd vhdx"
# (default "vhd") picks the formats. Prints every round, then a markdown table
# of medians with min–max (take odd ROUNDS) and of each round's cp time ÷ that
# round's time; raw timings go to $WORK/log. CARGO_TARGET_DIR, BENCH_DIR (default /var/tmp, not tmpfs), KEEP=1
# as in bench-storage.sh.
set -euo pipefail

MIB=${1:-512}
ROUNDS=${2:-5}
FORMATS=${FORMATS:-vhd}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

BENCH_NAME=bench-merge
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
bench_init merge-bench
BYTES=$((MIB << 20))
COUNT=$((MIB * 16)) # 64 KiB requests

# layer FMT: an empty dynamic parent (4 GiB virtual) and a child holding MIB MiB.
layer() {
    local f=$1 p c
    p=$WORK/p.$f; c=$WORK/c.$f
    [ "$f" = vhdx ] && c=$WORK/c.avhdx
    rm -f "$WORK"/p.* "$WORK"/c.*
    "$B" create-dynamic "$p" --size 4G
    "$B" create-diff "$c" --parent "$p"
    "$B" run --file "$c" --format vhd --cache buffered --pattern seq-write --count $COUNT >>"$LOG"
    echo "$c"
}
cp_setup() {
    rm -f "$WORK/cp.dst"
    [ -f "$WORK/cp.src" ] || { truncate -s $BYTES "$WORK/cp.src"; "$B" run --file "$WORK/cp.src" --format raw --cache buffered --pattern seq-write --count $COUNT >>"$LOG"; }
}
cp_run() { cp "$WORK/cp.src" "$WORK/cp.dst" && sync -d "$WORK/cp.dst"; }
# cp+rm: what a merge that removes its layer does to the files, with cp.
cprm_setup() {
    rm -f "$WORK/cprm.dst"
    truncate -s $BYTES "$WORK/cprm.src"
    "$B" run --file "$WORK/cprm.src" --format raw --cache buffered --pattern seq-write --count $COUNT >>"$LOG"
}
cprm_run() { cp "$WORK/cprm.src" "$WORK/cprm.dst" && sync -d "$WORK/cprm.dst" && rm "$WORK/cprm.src" && sync "$WORK"; }

declare -A V
cases=(cp cp+rm)
for f in $FORMATS; do cases+=("$f/file-to-file/remove" "$f/file-to-file/keep" "$f/buffered/remove"); done
echo "bench-merge: $MIB MiB, $ROUNDS rounds, $(nproc) cores, load at start:$(uptime | sed 's/.*load average://')" >&2
for ((i = 1; i <= ROUNDS; i++)); do
    line="round $i:"
    for k in "${cases[@]}"; do
        if [ "$k" = cp ]; then
            cp_setup
            t=$(seconds cp cp_run)
        elif [ "$k" = cp+rm ]; then
            cprm_setup
            t=$(seconds cp+rm cprm_run)
        else
            IFS=/ read -r f copy mode <<<"$k"
            c=$(layer "$f")
            keep=()
            [ "$mode" = keep ] && keep=(--keep-layers)
            t=$(seconds "$k" "$B" merge "$c" --copy "$copy" "${keep[@]}")
        fi
        V[$k]+="$t "
        line+=" $k $t s,"
    done
    echo "$line load$(uptime | sed 's/.*load average://')" >&2
done


# shellcheck disable=SC2086
cpm=$(median ${V[cp]})
echo
echo "Merge benchmark, $(date -u +%F), $(nproc) cores, $(uname -r), vhd at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $MIB MiB, median of $ROUNDS (min–max)$([ "${WARM:-0}" = 1 ] && echo ', page cache warm')"
echo
echo "| what | time | rate | speed vs cp: of the medians | per round: median (min–max) |"
echo "|---|---|---|---|---|"
# shellcheck disable=SC2086
echo "| \`cp\` + \`sync -d\` of a $MIB MiB file | $cpm s ($(spread ${V[cp]})) | $(mbs "$cpm" "$BYTES") MB/s | 1.00 | |"
for k in "${cases[@]:1}"; do
    # shellcheck disable=SC2086
    m=$(median ${V[$k]})
    IFS=/ read -r f copy mode <<<"$k"
    what="merge, $f, $copy copy, $([ "$mode" = keep ] && echo "layer kept (as checkpoint deletion)" || echo "layer removed (as \`vhd merge\`)")"
    [ "$k" = cp+rm ] && what="\`cp\` + \`sync -d\`, then \`rm\` of the source + \`sync\`"
    # Each round's cp time ÷ the same round's merge time: drift of the
    # machine between rounds cancels out.
    # shellcheck disable=SC2206
    cps=(${V[cp]}) ts=(${V[$k]}) rr=()
    for ((i = 0; i < ROUNDS; i++)); do rr+=("$(ratio "${cps[i]}" "${ts[i]}")"); done
    # shellcheck disable=SC2086
    echo "| $what | $m s ($(spread ${V[$k]})) | $(mbs "$m" "$BYTES") MB/s | $(ratio "$cpm" "$m") | $(median "${rr[@]}") ($(spread "${rr[@]}")) |"
done
