/* io_uring specifics: a request that fails at preparation never strands
 * the ones queued after it; what an IOPOLL ring can never run is refused at
 * submission; the completion queue never overflows, counted by the engine
 * and by the kernel's own io_uring_cqe_overflow tracepoint. */
#include "test_util.h"

#include <linux/perf_event.h>
#include <sys/syscall.h>

#define BLOCK 4096

/* An address no process may hand the kernel (above the user address
 * space): reads into it fail with -EFAULT, at preparation on kernels that
 * import buffers there (io_uring) or in io_submit (AIO). */
#define KERNEL_ADDRESS ((void *)(uintptr_t)0xffff800000000000ull)

struct chain {
    struct ioe_context *ctx;
    int fd;
    uint8_t *good_buf;
    struct slot *bad, *good;
};

/* Runs on the poller (inline) or a pool thread: queues a read the kernel
 * refuses and then a valid one. Inline, both reach the kernel in the
 * poller's one io_uring_enter. */
static void queue_bad_then_good(void *arg, int64_t result) {
    struct chain *c = arg;
    CHECK_EQ(result, BLOCK);
    CHECK_EQ(ioe_read(c->ctx, c->fd, KERNEL_ADDRESS, BLOCK, 0, IOE_CHANNEL_READ, on_complete, c->bad), 0);
    CHECK_EQ(ioe_read(c->ctx, c->fd, c->good_buf, BLOCK, BLOCK, IOE_CHANNEL_READ, on_complete, c->good), 0);
}

static void prep_failure_strands_nothing(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(4 * BLOCK, 0);
    uint8_t data[BLOCK];
    fill_pattern(data, BLOCK, 1);
    CHECK_EQ(pwrite(fd, data, BLOCK, BLOCK), BLOCK);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(2, &w);
    static uint8_t first[BLOCK], good[BLOCK];
    memset(good, 0, sizeof good);
    struct chain c = {.ctx = ctx, .fd = fd, .good_buf = good, .bad = &s[0], .good = &s[1]};
    CHECK_EQ(ioe_read(ctx, fd, first, BLOCK, 0, IOE_CHANNEL_READ, queue_bad_then_good, &c), 0);
    /* Both complete while the context runs: nothing waits for destroy. */
    waiter_wait(&w, 2);
    slots_check_once(s, 2);
    CHECK_EQ(s[0].result, -EFAULT);
    CHECK_EQ(s[1].result, BLOCK);
    CHECK(memcmp(good, data, BLOCK) == 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
}

static void iopoll_refuses_what_it_cannot_run(void) {
    struct ioe_context *ctx = open_iopoll_context(4);
    int fd = temp_file(BLOCK, O_DIRECT);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(2, &w);
    /* Sync operations fail at preparation on an IOPOLL ring: refused here. */
    CHECK_EQ(ioe_fsync(ctx, fd, IOE_CHANNEL_WRITE, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_fdatasync(ctx, fd, IOE_CHANNEL_WRITE, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_fallocate(ctx, fd, 0, 0, BLOCK, IOE_CHANNEL_WRITE, on_complete, &s[0]), -EINVAL);
    /* A read still gets its one callback (data, or an error if the device
     * has no poll queues). */
    void *buf = NULL;
    CHECK_EQ(ioe_buffer_alloc(BLOCK, 0, &buf), 0);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &s[1]), 0);
    waiter_wait(&w, 1);
    CHECK(s[1].result == BLOCK || s[1].result < 0);
    CHECK_EQ(atomic_load(&s[0].calls), 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(atomic_load(&s[1].calls), 1);
    ioe_buffer_free(buf);
    free(s);
    close(fd);
}

/* --- completion queue overflow ------------------------------------------ */

/* A counter of the kernel's io_uring:io_uring_cqe_overflow tracepoint in
 * this process and the threads it creates from now on, or -1 if tracefs
 * or perf events are not available (not root, no tracefs mounted). */
static int open_overflow_counter(void) {
    const char *paths[] = {"/sys/kernel/tracing/events/io_uring/io_uring_cqe_overflow/id",
                           "/sys/kernel/debug/tracing/events/io_uring/io_uring_cqe_overflow/id"};
    long long id = -1;
    for (int i = 0; i < 2 && id < 0; i++) {
        FILE *f = fopen(paths[i], "r");
        if (f == NULL) continue;
        if (fscanf(f, "%lld", &id) != 1) id = -1;
        fclose(f);
    }
    if (id < 0) return -1;
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.type = PERF_TYPE_TRACEPOINT;
    attr.size = sizeof attr;
    attr.config = (uint64_t)id;
    attr.inherit = 1; /* the engine's threads, created after this */
    return (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
}

struct reader {
    struct ioe_context *ctx;
    int fd;
    uint8_t *bufs;
    atomic_long issued;
    long total;
    long file_blocks;
    struct waiter *w;
};

struct reader_slot {
    struct reader *r;
    int index;
};

static void read_next(struct reader_slot *rs);

static void on_read(void *arg, int64_t result) {
    struct reader_slot *rs = arg;
    CHECK_EQ(result, BLOCK);
    waiter_signal(rs->r->w);
    read_next(rs);
}

/* Issues the next read of the chain, until the total is reached. */
static void read_next(struct reader_slot *rs) {
    struct reader *r = rs->r;
    long n = atomic_fetch_add(&r->issued, 1);
    if (n >= r->total) return;
    uint64_t block = ((uint64_t)n * 0x9e3779b97f4a7c15ull >> 20) % (uint64_t)r->file_blocks;
    CHECK_EQ(ioe_read(r->ctx, r->fd, r->bufs + (size_t)rs->index * BLOCK, BLOCK, block * BLOCK, IOE_CHANNEL_READ,
                      on_read, rs), 0);
}

/* Keeps `depth` page-cache reads in flight, each callback issuing the next:
 * completions arrive in bulk, the case that used to overflow the CQ. */
static void cq_never_overflows(uint32_t depth, struct ioe_workers *workers, int counter) {
    const long file_blocks = 4096;
    int fd = temp_file(file_blocks * BLOCK, 0);
    uint8_t *fill = calloc(file_blocks, BLOCK);
    CHECK(fill != NULL);
    CHECK_EQ(pwrite(fd, fill, (size_t)file_blocks * BLOCK, 0), file_blocks * BLOCK); /* cached */
    free(fill);
    long before = 0;
    if (counter >= 0) CHECK_EQ(read(counter, &before, sizeof before), sizeof before);

    struct ioe_context *ctx = open_context(IOE_BACKEND_URING, depth, workers);
    struct waiter w;
    waiter_init(&w);
    struct reader r = {.ctx = ctx, .fd = fd, .total = 100000, .file_blocks = file_blocks, .w = &w};
    atomic_init(&r.issued, 0);
    r.bufs = malloc((size_t)depth * BLOCK);
    struct reader_slot *rs = calloc(depth, sizeof *rs);
    CHECK(r.bufs && rs);
    for (uint32_t i = 0; i < depth; i++) {
        rs[i] = (struct reader_slot){.r = &r, .index = (int)i};
        read_next(&rs[i]);
    }
    waiter_wait(&w, r.total);
    struct ioe_stats stats;
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(stats.completed, r.total);
    CHECK_EQ(stats.failed, 0);
    CHECK_EQ(stats.cq_overflows, 0);
    if (counter >= 0) {
        /* Inherited counts arrive as the engine's threads exit (destroy). */
        long after = 0;
        CHECK_EQ(read(counter, &after, sizeof after), sizeof after);
        printf("depth %u%s: %ld io_uring_cqe_overflow events\n", depth, workers ? " (pool)" : "", after - before);
        CHECK_EQ(after - before, 0);
    }
    free(rs);
    free(r.bufs);
    close(fd);
}

int main(void) {
    if (skip_unless_backend(IOE_BACKEND_URING)) return SKIP_EXIT;
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        prep_failure_strands_nothing(BACKENDS[b], NULL);
    }
    iopoll_refuses_what_it_cannot_run();

    int counter = open_overflow_counter();
    if (counter < 0) printf("io_uring_cqe_overflow tracepoint not available (%s): engine counter only\n",
                            strerror(errno));
    struct ioe_workers *pool = NULL;
    CHECK_EQ(ioe_workers_create(1, &pool), 0);
    const uint32_t depths[3] = {16, 64, 128};
    for (int i = 0; i < 3; i++) cq_never_overflows(depths[i], NULL, counter);
    cq_never_overflows(64, pool, counter);
    CHECK_EQ(ioe_workers_destroy(pool), 0);
    if (counter >= 0) close(counter);
    printf("uring: ok\n");
    return 0;
}
