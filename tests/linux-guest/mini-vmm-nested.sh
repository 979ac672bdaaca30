#!/usr/bin/env bash
# mini-vmm boots Debian's stock cloud kernel on a real (nested, hardware-style) KVM, with
# vmkit-virtio's devices, and the guest uses every one of them.
#
# This host's /dev/kvm cannot boot Linux, so the test runs one level down: QEMU's software CPU
# (TCG, -cpu max, which emulates AMD SVM with nested paging) boots an L1 Linux whose
# initramfs holds the kvm modules, mini-vmm (with the shared libraries `ldd` lists, at the
# same paths), the same stock kernel and an L2 busybox initramfs. QEMU also gives L1 two raw
# disk image files as virtio-blk-pci disks. L1's /init loads kvm-amd, and runs
#   mini-vmm --kernel /vmlinuz --initramfs /l2.cpio.gz --stats --disk path=/dev/vda
#            --disk path=/dev/vdb,readonly=on --net tap=tap0 --rng --console file=/hvc0.out
#            --cpus boot=2,host=2 [--vhost-user ...]
# (host=2: the two vCPUs run as vmkit-sched tasks on two workers, halts parked; the restored
# run of the second part takes thread-per-vCPU, mini-vmm's default), configuring L1's end of tap0 (10.0.2.1) as soon as mini-vmm has created it. mini-vmm
# describes two vCPUs and its virtio-mmio devices to L2 in ACPI tables. L2's /init loads the
# virtio modules, then prints one marker per verified step: the token of this run written to
# its disk at 1 MiB, synced and read back (L2-BLK-OK), the second disk read-only and refusing
# a write (L2-RO-OK), 32 bytes from /dev/hwrng (L2-RNG-OK), a
# ping of 10.0.2.1 over the TAP link (L2-NET-OK), a line written to hvc0 only (L2-HVC0-OK,
# which L1 prints from the console's file after mini-vmm exits: on the shared stdout it could
# land inside a serial line still draining),
# both CPUs online (L2-CPUS 2), the CMOS RTC found through the DSDT (L2-RTC-OK), a line L1
# types into mini-vmm's stdin read from ttyS0 (COM1's receive FIFO and interrupt; L1 checks it
# and prints L1-SERIAL-IN-OK); then `poweroff -f` (the ACPI S5 sleep registers) ends mini-vmm.
# L2's consoles (ttyS0, hvc0) are mini-vmm's stdout, which L1 prints on its own console: the
# one log holds everything. From here (L0) the script checks every marker and that the disk
# image file itself holds the token at 1 MiB. On failure the log is printed and the script
# exits non-zero; every run is bounded by a timeout.
#
# vhost-user (unless L2_VHOST_USER is empty): in the first run mini-vmm is also the
# vhost-user *frontend* of vmkit-vhost-user's console backend, a separate process in L1
# (`vmkit-vhost-user console --socket /vu-con.sock --output /vu-con.out --input /vu-con.in`,
# mini-vmm `--vhost-user type=console,socket=/vu-con.sock`, guest RAM memfd-shared). L2's stock
# virtio_console driver sees it as hvc1: L2 writes this run's token to it, reads the line L1
# then writes into the backend's input (a FIFO) and writes it back. L1 prints the backend's output file
# (L1-VU-CONSOLE-LOG lines) and L1-VU-CONSOLE-IN-OK when the echo of its line is there; here
# the token is looked for in those lines. The same frontend also carries vmkit-vhost-user's
# rng backend (`--vhost-user type=rng`): L2 selects that second virtio-rng as its hwrng source
# and reads 32 bytes (L2-VU-RNG-OK). The second run has no vhost-user device (a VM with one
# cannot be snapshotted).
#
# A second run (unless L2_SNAPSHOT_AFTER_MS=0) checks snapshot/restore of the whole VM: in
# the same L1, mini-vmm boots the same L2 with `--snapshot path=/snap,after=MS` (mid-boot by
# default: half-way to L2's init, as the first run measured it), which saves the VM and exits
# 75; a new mini-vmm
# `--restore path=/snap` continues it, and the guest must reach the same markers, each printed
# by the saving or the restoring process, and end the same way (powered off, exit 0).
#
# Prints, from L1's /proc/uptime: mini-vmm start -> L2's first init line, and -> mini-vmm's
# exit; L2's own uptime at init; the whole L0 run. Measured 2026-11-21 on an idle machine with
# QEMU 10.0: ~17-21 s, ~3 s more, ~8-11 s, ~25-33 s; under QEMU 7.2 on a loaded machine (load
# average 10 on 2 cores) 63 s, 5 s more, 23 s, 88 s.
#
# Usage: tests/linux-guest/mini-vmm-nested.sh
#   L2_CMDLINE=...   L2's kernel command line (default: console=ttyS0 reboot=k panic=-1;
#                    add earlyprintk=serial,ttyS0 to see where an early boot dies)
#   L2_VMM_ARGS=...  mini-vmm's device options (default: the list above)
#   L2_KERNEL=...    the kernel mini-vmm boots (default: the same bzImage as L1; a vmlinux
#                    with a PVH entry, e.g. Debian's unpacked from that bzImage, also works)
#   L2_SNAPSHOT_AFTER_MS=...  when the second run saves the VM (default auto: half of the
#                    first run's time from mini-vmm's start to L2's init; 0: no second run)
#   L2_VHOST_USER=... vhost-user devices of the first run (default: "console rng"; empty: none)
#   LG_TIMEOUT=...   seconds before the L1 run is killed (default 240, 480 with the second
#                    run)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/lib.sh"

lg_prepare
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
lg_log "building mini-vmm (release)"
(cd "$LG_ROOT" && cargo build --release -q -p mini-vmm)
VMM="$CARGO_TARGET_DIR/release/mini-vmm"
L2_VHOST_USER="${L2_VHOST_USER-console rng}"
VU="$CARGO_TARGET_DIR/release/vmkit-vhost-user"
if [ -n "$L2_VHOST_USER" ]; then
    lg_log "building vmkit-vhost-user (release)"
    (cd "$LG_ROOT" && cargo build --release -q -p vmkit-vhost-user)
fi

WORK="$LG_CACHE/mini-vmm-nested"
mkdir -p "$WORK"
L2_CMDLINE="${L2_CMDLINE:-console=ttyS0 reboot=k panic=-1}"
L2_VMM_ARGS="${L2_VMM_ARGS:---disk path=/dev/vda --disk path=/dev/vdb,readonly=on --net tap=tap0 --rng --console file=/hvc0.out --cpus boot=2,host=2}"
echo "$L2_CMDLINE" > "$WORK/l2-cmdline"
echo "$L2_VMM_ARGS" > "$WORK/l2-vmm-args"
L2_SNAPSHOT_AFTER_MS="${L2_SNAPSHOT_AFTER_MS:-auto}"
SNAP_SPEC=()
rm -f "$WORK/l2-snapshot-after"
if [ "$L2_SNAPSHOT_AFTER_MS" != 0 ]; then
    echo "$L2_SNAPSHOT_AFTER_MS" > "$WORK/l2-snapshot-after"
    SNAP_SPEC=("$WORK/l2-snapshot-after:l2-snapshot-after")
fi
# A token unique to this run: L2 writes it to its disk, the check below finds it in the image.
TOKEN="VMKIT-L2-DISK-$(date +%s%N)-$$"
echo -n "$TOKEN" > "$WORK/token"
DISK="$WORK/disk.img"
rm -f "$DISK"
truncate -s 16M "$DISK"
# The read-only disk starts with a known label L2 reads back.
RODISK="$WORK/ro-disk.img"
rm -f "$RODISK"
truncate -s 1M "$RODISK"
printf 'VMKIT-RO-DISK-OK' | dd of="$RODISK" conv=notrunc 2>/dev/null
RO_SUM=$(sha256sum < "$RODISK")

lg_initramfs "$WORK/l2.cpio.gz" "$HERE/mini-vmm/l2-init" "$WORK/token:token"

# mini-vmm is linked against glibc: ship the libraries and the loader at their own paths.
specs=("$VMM:bin/mini-vmm" "${L2_KERNEL:-$LG_KERNEL}:vmlinuz" "$WORK/l2.cpio.gz:l2.cpio.gz"
       "$WORK/l2-cmdline:l2-cmdline" "$WORK/l2-vmm-args:l2-vmm-args" "${SNAP_SPEC[@]}")
mapfile -t -O "${#specs[@]}" specs < <(lg_lib_specs "$VMM")
echo "$L2_VHOST_USER" > "$WORK/l2-vhost-user"
specs+=("$WORK/l2-vhost-user:l2-vhost-user")
if [ -n "$L2_VHOST_USER" ]; then
    # The backend binary and its libraries (the same glibc as mini-vmm's, copied again).
    specs+=("$VU:bin/vmkit-vhost-user")
    mapfile -t -O "${#specs[@]}" specs < <(lg_lib_specs "$VU")
fi
lg_initramfs "$WORK/l1.cpio.gz" "$HERE/mini-vmm/l1-init" "${specs[@]}"

LOG="$WORK/console.log"
lg_log "booting L1 under TCG (log: $LOG)"
start=$(date +%s.%N)
DEFAULT_TIMEOUT=240
[ "$L2_SNAPSHOT_AFTER_MS" != 0 ] && DEFAULT_TIMEOUT=480
lg_run "${LG_TIMEOUT:-$DEFAULT_TIMEOUT}" "$LOG" qemu-system-x86_64 -M pc -accel tcg -cpu max -m 2G \
    -nographic -no-reboot -kernel "$LG_KERNEL" -initrd "$WORK/l1.cpio.gz" \
    -drive "file=$DISK,format=raw,if=virtio" -drive "file=$RODISK,format=raw,if=virtio" \
    -append 'console=ttyS0 panic=-1 quiet'
end=$(date +%s.%N)
markers=("L1-KVM-OK" "L2-INIT-OK" "L2-UNAME $(basename "$LG_KERNEL" | sed 's/^vmlinuz-//')")
case " $L2_VMM_ARGS " in *" --disk "*) markers+=("L2-BLK-OK");; esac
case " $L2_VMM_ARGS " in *"readonly=on"*) markers+=("L2-RO-OK VMKIT-RO-DISK-OK");; esac
case " $L2_VMM_ARGS " in *" --rng "*) markers+=("L2-RNG-OK");; esac
case " $L2_VMM_ARGS " in *" --net "*) markers+=("L1-TAP-UP" "L2-NET-OK");; esac
case " $L2_VMM_ARGS " in *" --console "*) markers+=("L2-HVC0-OK");; esac
cpus=$(echo "$L2_VMM_ARGS" | sed -n 's/.*--cpus boot=\([0-9]*\).*/\1/p')
markers+=("L2-CPUS ${cpus:-1}" "L2-RTC-OK" "L1-SERIAL-IN-OK" "L2-DONE" "mini-vmm: the guest powered off" "MINI-VMM-EXIT=0")
# With --cpus ...,host=M|auto the vCPUs ran as vmkit-sched tasks (mini-vmm's --stats line).
case " $L2_VMM_ARGS " in *host=[0-9a]*) markers+=("${cpus:-1} vCPUs on vmkit-sched");; esac
# The first run's markers, from its own lines only (not the second run's, prefixed R2).
FIRST="$WORK/console.first.log"
grep -vE '^(R2|L1-R2-END)' "$LOG" > "$FIRST" || true
lg_expect "$FIRST" "${markers[@]}"
case " $L2_VHOST_USER " in *" console "*)
    # The token can only have reached L1's log through the backend's output file.
    lg_expect "$FIRST" "L1-VU-CONSOLE-LOG L2-VU-CONSOLE-TX $(cat "$WORK/token")" \
        "L1-VU-CONSOLE-IN-OK"
    lg_log "vhost-user console: L2's token and the echo of L1's line are in the backend's output";;
esac
case " $L2_VHOST_USER " in *" rng "*)
    lg_expect "$FIRST" "L2-VU-RNG-OK"
    lg_log "vhost-user rng: L2 read its hwrng from the second virtio-rng (the backend process)";;
esac
case " $L2_VMM_ARGS " in *" --disk "*)
    found=$(dd if="$DISK" bs=512 skip=2048 count=1 2>/dev/null | head -c ${#TOKEN})
    if [ "$found" != "$TOKEN" ]; then
        lg_log "disk image $DISK holds '$found' at 1 MiB, expected '$TOKEN'"
        lg_log "---- console log $LOG ----"; cat "$LOG" >&2; lg_log "---- end of log ----"
        exit 1
    fi
    lg_log "disk image holds this run's token at 1 MiB: $TOKEN";;
esac
if [ "$(sha256sum < "$RODISK")" != "$RO_SUM" ]; then
    lg_log "the read-only disk image $RODISK changed"; exit 1
fi
lg_log "PASS: mini-vmm booted the stock kernel as L2 on nested KVM; markers: ${markers[*]}"
if [ "$L2_SNAPSHOT_AFTER_MS" != 0 ]; then
    # Every L2 marker again, from the saving or the restoring process, and the same end.
    r2_missing=0
    CLEAN="$WORK/console.clean.log"
    tr -d '\r' < "$LOG" > "$CLEAN"
    # (A marker can follow a guest line that had no newline yet: match it anywhere in an R2
    # line.)
    for m in "mini-vmm: snapshot written" "R2-SNAPSHOT-EXIT=75" "mini-vmm: restored" \
        "${markers[@]}"; do
        # (The saving run has no --stats and the restoring one no --cpus: no scheduler line.)
        case "$m" in L1-KVM-OK|*"vCPUs on vmkit-sched") continue;; esac
        grep -F -- "$m" "$CLEAN" | grep -qE '^R2(-SAVE)? ' ||
            { lg_log "second run: missing marker: $m"; r2_missing=1; }
    done
    if [ "$r2_missing" -ne 0 ]; then
        lg_log "---- console log $LOG ----"; cat "$LOG" >&2; lg_log "---- end of log ----"
        exit 1
    fi
    lg_log "PASS: a snapshot taken mid-boot, restored by a new mini-vmm, reached the same markers"
    grep -E '^R2-SNAPSHOT-AFTER-MS|^R2-SNAPSHOT-FILES|snapshot written|^R2 mini-vmm: restored|^L1-R2-END' "$CLEAN" |
        sed 's/^/[linux-guest]   /' >&2
fi
tr -d '\r' < "$LOG" | awk '
    /^L1-SAW-L2-INIT/ { printf "[linux-guest]   mini-vmm start -> L2 init first line: %s s (L1 clock)\n", $3 }
    /^L1-MINI-VMM-END/ { printf "[linux-guest]   mini-vmm start -> mini-vmm exit:      %s s (L1 clock)\n", $3 }
    /^L2-UPTIME/ { printf "[linux-guest]   L2 kernel uptime at init:             %s s (L2 clock)\n", $2 }' >&2
awk -v s="$start" -v e="$end" 'BEGIN { printf "[linux-guest]   whole L0 run: %.1f s\n", e - s }' >&2
