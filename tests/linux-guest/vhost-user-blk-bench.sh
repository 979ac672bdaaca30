#!/usr/bin/env bash
# Side-by-side benchmark: vmkit-vhost-user blk vs qemu-storage-daemon's vhost-user-blk export.
#
# The same guest (Debian's stock kernel under QEMU TCG, virtio_blk driver) runs the same
# O_DIRECT workload (sequential and random, 4 KiB and 64 KiB, reads and writes; see
# vhost-user/bench-init.sh and vu-io.c) against the same 256 MiB raw image, served alternately
# by our backend (release build) and by qemu-storage-daemon (file driver, page cache, thread
# pool AIO: its defaults). Rounds alternate ours/qsd to cancel drift; the median MB/s of each
# workload is reported with the ratio ours/qsd, and the geometric mean of the ratios.
#
# Usage: vhost-user-blk-bench.sh [ROUNDS]   (default 3; each round boots twice, ~15 s a boot)
# This is a benchmark, not a test: it fails only if a boot or a backend fails.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

ROUNDS="${1:-3}"
BOOT_TIMEOUT="${BOOT_TIMEOUT:-180}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
W="$LG_CACHE/vhost-user-bench"
rm -rf "$W"; mkdir -p "$W"

lg_prepare # QEMU >= 10 with qemu-storage-daemon (qemu-utils)
command -v qemu-storage-daemon >/dev/null || { lg_log "qemu-storage-daemon is missing"; exit 1; }
lg_log "$(qemu-system-x86_64 --version | head -n1); $(qemu-storage-daemon --version | head -n1)"
lg_log "building vmkit-vhost-user (release) and the guest helper"
(cd "$LG_ROOT" && cargo build -q --release -p vmkit-vhost-user --bin vmkit-vhost-user)
VU="$CARGO_TARGET_DIR/release/vmkit-vhost-user"
gcc -static -O2 -o "$W/vu-io" "$HERE/vhost-user/vu-io.c"
lg_initramfs "$W/initramfs.gz" "$HERE/vhost-user/bench-init.sh" "$W/vu-io:bin/vu-io"
# A fully allocated image, so neither backend reads holes.
dd if=/dev/zero of="$W/disk.img" bs=1M count=256 status=none

BPID=
cleanup() { [ -n "$BPID" ] && kill "$BPID" 2>/dev/null || true; }
trap cleanup EXIT

run_one() { # NAME ROUND
    local name="$1" round="$2" sock="$W/$1.sock" log="$W/$1-$2"
    rm -f "$sock"
    if [ "$name" = ours ]; then
        "$VU" blk --socket "$sock" --disk "$W/disk.img" --num-queues 1 --queue-size 128 \
            --log-level warn > "$log.backend" 2>&1 &
    else
        qemu-storage-daemon \
            --blockdev driver=file,node-name=disk,filename="$W/disk.img" \
            --export type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 \
            > "$log.backend" 2>&1 &
    fi
    BPID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    lg_run "$BOOT_TIMEOUT" "$log.console" qemu-system-x86_64 -M pc -accel tcg -m 512M -smp 1 \
        -nographic -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -chardev socket,id=vu0,path="$sock" \
        -device vhost-user-blk-pci,chardev=vu0,num-queues=1,queue-size=128 \
        -kernel "$LG_KERNEL" -initrd "$W/initramfs.gz" -append 'console=ttyS0 panic=-1 quiet'
    lg_expect "$log.console" bench-done
    if grep -aq bench-error "$log.console"; then lg_log "$name: a workload failed"; cat "$log.console" >&2; exit 1; fi
    kill -TERM "$BPID"; wait "$BPID" || true; BPID=
    # -o: the first line may carry the firmware's terminal escapes in front of it.
    grep -ao 'bench [a-z]* [0-9]* bytes=[0-9]* usec=[0-9]* MBps=[0-9.]*' "$log.console" |
        awk -v n="$name" '{split($6, m, "="); print n, $2, $3, m[2]}' >> "$W/results"
}

for r in $(seq "$ROUNDS"); do
    lg_log "round $r/$ROUNDS"
    run_one ours "$r"
    run_one qsd "$r"
done

echo
echo "vhost-user-blk throughput, guest O_DIRECT, queue depth 1, median of $ROUNDS runs (MB/s)"
awk '
function median(s,   a, n, i, j, t) {
    n = split(s, a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ k = $2 " " $3; v[$1, k] = v[$1, k] " " $4; if (!(k in seen)) { seen[k] = 1; order[++nk] = k } }
END {
    printf "%-10s %7s %10s %10s %8s\n", "workload", "bs", "ours", "qsd", "ratio"
    lg = 0
    for (i = 1; i <= nk; i++) {
        k = order[i]; split(k, p, " ")
        o = median(v["ours", k]); q = median(v["qsd", k])
        printf "%-10s %7s %10.2f %10.2f %7.2fx\n", p[1], p[2], o, q, o / q
        lg += log(o / q)
    }
    printf "geometric mean of ratios (ours / qemu-storage-daemon): %.2fx\n", exp(lg / nk)
}' "$W/results"
