#!/usr/bin/env bash
# The paging walker's two KVM differential tests, run a second time on a different MMU: inside
# a QEMU TCG VM with `-cpu max` (L1), on its nested, hardware-style KVM (kvm-amd).
#
# On the CI host the oracle is a software KVM (kvm_pvm) whose CPUID lacks 1 GiB pages and
# whose emulation has quirks (shared/MACHINE.md). In L1:
# - crates/vmkit-paging/tests/kvm_translate.rs compares the walker with KVM_TRANSLATE on random
#   hostile tables, now with the 1 GiB pages and (every other round) the 5-level paging
#   `-cpu max` advertises;
# - crates/vmkit-vcpu/tests/paging_oracle.rs runs the paging guest, whose page faults (CR2 and
#   error code for supervisor accesses: WP, NX, SMEP, SMAP with AC clear and set, a reserved
#   bit; user (CPL3) accesses to supervisor, read-only, no-execute and not-present pages;
#   writes with CR0.WP = 0; and, required here, protection-key probes, which the CI host's
#   CPU cannot run) are raised by QEMU's model of an AMD CPU running a nested-paging guest, and
#   the walker must reach the same verdicts. QEMU's CPU model differs from hardware in one
#   known way (a reserved-bit #PF without the P bit); the test undoes exactly that, and prints
#   it, when VMKIT_PAGING_ORACLE_QEMU_TCG is set.
# Both test binaries must pass in L1; their summaries are printed.
#
# Usage: tests/linux-guest/paging-nested.sh   (CASES=50000 translations by default)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/lib.sh"

lg_prepare
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LG_ROOT/target}"
WORK="$LG_CACHE/paging-nested"
mkdir -p "$WORK"
# The test executables cargo builds (the last line naming one for each test target).
test_exe() { # PACKAGE TEST
    (cd "$LG_ROOT" && cargo test -q --no-run -p "$1" --test "$2" --message-format=json) |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1
}
lg_log "building the two oracle tests"
TRANSLATE=$(test_exe vmkit-paging kvm_translate)
ORACLE=$(test_exe vmkit-vcpu paging_oracle)
[ -x "$TRANSLATE" ] && [ -x "$ORACLE" ] || { lg_log "test executables not found"; exit 1; }
echo "${CASES:-50000}" > "$WORK/cases"
specs=("$TRANSLATE:bin/kvm_translate" "$ORACLE:bin/paging_oracle" "$WORK/cases:cases")
mapfile -t -O "${#specs[@]}" specs < <(lg_lib_specs "$TRANSLATE" "$ORACLE")
lg_initramfs "$WORK/l1.cpio.gz" "$HERE/paging-nested/l1-init" "${specs[@]}"

LOG="$WORK/console.log"
lg_log "booting L1 under TCG (log: $LOG)"
lg_run "${LG_TIMEOUT:-300}" "$LOG" qemu-system-x86_64 -M pc -accel tcg -cpu max -m 1G \
    -nographic -no-reboot -kernel "$LG_KERNEL" -initrd "$WORK/l1.cpio.gz" \
    -append 'console=ttyS0 panic=-1 quiet'
tr -d '\r' < "$LOG" > "$WORK/console.clean.log"
lg_expect "$WORK/console.clean.log" "L1-KVM-OK" "L1-EXIT kvm_translate 0" "L1-EXIT paging_oracle 0"
grep -E '^L1-CPU-FLAGS|translations|QEMU TCG reported|^test result' "$WORK/console.clean.log" |
    sed 's/^/[linux-guest]   /' >&2
lg_log "PASS: the walker agrees with KVM_TRANSLATE and with the page faults of QEMU's nested-paging CPU"
