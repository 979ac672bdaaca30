#!/usr/bin/env bash
# mini-vmm boots Debian's stock cloud kernel on a real (nested, hardware-style) KVM.
#
# This host's /dev/kvm cannot boot Linux, so the test runs one level down: QEMU's software CPU
# (TCG, -cpu max, which emulates AMD SVM with nested paging) boots an L1 Linux whose
# initramfs holds the kvm modules, mini-vmm (with the shared libraries `ldd` lists, at the
# same paths), the same stock kernel and an L2 busybox initramfs. L1's /init loads kvm-amd and
# runs `mini-vmm --kernel /vmlinuz --initramfs /l2.cpio.gz`; L2's /init prints L2-INIT-OK and
# its `uname -r`, then `reboot -f` (reboot=k: the i8042 reset line) ends mini-vmm.
# L2's console is mini-vmm's stdout, which L1 prints on its own console: the one log holds
# both. On failure the log is printed and the script exits non-zero.
#
# Prints, from L1's /proc/uptime: mini-vmm start -> L2's first init line, and -> mini-vmm's
# exit (measured on 2026-11-21: ~18-21 s and ~0.3 s more; L2's own uptime at init ~10 s; the
# whole L0 run ~25 s, i.e. everything here runs under QEMU's software CPU).
#
# Usage: tests/linux-guest/mini-vmm-nested.sh
#   L2_CMDLINE=...  L2's kernel command line (default: console=ttyS0 reboot=k panic=-1;
#                   add earlyprintk=serial,ttyS0 to see where an early boot dies)
#   LG_TIMEOUT=...  seconds before the L1 run is killed (default 240)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/lib.sh"

lg_prepare
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
lg_log "building mini-vmm (release)"
(cd "$LG_ROOT" && cargo build --release -q -p mini-vmm)
VMM="$CARGO_TARGET_DIR/release/mini-vmm"

WORK="$LG_CACHE/mini-vmm-nested"
mkdir -p "$WORK"
L2_CMDLINE="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1}"
echo "$L2_CMDLINE" > "$WORK/l2-cmdline"

lg_initramfs "$WORK/l2.cpio.gz" "$HERE/mini-vmm/l2-init"

# mini-vmm is linked against glibc: ship the libraries and the loader at their own paths.
specs=("$VMM:bin/mini-vmm" "$LG_KERNEL:vmlinuz" "$WORK/l2.cpio.gz:l2.cpio.gz"
       "$WORK/l2-cmdline:l2-cmdline")
for lib in $(ldd "$VMM" | grep -o '/[^ ]*'); do
    specs+=("$lib:${lib#/}")
done
lg_initramfs "$WORK/l1.cpio.gz" "$HERE/mini-vmm/l1-init" "${specs[@]}"

LOG="$WORK/console.log"
lg_log "booting L1 under TCG (log: $LOG)"
start=$(date +%s.%N)
lg_run "${LG_TIMEOUT:-240}" "$LOG" qemu-system-x86_64 -M pc -accel tcg -cpu max -m 2G \
    -nographic -no-reboot -kernel "$LG_KERNEL" -initrd "$WORK/l1.cpio.gz" \
    -append 'console=ttyS0 panic=-1 quiet'
end=$(date +%s.%N)
lg_expect "$LOG" "L1-KVM-OK" "L2-INIT-OK" "L2-UNAME $(basename "$LG_KERNEL" | sed 's/^vmlinuz-//')" \
    "MINI-VMM-EXIT=0"
lg_log "PASS: mini-vmm booted the stock kernel as L2 on nested KVM"
tr -d '\r' < "$LOG" | awk '
    /^L1-SAW-L2-INIT/ { printf "[linux-guest]   mini-vmm start -> L2 init first line: %s s (L1 clock)\n", $3 }
    /^L1-MINI-VMM-END/ { printf "[linux-guest]   mini-vmm start -> mini-vmm exit:      %s s (L1 clock)\n", $3 }
    /^L2-UPTIME/ { printf "[linux-guest]   L2 kernel uptime at init:             %s s (L2 clock)\n", $2 }' >&2
awk -v s="$start" -v e="$end" 'BEGIN { printf "[linux-guest]   whole L0 run: %.1f s\n", e - s }' >&2
