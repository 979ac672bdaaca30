#!/usr/bin/env bash
# Shared harness for tests that boot a real, unmodified Debian Linux kernel as a guest:
# under QEMU's software CPU (TCG), as the frontend of vmkit's vhost-user backends, and one
# level down, inside such a VM, under a hardware-style nested KVM for mini-vmm.
#
# Source it, then call:
#   lg_prepare                  install qemu + busybox, fetch and extract Debian's cloud kernel
#                               (never installed on the host); sets LG_KERNEL and LG_MODULES.
#                               LG_QEMU_BACKPORTS=1: install QEMU 10 from the distribution's
#                               backports instead (the apt source is added if missing)
#   lg_qemu_major               the installed QEMU's major version (0 if none)
#   lg_initramfs OUT INIT [SRC:DST ...]
#                               build a gzip'd newc initramfs with busybox, the virtio and kvm
#                               modules, INIT as /init and each SRC file copied to /DST
#   lg_run TIMEOUT LOG CMD...   run CMD with a timeout, console to LOG; on failure or timeout
#                               print LOG and return non-zero
#   lg_expect LOG MARKER...     fail (printing LOG) unless every MARKER line is in LOG
#
# Everything is cached under LG_CACHE (default target/linux-guest) so a second run is fast.
set -euo pipefail

LG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LG_CACHE="${LG_CACHE:-$LG_ROOT/target/linux-guest}"

lg_log() { echo "[linux-guest] $*" >&2; }

# Major version of the installed qemu-system-x86_64, or 0.
lg_qemu_major() {
    local v=""
    command -v qemu-system-x86_64 >/dev/null &&
        v=$(qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([0-9]*\).*/\1/p')
    echo "${v:-0}"
}

lg_prepare() {
    mkdir -p "$LG_CACHE"
    local need=() backports=()
    command -v busybox >/dev/null || need+=(busybox-static)
    if [ "${LG_QEMU_BACKPORTS:-0}" = 1 ] && [ "$(lg_qemu_major)" -lt 10 ]; then
        # Opt-in: QEMU 10 from the distribution's backports (bookworm-backports carries 10.0;
        # qemu-storage-daemon moved to qemu-utils there). Every script here passes with both
        # (2026-11-21); the distribution's QEMU stays the default, so CI needs no extra apt
        # source.
        local codename list
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
        list=/etc/apt/sources.list.d/$codename-backports.list
        if ! grep -rqs "^deb .* $codename-backports " /etc/apt/sources.list /etc/apt/sources.list.d/; then
            lg_log "adding $codename-backports to apt's sources ($list)"
            echo "deb http://deb.debian.org/debian $codename-backports main" > "$list"
        fi
        backports=(-t "$codename-backports" qemu-system-x86 qemu-utils)
    elif ! command -v qemu-system-x86_64 >/dev/null; then
        need+=(qemu-system-x86)
    fi
    if [ ${#need[@]} -gt 0 ] || [ ${#backports[@]} -gt 0 ]; then
        lg_log "installing ${need[*]} ${backports[*]}"
        apt-get update -qq
        if [ ${#need[@]} -gt 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        fi
        if [ ${#backports[@]} -gt 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${backports[@]}" >/dev/null
        fi
    fi
    if ! ls "$LG_CACHE"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
        local pkg
        [ -n "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep Candidate)" ] || apt-get update -qq
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
        [ -n "$pkg" ] || { lg_log "cannot resolve linux-image-cloud-amd64"; return 1; }
        lg_log "fetching $pkg (extracted, not installed)"
        (cd "$LG_CACHE" && apt-get download -q "$pkg" 2>/dev/null && dpkg-deb -x "$pkg"_*.deb kernel && rm -f "$pkg"_*.deb)
    fi
    LG_KERNEL=$(ls "$LG_CACHE"/kernel/boot/vmlinuz-* | head -n1)
    LG_MODULES=$(ls -d "$LG_CACHE"/kernel/lib/modules/*/kernel | head -n1)
    export LG_KERNEL LG_MODULES
}

# Modules in load order (shared/MACHINE.md): Debian's cloud kernel builds virtio as modules
# and ships no modules.dep, so /init loads them by hand with lg-load-modules.
LG_MODULE_ORDER=(
    drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_mmio.ko
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko
    drivers/net/net_failover.ko net/core/failover.ko drivers/net/virtio_net.ko
    drivers/char/virtio_console.ko drivers/char/hw_random/virtio-rng.ko
    virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko
    drivers/net/tun.ko
)

# lg_lib_specs EXE...: lg_initramfs specs for the shared libraries and the loader the
# executables are linked against (`ldd`), each at its own path, one per line.
lg_lib_specs() {
    local exe lib
    for lib in $(for exe in "$@"; do ldd "$exe"; done | grep -o '/[^ ]*' | sort -u); do
        echo "$lib:${lib#/}"
    done
}

lg_initramfs() {
    local out="$1" init="$2"; shift 2
    local root
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for applet in sh mount umount insmod cat echo dd sync md5sum sha256sum ls sleep mknod \
        reboot poweroff hexdump head tail grep ip ping sed awk cmp stat wc blockdev tr seq \
        mkdir rm dmesg free uname xxd od printf test timeout nc; do
        ln -sf busybox "$root/bin/$applet"
    done
    local m
    for m in "${LG_MODULE_ORDER[@]}"; do
        [ -f "$LG_MODULES/$m" ] && cp "$LG_MODULES/$m" "$root/lib/modules/"
    done
    # lg-load-modules NAME...: insmod the named modules (file names without .ko) in order.
    cat > "$root/bin/lg-load-modules" <<'LOAD'
#!/bin/sh
for m in "$@"; do
    f=/lib/modules/$m.ko
    [ -f "$f" ] || { echo "lg: no module $m"; continue; }
    insmod "$f" || grep -q "^$(echo "$m" | tr - _) " /proc/modules || echo "lg: insmod $m failed"
done
LOAD
    chmod +x "$root/bin/lg-load-modules"
    install -m 0755 "$init" "$root/init"
    local spec src dst
    for spec in "$@"; do
        src="${spec%%:*}"; dst="${spec#*:}"
        mkdir -p "$root/$(dirname "$dst")"
        cp -L "$src" "$root/$dst"
    done
    (cd "$root" && find . | sort | busybox cpio -o -H newc 2>/dev/null | gzip -6 > "$out")
    rm -rf "$root"
}

lg_run() {
    local t="$1" log="$2"; shift 2
    local rc=0
    timeout --kill-after=10 "$t" "$@" > "$log" 2>&1 < /dev/null || rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ]; then lg_log "TIMEOUT after ${t}s: $*"; else lg_log "exit $rc: $*"; fi
        lg_log "---- console log $log ----"; cat "$log" >&2; lg_log "---- end of log ----"
    fi
    return "$rc"
}

lg_expect() {
    local log="$1"; shift
    local missing=0 m
    for m in "$@"; do
        if ! grep -qF -- "$m" "$log"; then lg_log "missing marker: $m"; missing=1; fi
    done
    if [ "$missing" -ne 0 ]; then
        lg_log "---- console log $log ----"; cat "$log" >&2; lg_log "---- end of log ----"
        return 1
    fi
}
