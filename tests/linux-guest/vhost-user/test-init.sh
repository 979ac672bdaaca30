#!/bin/sh
# /init of the vhost-user test guest. Every result line starts with "VU " so the host can
# grep the console; the host, not the guest, decides pass or fail from the image files.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
lg-load-modules virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
    virtio_blk virtio-rng failover net_failover virtio_net
echo "VU boot $(uname -r)"

# Find a disk by the serial the backend was started with (--serial).
disk_by_serial() {
    for s in /sys/block/vd*; do
        [ "$(cat "$s/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${s##*/}"; return; }
    done
}
for i in 1 2 3 4 5 6 7 8 9 10; do
    RW=$(disk_by_serial vu-rw); RO=$(disk_by_serial vu-ro)
    [ -n "$RW" ] && [ -n "$RO" ] && break
    sleep 0.2
done
echo "VU disks rw=$RW ro=$RO"

MB=1048576
P=/pattern.bin
PSUM=$(md5sum < $P | cut -d' ' -f1)
if [ -n "$RW" ]; then
    Q=/sys/block/${RW#/dev/}/queue
    echo "VU rw size=$(blockdev --getsize64 "$RW") discard_max=$(cat $Q/discard_max_bytes) write_zeroes_max=$(cat $Q/write_zeroes_max_bytes) ro=$(cat /sys/block/${RW#/dev/}/ro)"
    # 1) 4 MiB with O_DIRECT at 0, 2) the same pattern through the page cache at 4 MiB.
    dd if=$P of="$RW" bs=64k oflag=direct conv=notrunc 2>/dev/null && echo "VU write-direct rc=0" || echo "VU write-direct rc=$?"
    dd if=$P of="$RW" bs=64k seek=64 conv=notrunc 2>/dev/null && echo "VU write-cached rc=0" || echo "VU write-cached rc=$?"
    sync
    # 3) discard [8, 9) MiB, 4) write-zeroes [9, 10) MiB.
    blkdiscard -o $((8 * MB)) -l $MB "$RW" && echo "VU discard rc=0" || echo "VU discard rc=$?"
    vu-io zeroout "$RW" $((9 * MB)) $MB && echo "VU zeroout rc=0" || echo "VU zeroout rc=$?"
    sync
    echo 3 > /proc/sys/vm/drop_caches
    D=$(dd if="$RW" bs=64k count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    C=$(dd if="$RW" bs=64k count=64 skip=64 2>/dev/null | md5sum | cut -d' ' -f1)
    Z=$(dd if="$RW" bs=64k count=32 skip=128 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    ZREF=$(dd if=/dev/zero bs=64k count=32 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "VU readback pattern=$PSUM direct=$D cached=$C zeros=$Z zeros_ref=$ZREF"
fi
if [ -n "$RO" ]; then
    echo "VU ro flag=$(cat /sys/block/${RO#/dev/}/ro)"
    if dd if=$P of="$RO" bs=4k count=1 oflag=direct conv=notrunc 2>/dev/null; then
        echo "VU ro-write accepted"
    else
        echo "VU ro-write refused"
    fi
    echo "VU ro-read md5=$(dd if="$RO" bs=64k iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
fi

# rng: the kernel picks virtio_rng as the current hwrng; read 256 bytes twice.
echo "VU rng current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
A=$(dd if=/dev/hwrng bs=256 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
N=$(dd if=/dev/hwrng bs=256 count=1 2>/dev/null | wc -c)
B=$(dd if=/dev/hwrng bs=256 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
echo "VU rng bytes=$N a=$A b=$B"

# net: eth0 is the vhost-user-net device, the host's TAP is 10.77.0.1 (net-host.sh). Listen on
# 7777 for the host's 1 MiB, ping the host, wait for the data, send /g2h.bin back to 7778.
if [ -d /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.77.0.2/24 dev eth0
    timeout 40 nc -l -p 7777 -e sh -c 'cat > /tmp/h2g.bin' &
    L=$!
    ping -c 3 -W 2 10.77.0.1 > /tmp/ping.txt 2>&1
    RC=$?
    echo "VU net ping rc=$RC $(grep -o '[0-9]* packets received' /tmp/ping.txt)"
    wait $L
    RC=$?
    echo "VU net h2g rc=$RC bytes=$(wc -c < /tmp/h2g.bin) md5=$(md5sum < /tmp/h2g.bin | cut -d' ' -f1)"
    timeout 30 nc 10.77.0.1 7778 < /g2h.bin
    echo "VU net g2h rc=$?"
    echo "VU net stats $(cat /sys/class/net/eth0/statistics/rx_packets) rx, $(cat /sys/class/net/eth0/statistics/tx_packets) tx packets"
else
    echo "VU net no eth0"
fi

echo "VU done"
reboot -f
