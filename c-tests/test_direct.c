/* O_DIRECT: aligned buffers from ioe_buffer_alloc round-trip; misaligned
 * requests fail with -EINVAL in their callback and the context keeps going. */
#include "test_util.h"

#define BLOCK 4096
#define N 64

static void run(uint32_t backend) {
    int fd = temp_file((off_t)N * BLOCK, O_DIRECT);
    struct ioe_context *ctx = open_context(backend, 8, NULL);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(2 * N + 8, &w);
    uint8_t *buf = NULL;
    CHECK_EQ(ioe_buffer_alloc((size_t)N * BLOCK, 0, (void **)&buf), 0);

    for (int i = 0; i < N; i++) {
        fill_pattern(buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i + 1000);
        CHECK_EQ(ioe_write(ctx, fd, buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i * BLOCK, IOE_CHANNEL_WRITE,
                           on_complete, &s[i]), 0);
    }
    waiter_wait(&w, N);
    memset(buf, 0, (size_t)N * BLOCK);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(s[i].result, BLOCK);
        CHECK_EQ(ioe_read(ctx, fd, buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i * BLOCK, IOE_CHANNEL_READ,
                          on_complete, &s[N + i]), 0);
    }
    waiter_wait(&w, 2 * N);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(s[N + i].result, BLOCK);
        CHECK(matches_pattern(buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i + 1000));
    }

    /* Length not a multiple of the block size; offset not block aligned. */
    struct slot *bad = &s[2 * N];
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK - 1, 0, IOE_CHANNEL_READ, on_complete, &bad[0]), 0);
    CHECK_EQ(ioe_write(ctx, fd, buf, BLOCK, 1, IOE_CHANNEL_WRITE, on_complete, &bad[1]), 0);
    waiter_wait(&w, 2 * N + 2);
    CHECK_EQ(bad[0].result, -EINVAL);
    CHECK_EQ(bad[1].result, -EINVAL);

    /* A misaligned address: the engine must report what the kernel says for
     * the same pread(2) (EINVAL unless the device accepts any alignment). */
    errno = 0;
    ssize_t direct = pread(fd, buf + 1, BLOCK, 0);
    int64_t expected = direct < 0 ? -(int64_t)errno : (int64_t)direct;
    CHECK_EQ(ioe_read(ctx, fd, buf + 1, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &bad[2]), 0);
    waiter_wait(&w, 2 * N + 3);
    CHECK_EQ(bad[2].result, expected);

    /* Still serving. */
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &bad[3]), 0);
    waiter_wait(&w, 2 * N + 4);
    CHECK_EQ(bad[3].result, BLOCK);
    CHECK(matches_pattern(buf, BLOCK, 1000));

    struct ioe_stats stats;
    ioe_context_stats(ctx, &stats);
    CHECK_EQ(stats.failed, 2 + (expected < 0));
    slots_check_once(s, 2 * N + 4);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    ioe_buffer_free(buf);
    free(s);
    close(fd);
}

int main(void) {
    if (run_backends(run) == SKIP_EXIT) return SKIP_EXIT;
    printf("direct: ok\n");
    return 0;
}
