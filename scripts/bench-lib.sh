# Shared by scripts/bench-*.sh (sourced, not run): the scratch folder, timing from
# outside the process with a cold page cache, medians, and rounds where the
# contenders take turns.
#
# Environment: CARGO_TARGET_DIR, BENCH_DIR (parent of the scratch folder, default
# /var/tmp: not tmpfs), KEEP=1 keeps the scratch folder, WARM=1 keeps the page cache.

# bench_init NAME: root (it drops caches), vhd-bench built ($B), scratch folder
# $WORK with its log $LOG, removed at exit unless KEEP=1.
bench_init() {
    local name=$1
    [ "$(id -u)" = 0 ] || { echo "$name: run as root (it drops the page cache between runs)" >&2; exit 1; }
    cargo build --release -q -p vhd_bench
    B=$CARGO_TARGET_DIR/release/vhd-bench
    BENCH_DIR=${BENCH_DIR:-/var/tmp}
    if [ "$(stat -f -c %T "$BENCH_DIR")" = tmpfs ]; then
        echo "$name: $BENCH_DIR is tmpfs; set BENCH_DIR to a folder on a real disk" >&2
        exit 1
    fi
    WORK=$(mktemp -d "$BENCH_DIR/$name.XXXXXX")
    [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
    LOG=$WORK/log
}

quiesce() { sync; [ "${WARM:-0}" = 1 ] || echo 3 >/proc/sys/vm/drop_caches; }

# seconds LABEL CMD...: runs CMD after quiesce, prints its wall time (its output
# and the time go to $LOG).
seconds() {
    local label=$1; shift
    quiesce
    local t0 t1 s
    t0=$(date +%s.%N)
    echo "== $label: $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    t1=$(date +%s.%N)
    s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    echo "== $label: wall $s s" >>"$LOG"
    echo "$s"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%s–%s", v[1], v[NR] }'; }
mbs() { awk -v s="$1" -v b="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
ratio() { awk -v num="$1" -v den="$2" 'BEGIN { printf "%.2f", num / den }'; }   # a time ratio
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t) ? "met" : "**missed**" }'; }

declare -A T S   # median seconds and min–max per case
# measure KEY SETUP RUN [KEY SETUP RUN]...: ROUNDS rounds; in each round every
# case in turn runs its SETUP (untimed) and then its RUN (timed), so slow drift
# of the machine hits all cases alike.
measure() {
    local -a args=("$@")
    local -A vals=()
    local i j key
    for ((i = 0; i < ROUNDS; i++)); do
        for ((j = 0; j < ${#args[@]}; j += 3)); do
            key=${args[j]}
            ${args[j + 1]}
            vals[$key]+="$(seconds "$key" ${args[j + 2]}) "
        done
    done
    for ((j = 0; j < ${#args[@]}; j += 3)); do
        key=${args[j]}
        # shellcheck disable=SC2086
        T[$key]=$(median ${vals[$key]})
        # shellcheck disable=SC2086
        S[$key]=$(spread ${vals[$key]})
        echo "${BENCH_NAME:-bench}: $key ${T[$key]} s (${S[$key]})" >&2
    done
}
