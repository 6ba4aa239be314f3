#!/usr/bin/env bash
# Side-by-side measurements of the VM runtime, in one run, under the same accelerator:
#  1. start latency: `viridian vm start` (API call) to the guest's first console marker,
#     booting the test guest's VHD from IDE 0:0 through SeaBIOS, versus the same boot
#     with qemu-system-x86_64 started by hand on the raw image (QEMU's own IDE + file,
#     the same firmware as viridiand uses; and QEMU's own SeaBIOS for reference);
#  2. in-guest sequential 1 MiB O_DIRECT read and write on an IDE disk: ours (PIIX IDE
#     over the worker's NBD server) versus QEMU's own IDE on the raw file;
#  3. the worker's resident memory while its VM runs (QEMU and guest RAM excluded);
#  4. in-guest sequential 1 MiB O_DIRECT read and write on a synthetic disk: ours
#     (virtio-blk over the worker's vhost-user-blk backend, fixed VHD) versus
#     qemu-storage-daemon's vhost-user-blk export of a raw file, versus QEMU's own
#     virtio-blk on the raw file (both QEMU peers through the host page cache, as ours).
# Usage: crates/worker/bench/runtime.sh [ROUNDS]   (builds release binaries first)
#        VIRIDIAN_BENCH_ONLY=synthetic crates/worker/bench/runtime.sh [ROUNDS]
#        runs only part 4, ROUNDS times, alternating ours and the two QEMU peers.
set -euo pipefail
cd "$(dirname "$0")/../../.."
rounds="${1:-5}"
only="${VIRIDIAN_BENCH_ONLY:-}"
export PATH="$HOME/.cargo/bin:$PATH"
# VIRIDIAN_BENCH_PROFILE=debug only to try the script; figures come from release builds.
profile="${VIRIDIAN_BENCH_PROFILE:-release}"
if [ "$profile" = release ]; then
    cargo build --release -q -p daemon -p cli -p worker
else
    cargo build -q -p daemon -p cli -p worker
fi
bin="${CARGO_TARGET_DIR:-$PWD/target}/$profile"
guest="$(./guest/build.sh | tail -1)"
tmp="$(mktemp -d /tmp/viridian-bench.XXXXXX)"
daemon_pid=""
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
# Waits until FILE contains TEXT; prints the milliseconds since START.
wait_for() {
    local file="$1" text="$2" start="$3"
    for _ in $(seq 1 12000); do
        if grep -qa "$text" "$file" 2>/dev/null; then
            echo $(($(now_ms) - start))
            return
        fi
        sleep 0.005
    done
    echo "timeout waiting for '$text' in $file" >&2
    return 1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

export VIRIDIAN_SOCKET="$tmp/viridian.sock"
"$bin/viridiand" --data-dir "$tmp/data" --socket "$VIRIDIAN_SOCKET" </dev/null >"$tmp/viridiand.log" 2>&1 &
daemon_pid=$!
while [ ! -S "$VIRIDIAN_SOCKET" ]; do sleep 0.05; done
v() { "$bin/viridian" "$@" </dev/null >/dev/null; }

accel="$("$bin/viridian" host </dev/null | sed -n 's/^accelerator: *//p')"
echo "accelerator: $accel"
# The same firmware by hand as viridiand gives generation 1 VMs (`viridian host`).
fw="$("$bin/viridian" host --json </dev/null | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["firmware"]["generation1"])')"
bios=()
[ "$fw" != qemu ] && bios=(-bios "$fw")
echo "generation 1 firmware: $fw"

# --- 1. start latency -----------------------------------------------------------
cp "$guest/boot-fixed.vhd" "$tmp/boot.vhd"
cp "$guest/boot.raw" "$tmp/boot.raw"
v vm create bench --cpus 1 --memory 256M --generation 1
v vm disk add bench "$tmp/boot.vhd" --controller ide --number 0 --location 0
field() { "$bin/viridian" vm show bench --json </dev/null | /usr/bin/python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
id="$(field 'v["id"]')"
log="$tmp/data/vms/$id/runtime/console.log"
ours=(); byhand=(); bynbd=(); byhand_pio=()
latency_rounds="$rounds"
[ "$only" = synthetic ] && latency_rounds=0
for r in $(seq 1 "$latency_rounds"); do
    rm -f "$log" "$log.1"
    start=$(now_ms)
    "$bin/viridian" vm start bench --no-wait </dev/null >/dev/null
    ours+=("$(wait_for "$log" "VIRIDIAN-GUEST: booted" "$start")")
    v vm stop bench
    out="$tmp/byhand.log"
    rm -f "$out"
    start=$(now_ms)
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M "${bios[@]}" \
        -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 -serial file:"$out" </dev/null &
    qpid=$!
    byhand+=("$(wait_for "$out" "VIRIDIAN-GUEST: booted" "$start")")
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    # For reference: QEMU's own SeaBIOS (PIO), on the file.
    rm -f "$out"
    start=$(now_ms)
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M \
        -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 -serial file:"$out" </dev/null &
    qpid=$!
    byhand_pio+=("$(wait_for "$out" "VIRIDIAN-GUEST: booted" "$start")")
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    # The same disk path by hand: QEMU's IDE over NBD, served by qemu-nbd.
    out="$tmp/bynbd.log"
    rm -f "$out" "$tmp/qnbd.sock"
    qemu-nbd -f raw -k "$tmp/qnbd.sock" -x boot --persistent "$tmp/boot.raw" </dev/null &
    npid=$!
    while [ ! -S "$tmp/qnbd.sock" ]; do sleep 0.01; done
    start=$(now_ms)
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M "${bios[@]}" \
        -blockdev driver=nbd,node-name=d0,server.type=unix,server.path="$tmp/qnbd.sock",export=boot \
        -device ide-hd,drive=d0,bus=ide.0,unit=0,bootindex=0 -serial file:"$out" </dev/null &
    qpid=$!
    bynbd+=("$(wait_for "$out" "VIRIDIAN-GUEST: booted" "$start")")
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    kill "$npid"; wait "$npid" 2>/dev/null || true
done
if [ "$latency_rounds" -gt 0 ]; then
m_ours=$(printf '%s\n' "${ours[@]}" | median)
m_hand=$(printf '%s\n' "${byhand[@]}" | median)
m_nbd=$(printf '%s\n' "${bynbd[@]}" | median)
m_pio=$(printf '%s\n' "${byhand_pio[@]}" | median)
echo "start to first marker, ms (rounds: $rounds; firmware boot from IDE 0:0 with $fw)"
echo "  viridian vm start (API, worker, NBD):       ${ours[*]}  median $m_ours"
echo "  qemu-system-x86_64 by hand (file):          ${byhand[*]}  median $m_hand"
echo "  qemu-system-x86_64 by hand (IDE on qemu-nbd): ${bynbd[*]}  median $m_nbd"
echo "  by hand (file) with QEMU's own SeaBIOS (PIO): ${byhand_pio[*]}  median $m_pio"
echo "  overhead vs file (median): $((m_ours - m_hand)) ms; vs the same NBD disk path: $((m_ours - m_nbd)) ms"

# --- 1b. the worker alone, direct kernel boot (no disks, no daemon) --------------
mkdir -p "$tmp/direct"
cat > "$tmp/direct.json" <<EOF
{"settings": {"id": "00000000-0000-4000-8000-0000000000b1", "name": "direct", "generation": 1,
  "processor": {"count": 1}, "memory": {"startup_mib": 256}},
 "vm_dir": "$tmp/direct", "runtime_dir": "$tmp/direct/runtime",
 "direct_kernel": {"kernel": "$guest/vmlinuz", "initrd": "$guest/initramfs.img", "cmdline": "console=ttyS0 quiet"}}
EOF
wk=(); dk=()
for r in $(seq 1 "$latency_rounds"); do
    rm -rf "$tmp/direct/runtime"
    start=$(now_ms)
    "$bin/viridian-worker" --spec "$tmp/direct.json" </dev/null >"$tmp/direct.log" 2>&1 &
    wpid=$!
    wk+=("$(wait_for "$tmp/direct/runtime/console.log" "VIRIDIAN-GUEST: booted" "$start")")
    kill "$wpid"; wait "$wpid" 2>/dev/null || true
    out="$tmp/direct-hand.log"; rm -f "$out"
    start=$(now_ms)
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M \
        -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.img" -append "console=ttyS0 quiet" \
        -serial file:"$out" </dev/null &
    qpid=$!
    dk+=("$(wait_for "$out" "VIRIDIAN-GUEST: booted" "$start")")
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
done
m_wk=$(printf '%s\n' "${wk[@]}" | median)
m_dk=$(printf '%s\n' "${dk[@]}" | median)
echo "direct kernel boot to first marker, ms (the worker probes the accelerator and -sandbox itself here)"
echo "  viridian-worker:            ${wk[*]}  median $m_wk"
echo "  qemu-system-x86_64 by hand: ${dk[*]}  median $m_dk"
echo "  overhead (median): $((m_wk - m_dk)) ms"
fi

# --- 2 + 3. in-guest IDE throughput and worker memory --------------------------
truncate -s 600M "$tmp/data-ours.raw"
truncate -s 600M "$tmp/data-qemu.raw"
script='dev=""; for d in /sys/block/sd* /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = 1228800 ] && dev=/dev/${d##*/}; done
cs() { t=$(cut -d" " -f1 /proc/uptime); echo "${t%.*}${t#*.}"; }
for i in 1 2; do
  t0=$(cs); dd if=/dev/zero of=$dev bs=1M count=512 oflag=direct 2>/dev/null; t1=$(cs)
  echo "BENCH write MBps $((512 * 100 / (t1 - t0)))"
  t0=$(cs); dd if=$dev of=/dev/null bs=1M count=512 iflag=direct 2>/dev/null; t1=$(cs)
  echo "BENCH read MBps $((512 * 100 / (t1 - t0)))"
done'
{ printf '#viridian-guest-script\n%s\n' "$script"; } > "$tmp/cfg.raw"
truncate -s 1M "$tmp/cfg.raw"
# viridiand only takes .vhd/.vhdx: the config disk goes in as a fixed VHD.
qemu-img convert -q -f raw -O vpc -o subformat=fixed,force_size=on "$tmp/cfg.raw" "$tmp/cfg.vhd"
qemu-img convert -q -f raw -O vpc -o subformat=fixed,force_size=on "$tmp/data-ours.raw" "$tmp/data.vhd"
v vm disk add bench "$tmp/cfg.vhd" --controller ide --number 0 --location 1
v vm disk add bench "$tmp/data.vhd" --controller ide --number 1 --location 0
if [ "$only" != synthetic ]; then
rm -f "$log" "$log.1"
v vm start bench
worker_pid="$(field 'v["runtime"]["worker_pid"]')"
wait_for "$log" "VIRIDIAN-GUEST: running command" "$(now_ms)" >/dev/null
rss_kib="$(awk '/^VmRSS/ {print $2}' "/proc/$worker_pid/status")"
wait_for "$log" "VIRIDIAN-GUEST: poweroff" "$(now_ms)" >/dev/null
echo "in-guest sequential 1 MiB O_DIRECT, 512 MiB, two passes (MB/s)"
echo "  ours (PIIX IDE over the worker's NBD server, fixed VHD): $(grep -a BENCH "$log" | tr -d '\r' | awk '{print $2"="$4}' | xargs)"
out="$tmp/qemu-io.log"
qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M -no-reboot \
    -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 \
    -drive file="$tmp/cfg.raw",format=raw,if=ide,index=1 \
    -drive file="$tmp/data-qemu.raw",format=raw,if=ide,index=2 \
    -serial file:"$out" </dev/null
echo "  QEMU's own IDE on the raw file:                          $(grep -a BENCH "$out" | tr -d '\r' | awk '{print $2"="$4}' | xargs)"
echo "worker resident memory while the VM runs: $((rss_kib / 1024)) MiB ($rss_kib KiB)"
fi

# --- 4. in-guest synthetic disk throughput ---------------------------------------
v vm disk remove bench --controller ide --number 1 --location 0
v vm disk add bench "$tmp/data.vhd" --controller scsi --number 0 --location 0
synthetic_rounds=1
[ "$only" = synthetic ] && synthetic_rounds="$rounds"
bench_line() { grep -a BENCH "$1" | tr -d '\r' | awk '{print $2"="$4}' | xargs; }
syn_ours() {
    rm -f "$log" "$log.1"
    v vm start bench
    wait_for "$log" "VIRIDIAN-GUEST: poweroff" "$(now_ms)" >/dev/null
    res_ours="$(bench_line "$log")"
}
syn_qsd() {
    rm -f "$tmp/qsd.sock"
    qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename="$tmp/data-qemu.raw",cache.direct=off \
        --blockdev driver=raw,node-name=d0,file=f0 \
        --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path="$tmp/qsd.sock",writable=on,num-queues=1 \
        </dev/null >"$tmp/qsd.log" 2>&1 &
    local qsd_pid=$!
    while [ ! -S "$tmp/qsd.sock" ]; do sleep 0.01; done
    local out="$tmp/qsd-guest.log"
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc,memory-backend=m0 -m 256M -no-reboot \
        -object memory-backend-memfd,id=m0,size=256M,share=on \
        -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 \
        -drive file="$tmp/cfg.raw",format=raw,if=ide,index=1 \
        -chardev socket,id=q0,path="$tmp/qsd.sock" -device vhost-user-blk-pci,chardev=q0,num-queues=1 \
        -serial file:"$out" </dev/null
    kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true
    res_qsd="$(bench_line "$out")"
}
syn_virtio() {
    local out="$tmp/virtio-guest.log"
    qemu-system-x86_64 -nodefaults -display none -accel tcg -machine pc -m 256M -no-reboot \
        -drive file="$tmp/boot.raw",format=raw,if=ide,index=0 \
        -drive file="$tmp/cfg.raw",format=raw,if=ide,index=1 \
        -drive file="$tmp/data-qemu.raw",format=raw,if=none,id=v0,cache=writeback -device virtio-blk-pci,drive=v0 \
        -serial file:"$out" </dev/null
    res_virtio="$(bench_line "$out")"
}
# The contenders take turns going first (a round's order is rotated by one each
# round), and each starts with no dirty pages left by the one before (`sync`), so
# neither the order nor another's writeback favours anyone.
contenders=(syn_ours syn_qsd syn_virtio)
for r in $(seq 1 "$synthetic_rounds"); do
    echo "load average: $(cut -d" " -f1-3 /proc/loadavg)"
    order=()
    for i in 0 1 2; do order+=("${contenders[$(((r - 1 + i) % 3))]}"); done
    for c in "${order[@]}"; do sync; "$c"; done
    echo "in-guest sequential 1 MiB O_DIRECT on a synthetic disk, 512 MiB, two passes (MB/s); order: ${order[*]}"
    echo "  ours (virtio-blk over the worker's vhost-user-blk, fixed VHD):   $res_ours"
    echo "  qemu-storage-daemon vhost-user-blk on the raw file:              $res_qsd"
    echo "  QEMU's own virtio-blk on the raw file:                           $res_virtio"
done
