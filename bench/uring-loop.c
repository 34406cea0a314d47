/* uring-loop: the random-read loop a C programmer would write by hand on
 * liburing, as a second peer for ioe-bench (next to fio). One thread, one
 * ring, one buffer per slot; each completion's follow-up read is submitted
 * at once (the fastest of the simple variants on the machine measured:
 * batching the follow-ups or folding them into the waiting call was
 * slower). No callbacks, queues or fairness: what the engine's extra work
 * is measured against.
 *
 * Usage: uring-loop --filename PATH --size BYTES[k|m|g] --iodepth N
 *                   --runtime SECONDS
 * Prints one JSON object: iops, cpu_us_per_io. Built only when liburing is
 * installed (Debian: liburing-dev). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_common.h"

#define BLOCK 4096u

static int usage(const char *why) {
    fprintf(stderr, "uring-loop: %s\nusage: uring-loop --filename PATH --size BYTES --iodepth N --runtime SECONDS\n", why);
    return 2;
}

static void queue_read(struct io_uring *ring, int fd, void *buf, uint64_t blocks, uint64_t *rng, unsigned slot) {
    /* At most iodepth reads are outstanding and the ring has iodepth
     * entries, so a free SQE always exists here. */
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_read(sqe, fd, buf, BLOCK, (xorshift(rng) % blocks) * BLOCK);
    io_uring_sqe_set_data64(sqe, slot);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    uint64_t size = 0;
    long depth = 32;
    double runtime = 3;
    static const struct option options[] = {{"filename", required_argument, 0, 'f'}, {"size", required_argument, 0, 's'},
                                            {"iodepth", required_argument, 0, 'q'}, {"runtime", required_argument, 0, 't'},
                                            {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        char *end;
        switch (opt) {
        case 'f': path = optarg; break;
        case 's': if (parse_size(optarg, &size)) return usage("--size must be a size such as 1g"); break;
        case 'q':
            depth = strtol(optarg, &end, 10);
            if (*end || depth < 1 || depth > 4096) return usage("--iodepth must be 1..4096");
            break;
        case 't':
            runtime = strtod(optarg, &end);
            if (*end || runtime <= 0) return usage("--runtime must be a positive number of seconds");
            break;
        default: return usage("unknown option");
        }
    }
    if (!path || size < BLOCK) return usage("--filename and a --size of at least 4k are required");

    int fd = open(path, O_RDONLY | O_DIRECT);
    if (fd < 0) return fprintf(stderr, "uring-loop: open %s: %s\n", path, strerror(errno)), 1;
    struct io_uring ring;
    int rc = io_uring_queue_init((unsigned)depth, &ring, 0);
    /* 77: io_uring is not available here (the test suite reports a skip). */
    if (rc < 0)
        return fprintf(stderr, "uring-loop: io_uring_queue_init: %s\n", strerror(-rc)),
               rc == -ENOSYS || rc == -EPERM || rc == -EACCES ? 77 : 1;
    void **bufs = calloc((size_t)depth, sizeof *bufs);
    if (!bufs) return fprintf(stderr, "uring-loop: out of memory\n"), 1;
    for (long i = 0; i < depth; i++)
        if (posix_memalign(&bufs[i], BLOCK, BLOCK)) return fprintf(stderr, "uring-loop: out of memory\n"), 1;

    uint64_t blocks = size / BLOCK, rng = 0x9e3779b97f4a7c15ull, ios = 0;
    double cpu_start = cpu_seconds();
    uint64_t start = now_ns(), deadline = start + (uint64_t)(runtime * 1e9);
    for (long i = 0; i < depth; i++) queue_read(&ring, fd, bufs[i], blocks, &rng, (unsigned)i);
    io_uring_submit(&ring);
    long in_flight = depth;
    int stopping = 0;
    while (in_flight > 0) {
        struct io_uring_cqe *cqe;
        rc = io_uring_wait_cqe(&ring, &cqe);
        if (rc == -EINTR) continue;
        if (rc < 0) return fprintf(stderr, "uring-loop: wait: %s\n", strerror(-rc)), 1;
        if (!stopping && now_ns() >= deadline) stopping = 1;
        unsigned head, done = 0;
        unsigned slots[4096];
        io_uring_for_each_cqe(&ring, head, cqe) {
            if (cqe->res != (int)BLOCK)
                return fprintf(stderr, "uring-loop: read returned %d\n", cqe->res), 1;
            slots[done++] = (unsigned)io_uring_cqe_get_data64(cqe);
        }
        io_uring_cq_advance(&ring, done);
        ios += done;
        in_flight -= done;
        for (unsigned k = 0; k < done && !stopping; k++) {
            queue_read(&ring, fd, bufs[slots[k]], blocks, &rng, slots[k]);
            io_uring_submit(&ring);
            in_flight++;
        }
    }
    double seconds = (double)(now_ns() - start) / 1e9, cpu = cpu_seconds() - cpu_start;
    printf("{\"tool\":\"uring-loop\",\"iodepth\":%ld,\"seconds\":%.3f,\"ios\":%llu,\"iops\":%.1f,\"cpu_us_per_io\":%.4f}\n",
           depth, seconds, (unsigned long long)ios, (double)ios / seconds, cpu / (double)ios * 1e6);
    io_uring_queue_exit(&ring);
    for (long i = 0; i < depth; i++) free(bufs[i]);
    free(bufs);
    close(fd);
    return 0;
}
