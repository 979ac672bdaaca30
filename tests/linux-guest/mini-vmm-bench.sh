#!/usr/bin/env bash
# Benchmark (not a test): mini-vmm vs QEMU's microvm machine booting the same stock kernel
# and initramfs, side by side in the same L1 (a QEMU TCG VM with nested, hardware-style
# KVM; see mini-vmm-nested.sh for why one level down).
#
# For each VMM, alternating over ROUNDS runs, L1 reports the time from VMM start to the L2
# init's first line and the VMM's resident memory beyond guest RAM while the guest is up.
# The issue's targets: mini-vmm at most 0.5x QEMU's time and 0.25x its memory overhead.
# Everything here runs under QEMU's software CPU, so absolute times are ~10x a real host's;
# the ratios are what to read.
#
# Usage: tests/linux-guest/mini-vmm-bench.sh      (ROUNDS=3 by default; LG_TIMEOUT=600)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/lib.sh"

lg_prepare
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
lg_log "building mini-vmm (release)"
(cd "$LG_ROOT" && cargo build --release -q -p mini-vmm)
VMM="$CARGO_TARGET_DIR/release/mini-vmm"
QEMU="$(command -v qemu-system-x86_64)"

WORK="$LG_CACHE/mini-vmm-bench"
mkdir -p "$WORK"
echo "${ROUNDS:-3}" > "$WORK/rounds"
lg_initramfs "$WORK/l2.cpio.gz" "$HERE/mini-vmm-bench/l2-init"

# Both VMMs are dynamically linked: ship their libraries and loader at their own paths, and
# the two firmware blobs QEMU's microvm loads for a direct kernel boot, where this QEMU looks
# for them (/usr/share/qemu in 7.2; 10.0 takes the BIOS from /usr/share/seabios).
specs=("$VMM:bin/mini-vmm" "$QEMU:usr/bin/qemu-system-x86_64" "$LG_KERNEL:vmlinuz"
       "$WORK/l2.cpio.gz:l2.cpio.gz" "$WORK/rounds:rounds")
for blob in bios-microvm.bin linuxboot_dma.bin; do
    path=""
    for dir in /usr/share/qemu /usr/share/seabios; do
        [ -f "$dir/$blob" ] && { path="$dir/$blob"; break; }
    done
    [ -n "$path" ] || { lg_log "QEMU firmware $blob not found"; exit 1; }
    specs+=("$path:${path#/}")
done
for lib in $( (ldd "$VMM"; ldd "$QEMU") | grep -o '/[^ ]*' | sort -u); do
    specs+=("$lib:${lib#/}")
done
lg_initramfs "$WORK/l1.cpio.gz" "$HERE/mini-vmm-bench/l1-init" "${specs[@]}"

LOG="$WORK/console.log"
lg_log "booting L1 under TCG, ${ROUNDS:-3} rounds (log: $LOG)"
lg_run "${LG_TIMEOUT:-600}" "$LOG" qemu-system-x86_64 -M pc -accel tcg -cpu max -m 2G \
    -nographic -no-reboot -kernel "$LG_KERNEL" -initrd "$WORK/l1.cpio.gz" \
    -append 'console=ttyS0 panic=-1 quiet'
lg_expect "$LOG" "L1-KVM-OK" "L1-BENCH-DONE"
if grep -a "^BENCH-EXIT" "$LOG" | tr -d '\r' | grep -qv ' 0$'; then
    lg_log "a VMM exited non-zero:"; grep -a "^BENCH-EXIT" "$LOG" >&2; exit 1
fi
tr -d '\r' < "$LOG" | grep -a '^BENCH-L2 ' >&2 || true
tr -d '\r' < "$LOG" | grep -a '^BENCH ' | tee "$WORK/results.txt" >&2
awk '
    { name = $2
      for (i = 3; i <= NF; i++) { split($i, kv, "="); v[name, kv[1]] += kv[2] }
      n[name]++ }
    END {
      for (name in n) {
        printf "[linux-guest] %-13s mean over %d: init %.2f s, RSS beyond guest RAM %.0f KiB, peak RSS %.0f KiB\n",
          name, n[name], v[name, "init_s"] / n[name], v[name, "rss_other_kb"] / n[name], v[name, "hwm_kb"] / n[name]
      }
      if (n["mini-vmm"] && n["qemu-microvm"]) {
        printf "[linux-guest] mini-vmm / qemu-microvm: time %.2fx (target <= 0.5x), memory beyond guest RAM %.2fx (target <= 0.25x)\n",
          (v["mini-vmm", "init_s"] / n["mini-vmm"]) / (v["qemu-microvm", "init_s"] / n["qemu-microvm"]),
          (v["mini-vmm", "rss_other_kb"] / n["mini-vmm"]) / (v["qemu-microvm", "rss_other_kb"] / n["qemu-microvm"])
      }
    }' "$WORK/results.txt" >&2
