/*
 * vu-io: a tiny static helper for the vhost-user guest tests (busybox has no BLKZEROOUT and
 * no random-offset O_DIRECT I/O).
 *
 *   vu-io zeroout DEV OFFSET LEN        BLKZEROOUT ioctl (virtio-blk WRITE_ZEROES)
 *   vu-io discard DEV OFFSET LEN        BLKDISCARD ioctl (virtio-blk DISCARD)
 *   vu-io bench DEV MODE BS TOTAL       O_DIRECT I/O of TOTAL bytes in BS-sized requests;
 *                                       MODE = seqread|seqwrite|randread|randwrite;
 *                                       prints "bench MODE BS bytes=N usec=T MBps=X";
 *                                       writes are flushed (fdatasync) after the clock stops
 *
 * Random offsets come from a fixed-seed xorshift, so every run does the same requests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static int die(const char *what) {
    fprintf(stderr, "vu-io: %s: %s\n", what, strerror(errno));
    return 1;
}

static int range_ioctl(const char *dev, unsigned long req, const char *off, const char *len) {
    uint64_t r[2] = { strtoull(off, NULL, 0), strtoull(len, NULL, 0) };
    int fd = open(dev, O_RDWR);
    if (fd < 0) return die(dev);
    if (ioctl(fd, req, r) < 0) return die("ioctl");
    if (fsync(fd) < 0) return die("fsync");
    close(fd);
    return 0;
}

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static int bench(const char *dev, const char *mode, size_t bs, uint64_t total) {
    int write = strstr(mode, "write") != NULL, rnd = strncmp(mode, "rand", 4) == 0;
    int fd = open(dev, (write ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) return die(dev);
    uint64_t size;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) return die("BLKGETSIZE64");
    uint64_t blocks = size / bs;
    if (blocks == 0) { fprintf(stderr, "vu-io: device smaller than one block\n"); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, bs)) return die("posix_memalign");
    memset(buf, 0x5a, bs);
    uint64_t x = 88172645463325252ull, n = total / bs, t0 = now_us();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t blk;
        if (rnd) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; blk = x % blocks; }
        else blk = i % blocks;
        ssize_t r = write ? pwrite(fd, buf, bs, (off_t)(blk * bs)) : pread(fd, buf, bs, (off_t)(blk * bs));
        if (r != (ssize_t)bs) return die(write ? "pwrite" : "pread");
    }
    uint64_t dt = now_us() - t0;
    /* Outside the timed part: the host's disk speed is not the backend's; but the next
     * workload must not pay for this one's write-back either. */
    if (write && fdatasync(fd) < 0) return die("fdatasync");
    if (dt == 0) dt = 1;
    printf("bench %s %zu bytes=%llu usec=%llu MBps=%.2f\n", mode, bs,
           (unsigned long long)(n * bs), (unsigned long long)dt, (double)(n * bs) / (double)dt);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "zeroout")) return range_ioctl(argv[2], BLKZEROOUT, argv[3], argv[4]);
    if (argc == 5 && !strcmp(argv[1], "discard")) return range_ioctl(argv[2], BLKDISCARD, argv[3], argv[4]);
    if (argc == 6 && !strcmp(argv[1], "bench"))
        return bench(argv[2], argv[3], strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
    fprintf(stderr, "usage: vu-io zeroout|discard DEV OFFSET LEN | bench DEV MODE BS TOTAL\n");
    return 2;
}
