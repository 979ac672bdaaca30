#!/usr/bin/env bash
# Benchmark (not a test): mini-vmm vs QEMU's microvm machine booting the same stock kernel
# and initramfs, side by side in the same L1 (a QEMU TCG VM with nested, hardware-style
# KVM; see mini-vmm-nested.sh for why one level down).
#
# For each VMM, alternating over ROUNDS runs, L1 reports the time from VMM start to the L2
# init's first line and the VMM's resident memory beyond guest RAM while the guest is up.
# The issue's targets: mini-vmm at most 0.5x QEMU's time and 0.25x its memory overhead.
# Everything here runs under QEMU's software CPU, so absolute times are ~10x a real host's;
# the ratios are what to read. Besides the ratio of the means it prints each round's ratio
# and their median: the host's load drifts, and the two runs of one round see the same load.
#
# Usage: tests/linux-guest/mini-vmm-bench.sh      (ROUNDS=3 by default; LG_TIMEOUT=600)
#   BENCH_PROFILE=1: a profiling run, not a measurement: both L2 kernels get `printk.time=1
#   initcall_debug`, mini-vmm prints its start-up phases (MINI_VMM_TRACE_BOOT) and exit
#   counts (--stats), and each round's L2 kernel log (initcalls over 20 ms) is printed, to
#   compare where each VMM's seconds go. Its times include printing that log.
#   BENCH_QEMU_RTC=1: a third row, qemu-microvm-rtc (`-M microvm,rtc=on`). Under KVM microvm
#   leaves its RTC out by default, and the kernel's rtc_cmos driver then spends ~7 s probing
#   the absent ports 0x70/0x71 (measured with BENCH_PROFILE=1); mini-vmm has an RTC. The
#   issue's target is against the default machine; this row shows the gap without that stall.
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
rm -f "$WORK/profile" "$WORK/qemu_rtc"
[ "${BENCH_PROFILE:-0}" = 1 ] && : > "$WORK/profile"
[ "${BENCH_QEMU_RTC:-0}" = 1 ] && : > "$WORK/qemu_rtc"
lg_initramfs "$WORK/l2.cpio.gz" "$HERE/mini-vmm-bench/l2-init"

# Both VMMs are dynamically linked: ship their libraries and loader at their own paths, and
# the two firmware blobs QEMU's microvm loads for a direct kernel boot, where this QEMU looks
# for them (/usr/share/qemu in 7.2; 10.0 takes the BIOS from /usr/share/seabios).
specs=("$VMM:bin/mini-vmm" "$QEMU:usr/bin/qemu-system-x86_64" "$LG_KERNEL:vmlinuz"
       "$WORK/l2.cpio.gz:l2.cpio.gz" "$WORK/rounds:rounds")
[ -e "$WORK/profile" ] && specs+=("$WORK/profile:profile")
[ -e "$WORK/qemu_rtc" ] && specs+=("$WORK/qemu_rtc:qemu_rtc")
for blob in bios-microvm.bin linuxboot_dma.bin; do
    path=""
    for dir in /usr/share/qemu /usr/share/seabios; do
        [ -f "$dir/$blob" ] && { path="$dir/$blob"; break; }
    done
    [ -n "$path" ] || { lg_log "QEMU firmware $blob not found"; exit 1; }
    specs+=("$path:${path#/}")
done
mapfile -t -O "${#specs[@]}" specs < <(lg_lib_specs "$VMM" "$QEMU")
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
if [ -e "$WORK/profile" ]; then
    tr -d '\r' < "$LOG" | grep -a -e '^BENCH-TRACE ' -e '^BENCH-DMESG ' -e '^[a-z-]*| ' >&2 || true
fi
tr -d '\r' < "$LOG" | grep -a '^BENCH-L2 ' >&2 || true
tr -d '\r' < "$LOG" | grep -a '^BENCH ' | tee "$WORK/results.txt" >&2
awk '
    { name = $2
      for (i = 3; i <= NF; i++) {
        split($i, kv, "="); v[name, kv[1]] += kv[2]
        if (kv[1] == "init_s") t[name, n[name] + 0] = kv[2]
      }
      n[name]++ }
    END {
      for (name in n) {
        printf "[linux-guest] %-13s mean over %d: init %.2f s, RSS beyond guest RAM %.0f KiB, peak RSS %.0f KiB\n",
          name, n[name], v[name, "init_s"] / n[name], v[name, "rss_other_kb"] / n[name], v[name, "hwm_kb"] / n[name]
      }
      if (n["mini-vmm"] && n["qemu-microvm-rtc"]) {
        printf "[linux-guest] mini-vmm / qemu-microvm-rtc: time %.2fx (extra row, not the target)\n",
          (v["mini-vmm", "init_s"] / n["mini-vmm"]) / (v["qemu-microvm-rtc", "init_s"] / n["qemu-microvm-rtc"])
      }
      if (n["mini-vmm"] && n["qemu-microvm"]) {
        printf "[linux-guest] mini-vmm / qemu-microvm: time %.2fx (target <= 0.5x), memory beyond guest RAM %.2fx (target <= 0.25x)\n",
          (v["mini-vmm", "init_s"] / n["mini-vmm"]) / (v["qemu-microvm", "init_s"] / n["qemu-microvm"]),
          (v["mini-vmm", "rss_other_kb"] / n["mini-vmm"]) / (v["qemu-microvm", "rss_other_kb"] / n["qemu-microvm"])
        # Each round runs the two back to back: their ratio within a round is less exposed to
        # the host load drifting over the whole run than the ratio of the means.
        m = n["mini-vmm"] < n["qemu-microvm"] ? n["mini-vmm"] : n["qemu-microvm"]
        line = ""
        for (i = 0; i < m; i++) {
          r[i] = t["mini-vmm", i] / t["qemu-microvm", i]; line = line sprintf(" %.2f", r[i])
        }
        for (i = 0; i < m; i++) for (j = i + 1; j < m; j++) if (r[j] < r[i]) { x = r[i]; r[i] = r[j]; r[j] = x }
        med = m % 2 ? r[int(m / 2)] : (r[m / 2 - 1] + r[m / 2]) / 2
        printf "[linux-guest] mini-vmm / qemu-microvm per round:%s (median %.2fx)\n", line, med
      }
    }' "$WORK/results.txt" >&2
