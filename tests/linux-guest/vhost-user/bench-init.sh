#!/bin/sh
# /init of the vhost-user-blk benchmark guest: the same O_DIRECT workload whatever backend
# serves the disk. Result lines start with "bench ".
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
lg-load-modules virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
DEV=/dev/vda
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b $DEV ] && break; sleep 0.2; done
MB=1048576
# Sizes keep each run a few seconds under TCG; 64 KiB requests move more data.
echo
Q=/sys/block/vda/queue
echo "info features=$(cat /sys/block/vda/device/features) max_segments=$(cat $Q/max_segments) max_sectors_kb=$(cat $Q/max_sectors_kb) nr_requests=$(cat $Q/nr_requests) write_cache=$(cat $Q/write_cache) wz=$(cat $Q/write_zeroes_max_bytes) disc=$(cat $Q/discard_max_bytes) lbs=$(cat $Q/logical_block_size) pbs=$(cat $Q/physical_block_size) io_opt=$(cat $Q/optimal_io_size) mq=$(ls /sys/block/vda/mq | wc -l)"
for spec in "seqwrite 65536 $((96 * MB))" "seqread 65536 $((96 * MB))" \
            "randwrite 65536 $((64 * MB))" "randread 65536 $((64 * MB))" \
            "seqwrite 4096 $((8 * MB))" "seqread 4096 $((8 * MB))" \
            "randwrite 4096 $((8 * MB))" "randread 4096 $((8 * MB))"; do
    set -- $spec
    vu-io bench $DEV "$1" "$2" "$3" || echo "bench-error $1 $2"
done
echo "bench-done"
reboot -f
