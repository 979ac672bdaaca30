#!/usr/bin/env bash
# Real-guest test of vmkit-vhost-user: Debian's stock Linux kernel (virtio_blk, virtio-rng,
# virtio_net drivers we did not write) drives vmkit-virtio's devices through QEMU's vhost-user
# frontends (bookworm's QEMU 7.2, or QEMU 10 with LG_QEMU_BACKPORTS=1: both pass).
#
# One QEMU boot (TCG) with four backends:
#   vu-rw  vhost-user-blk over a 16 MiB image: O_DIRECT and page-cache writes of a random
#          pattern, discard, write-zeroes; the host then checks the image byte for byte;
#   vu-ro  vhost-user-blk --readonly: the guest's write must be refused, the file unchanged;
#   rng    vhost-user-rng: the guest reads /dev/hwrng;
#   net    vhost-user-net on a TAP (10.77.0.1) in a private network namespace: the host pings
#          the guest (10.77.0.2), the guest pings the host, 1 MiB of random data crosses over
#          TCP each way; the host compares what it received with what the guest was given.
# The backends are stopped with SIGTERM after the guest powered off and must exit 0.
#
# virtio-console is not in the guest test: QEMU has no user-creatable vhost-user frontend
# for it (vhost-user-device-pci exists but is not user-creatable), so the console backend is
# tested through the vhost-user protocol only (crates/vmkit-vhost-user/tests/console.rs).
#
# Prints one "PASS <check>" / "FAIL <check>" line per check and exits non-zero on any FAIL.
# Needs root (apt-get on a fresh machine, a network namespace and a TAP device), gcc with a
# static libc (the guest helper vu-io).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

BOOT_TIMEOUT="${BOOT_TIMEOUT:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
W="$LG_CACHE/vhost-user-test"
rm -rf "$W"; mkdir -p "$W"

FAILS=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }
check() { local name="$1"; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }

lg_prepare
lg_log "building vmkit-vhost-user and the guest helper"
(cd "$LG_ROOT" && cargo build -q -p vmkit-vhost-user --bin vmkit-vhost-user)
VU="$CARGO_TARGET_DIR/debug/vmkit-vhost-user"
gcc -static -O2 -o "$W/vu-io" "$HERE/vhost-user/vu-io.c"

MB=1048576
head -c $((4 * MB)) /dev/urandom > "$W/pattern.bin"
head -c $((16 * MB)) /dev/zero | tr '\0' '\252' > "$W/rw.img"
head -c $((2 * MB)) /dev/urandom > "$W/ro.img"
RO_SUM=$(md5sum < "$W/ro.img" | cut -d' ' -f1)
head -c $MB /dev/urandom > "$W/h2g.bin"
head -c $MB /dev/urandom > "$W/g2h.bin"

lg_initramfs "$W/initramfs.gz" "$HERE/vhost-user/test-init.sh" \
    "$W/vu-io:bin/vu-io" "$W/pattern.bin:pattern.bin" "$W/g2h.bin:g2h.bin"

# The net backend's TAP lives in a namespace of its own: no route or address of the host
# (or of a concurrent run) is touched.
NS="vu-test-$$"
ip netns add "$NS"
PIDS=()
NET_HOST=""
cleanup() {
    local p
    for p in "${PIDS[@]}" $NET_HOST; do kill "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add vu0 mode tap
ip -n "$NS" addr add 10.77.0.1/24 dev vu0
ip -n "$NS" link set vu0 up

NAMES=()
start_backend() { # NAME LAUNCHER... -- ARGS...: LAUNCHER (may be empty) runs "$VU" ARGS
    local name="$1"; shift
    local launcher=()
    while [ "$1" != -- ]; do launcher+=("$1"); shift; done
    shift
    "${launcher[@]}" "$VU" "$@" > "$W/$name.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
}
start_backend rw -- blk --socket "$W/rw.sock" --disk "$W/rw.img" --serial vu-rw
start_backend ro -- blk --socket "$W/ro.sock" --disk "$W/ro.img" --serial vu-ro --readonly
start_backend rng -- rng --socket "$W/rng.sock"
# `ip netns exec` execs the backend, so its pid is the backend's.
start_backend net ip netns exec "$NS" -- net --socket "$W/net.sock" --tap vu0
for s in "${NAMES[@]}"; do
    for _ in $(seq 100); do [ -S "$W/$s.sock" ] && break; sleep 0.05; done
    [ -S "$W/$s.sock" ] || { lg_log "backend $s did not create its socket"; cat "$W/$s.log" >&2; exit 1; }
done

ip netns exec "$NS" bash "$HERE/vhost-user/net-host.sh" "$W" "$BOOT_TIMEOUT" > "$W/net-host.log" 2>&1 &
NET_HOST=$!

# QEMU 7.2 (Debian bookworm) dies with SIGSEGV in vhost_net_start -> msix_set_vector_notifiers
# under TCG when the vhost-user netdev uses MSI-X; the driver falls back to INTx with vectors=0.
# QEMU 10 (LG_QEMU_BACKPORTS=1) runs it with MSI-X.
NET_VECTORS=""
[ "$(lg_qemu_major)" -ge 10 ] || NET_VECTORS=",vectors=0"

lg_log "booting the guest with $(qemu-system-x86_64 --version | head -n1) (timeout ${BOOT_TIMEOUT}s)"
BOOT_OK=1
lg_run "$BOOT_TIMEOUT" "$W/console.log" qemu-system-x86_64 -M pc -accel tcg -m 512M -smp 1 \
    -nographic -no-reboot \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=vu0,path="$W/rw.sock" -device vhost-user-blk-pci,chardev=vu0,num-queues=1 \
    -chardev socket,id=vu1,path="$W/ro.sock" -device vhost-user-blk-pci,chardev=vu1,num-queues=1 \
    -chardev socket,id=vu2,path="$W/rng.sock" -device vhost-user-rng-pci,chardev=vu2 \
    -chardev socket,id=vu3,path="$W/net.sock" -netdev vhost-user,id=net0,chardev=vu3 \
    -device "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:02$NET_VECTORS" \
    -kernel "$LG_KERNEL" -initrd "$W/initramfs.gz" \
    -append 'console=ttyS0 panic=-1 quiet' || BOOT_OK=0
check "guest booted and powered off" [ "$BOOT_OK" = 1 ]
check "guest ran the whole workload" lg_expect "$W/console.log" "VU boot" "VU done"

# The host side of net has finished (or gave up) by now; bounded all the same.
timeout 10 tail --pid="$NET_HOST" -f /dev/null || kill "$NET_HOST" 2>/dev/null || true
wait "$NET_HOST" 2>/dev/null || true
NET_HOST=""

# Stop the backends the way a service manager would; each must flush and exit 0.
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for i in "${!PIDS[@]}"; do
    rc=0
    # Bounded: a backend that ignores SIGTERM is killed after 10 s and fails the check.
    timeout 10 tail --pid="${PIDS[$i]}" -f /dev/null || kill -KILL "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" || rc=$?
    check "backend ${NAMES[$i]} exits 0 on SIGTERM" [ "$rc" = 0 ]
done
PIDS=()

line() { grep -a "^VU $1" "$W/console.log" | tail -n1 | tr -d '\r'; }
field() { line "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
PSUM=$(md5sum < "$W/pattern.bin" | cut -d' ' -f1)
range_sum() { dd if="$1" bs=64k skip="$2" count="$3" 2>/dev/null | md5sum | cut -d' ' -f1; }
fill_sum() { head -c $(($1 * 65536)) /dev/zero | tr '\0' "$2" | md5sum | cut -d' ' -f1; }

# blk, guest side.
check "blk: guest found both disks by serial" grep -aq "^VU disks rw=/dev/vd. ro=/dev/vd." "$W/console.log"
check "blk: discard and write-zeroes negotiated" \
    bash -c '[ "$1" -gt 0 ] && [ "$2" -gt 0 ]' _ "$(field 'rw size' discard_max || echo 0)" "$(field 'rw size' write_zeroes_max || echo 0)"
check "blk: O_DIRECT write succeeded" grep -aq "^VU write-direct rc=0" "$W/console.log"
check "blk: page-cache write succeeded" grep -aq "^VU write-cached rc=0" "$W/console.log"
check "blk: discard succeeded" grep -aq "^VU discard rc=0" "$W/console.log"
check "blk: write-zeroes succeeded" grep -aq "^VU zeroout rc=0" "$W/console.log"
check "blk: guest reads back the O_DIRECT pattern" [ "$(field readback direct)" = "$PSUM" ]
check "blk: guest reads back the page-cache pattern" [ "$(field readback cached)" = "$PSUM" ]
check "blk: guest reads zeros after discard/write-zeroes" \
    bash -c '[ -n "$1" ] && [ "$1" = "$2" ]' _ "$(field readback zeros)" "$(field readback zeros_ref)"
# blk, host side: the image file after the backend exited.
check "blk: image holds the O_DIRECT pattern at 0" [ "$(range_sum "$W/rw.img" 0 64)" = "$PSUM" ]
check "blk: image holds the page-cache pattern at 4 MiB" [ "$(range_sum "$W/rw.img" 64 64)" = "$PSUM" ]
check "blk: discarded range [8,9) MiB reads as zeros in the image" [ "$(range_sum "$W/rw.img" 128 16)" = "$(fill_sum 16 '\0')" ]
check "blk: write-zeroes range [9,10) MiB is zeros in the image" [ "$(range_sum "$W/rw.img" 144 16)" = "$(fill_sum 16 '\0')" ]
check "blk: untouched range [10,16) MiB still holds 0xAA" [ "$(range_sum "$W/rw.img" 160 96)" = "$(fill_sum 96 '\252')" ]
check "blk: image size unchanged" [ "$(stat -c %s "$W/rw.img")" = $((16 * MB)) ]
# read-only export.
check "blk-ro: guest sees the disk read-only" [ "$(field 'ro flag' flag)" = 1 ]
check "blk-ro: guest write refused" grep -aq "^VU ro-write refused" "$W/console.log"
check "blk-ro: guest reads the image content" [ "$(field ro-read md5)" = "$RO_SUM" ]
check "blk-ro: image unchanged" [ "$(md5sum < "$W/ro.img" | cut -d' ' -f1)" = "$RO_SUM" ]
# rng.
check "rng: virtio_rng is the current hwrng" grep -aq "^VU rng current=virtio_rng" "$W/console.log"
check "rng: guest read 256 bytes" [ "$(field 'rng bytes' bytes)" = 256 ]
check "rng: two reads differ" bash -c '[ -n "$1" ] && [ "$1" != "$2" ]' _ "$(field 'rng bytes' a)" "$(field 'rng bytes' b)"
# net: the host-side log and files first, then what the guest reported.
check "net: host pings the guest through the backend" grep -q "^host-ping ok" "$W/net-host.log"
check "net: guest pings the host" grep -aq "^VU net ping rc=0 3 packets received" "$W/console.log"
check "net: host sent 1 MiB to the guest over TCP" grep -q "^host-send ok" "$W/net-host.log"
check "net: guest received the host's 1 MiB intact" \
    [ "$(field 'net h2g' md5)" = "$(md5sum < "$W/h2g.bin" | cut -d' ' -f1)" ]
check "net: host received the guest's 1 MiB intact" cmp -s "$W/g2h.bin" "$W/net-g2h.bin"

if [ "$FAILS" -ne 0 ]; then
    lg_log "---- console ----"; cat "$W/console.log" >&2
    for s in "${NAMES[@]}"; do lg_log "---- backend $s ----"; cat "$W/$s.log" >&2; done
    lg_log "---- host side of net ----"; cat "$W/net-host.log" >&2
    echo "vhost-user-test: $FAILS check(s) FAILED"
    exit 1
fi
echo "vhost-user-test: all checks PASSED"
