/* Mergers: contiguous requests become one I/O, each request still gets its
 * own callback and its own bytes, also at end of file. */
#include "test_util.h"

#define BLOCK 4096
#define N 64

static void run(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(0, 0);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(2 * N + 8, &w);
    uint8_t *data = malloc((size_t)N * BLOCK);
    uint8_t *back = calloc(N, BLOCK);
    CHECK(data && back);
    for (int i = 0; i < N; i++) fill_pattern(data + (size_t)i * BLOCK, BLOCK, (uint64_t)i);

    struct ioe_merger *m = (struct ioe_merger *)1;
    CHECK_EQ(ioe_merger_create(NULL, fd, IOE_OP_WRITE, IOE_CHANNEL_WRITE, 1 << 17, &m), -EINVAL);
    CHECK(m == NULL);
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_FSYNC, IOE_CHANNEL_WRITE, 1 << 17, &m), -EINVAL);
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_WRITE, 5, 1 << 17, &m), -EINVAL);
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_WRITE, IOE_CHANNEL_WRITE, 0, &m), -EINVAL);
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_WRITE, IOE_CHANNEL_WRITE, 1 << 17, NULL), -EINVAL);
    CHECK_EQ(ioe_merger_add(NULL, data, BLOCK, 0, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_merger_flush(NULL), -EINVAL);
    CHECK_EQ(ioe_merger_held(NULL), -EINVAL);
    CHECK_EQ(ioe_merger_destroy(NULL), -EINVAL);

    /* Writes: 64 x 4 KiB in runs of at most 128 KiB (32 requests each). */
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_WRITE, IOE_CHANNEL_WRITE, 1 << 17, &m), 0);
    CHECK_EQ(ioe_merger_add(m, NULL, BLOCK, 0, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_merger_add(m, data, BLOCK, 0, NULL, &s[0]), -EINVAL);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(ioe_merger_add(m, data + (size_t)i * BLOCK, BLOCK, (uint64_t)i * BLOCK, on_complete, &s[i]), 0);
    }
    CHECK_EQ(ioe_merger_held(m), 0); /* the second run filled up and left */
    CHECK_EQ(ioe_merger_destroy(m), 0);
    waiter_wait(&w, N);
    for (int i = 0; i < N; i++) CHECK_EQ(s[i].result, BLOCK);
    CHECK_EQ(pread(fd, back, (size_t)N * BLOCK, 0), N * BLOCK);
    CHECK(memcmp(back, data, (size_t)N * BLOCK) == 0);

    /* Reads of mixed sizes, then a gap (starts a new run), then past EOF. */
    memset(back, 0, (size_t)N * BLOCK);
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_READ, IOE_CHANNEL_READ, 1 << 20, &m), 0);
    const size_t sizes[5] = {100, 4096, 3000, 9000, 512};
    size_t off = 0;
    for (int i = 0; i < 5; i++) {
        CHECK_EQ(ioe_merger_add(m, back + off, sizes[i], off, on_complete, &s[N + i]), 0);
        off += sizes[i];
    }
    CHECK_EQ(ioe_merger_held(m), 5);
    size_t tail = (size_t)N * BLOCK - 1000;
    static uint8_t tail_buf[2000], beyond[4096];
    CHECK_EQ(ioe_merger_add(m, tail_buf, sizeof tail_buf, tail, on_complete, &s[N + 5]), 0);
    CHECK_EQ(ioe_merger_held(m), 1);
    CHECK_EQ(ioe_merger_add(m, beyond, sizeof beyond, tail + sizeof tail_buf, on_complete, &s[N + 6]), 0);
    CHECK_EQ(ioe_merger_flush(m), 0);
    CHECK_EQ(ioe_merger_held(m), 0);
    CHECK_EQ(ioe_merger_destroy(m), 0);
    waiter_wait(&w, N + 7);
    off = 0;
    for (int i = 0; i < 5; i++) {
        CHECK_EQ(s[N + i].result, sizes[i]);
        CHECK(memcmp(back + off, data + off, sizes[i]) == 0);
        off += sizes[i];
    }
    CHECK_EQ(s[N + 5].result, 1000);
    CHECK(memcmp(tail_buf, data + tail, 1000) == 0);
    CHECK_EQ(s[N + 6].result, 0);

    struct ioe_stats stats;
    ioe_context_stats(ctx, &stats);
    CHECK_EQ(stats.merged, N + 7);
    CHECK_EQ(stats.completed, N + 7);
    slots_check_once(s, N + 7);

    /* A merger outliving its context: held requests fail with -ESHUTDOWN. */
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_READ, IOE_CHANNEL_READ, 1 << 20, &m), 0);
    CHECK_EQ(ioe_merger_add(m, back, 512, 0, on_complete, &s[N + 7]), 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(ioe_merger_add(m, back + 512, 512, 512, on_complete, &s[N + 8]), -ESHUTDOWN);
    CHECK_EQ(ioe_merger_destroy(m), 0);
    waiter_wait(&w, N + 8);
    CHECK_EQ(s[N + 7].result, -ESHUTDOWN);
    CHECK_EQ(atomic_load(&s[N + 8].calls), 0);

    free(s);
    free(data);
    free(back);
    close(fd);
}

/* "Issue the next one": a callback that adds its successor to the merger
 * its request came from. */
struct next_one {
    struct ioe_merger **m;
    uint8_t *buf;
    struct waiter *w;
    atomic_int calls;
    int64_t result;
    int add_rc;
};

static void add_next(void *arg, int64_t result) {
    struct next_one *n = arg;
    n->result = result;
    n->add_rc = ioe_merger_add(*n->m, n->buf, 512, 4096, on_complete, NULL);
    atomic_fetch_add(&n->calls, 1);
    waiter_signal(n->w);
}

/* Held requests of a merger whose context shut down fail with -ESHUTDOWN,
 * and their callbacks may use the merger again: no deadlock on its lock. */
static void refused_callbacks_may_use_the_merger(uint32_t backend, struct ioe_workers *workers) {
    alarm(60); /* a deadlock ends the test */
    int fd = temp_file(8192, 0);
    struct ioe_context *ctx = open_context(backend, 4, workers);
    struct waiter w;
    waiter_init(&w);
    static uint8_t buf[1024];
    struct ioe_merger *m = NULL;
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_READ, IOE_CHANNEL_READ, 1 << 20, &m), 0);
    struct next_one n[2];
    for (int i = 0; i < 2; i++) {
        n[i] = (struct next_one){.m = &m, .buf = buf + 512 * i, .w = &w, .result = 1, .add_rc = 1};
        atomic_init(&n[i].calls, 0);
        CHECK_EQ(ioe_merger_add(m, buf + 512 * i, 512, 512 * (uint64_t)i, add_next, &n[i]), 0);
    }
    CHECK_EQ(ioe_merger_held(m), 2);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(ioe_merger_flush(m), 0);
    waiter_wait(&w, 2);
    for (int i = 0; i < 2; i++) {
        CHECK_EQ(atomic_load(&n[i].calls), 1);
        CHECK_EQ(n[i].result, -ESHUTDOWN);
        CHECK_EQ(n[i].add_rc, -ESHUTDOWN);
    }
    CHECK_EQ(ioe_merger_held(m), 0);
    CHECK_EQ(ioe_merger_destroy(m), 0);
    close(fd);
    alarm(0);
}

int main(void) {
    run_matrix(run, 2);
    run_matrix(refused_callbacks_may_use_the_merger, 1);
    printf("merge: ok\n");
    return 0;
}
