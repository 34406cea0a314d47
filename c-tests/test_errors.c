/* Bad input: every argument error has its documented code, refused
 * requests never call back, kernel errors arrive in the callback, and the
 * context keeps working afterwards. */
#include "test_util.h"

static void run(uint32_t backend) {
    int fd = temp_file(65536, 0);
    struct ioe_context *ctx = open_context(backend, 4, NULL);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(16, &w);
    static uint8_t buf[4096];

    struct ioe_request good = {.op = IOE_OP_READ, .channel = IOE_CHANNEL_READ, .fd = fd, .buf = buf,
                               .len = sizeof buf, .offset = 0, .callback = on_complete, .user_data = &s[0]};
    struct ioe_request r;

    CHECK_EQ(ioe_submit(NULL, &good), -EINVAL);
    CHECK_EQ(ioe_submit(ctx, NULL), -EINVAL);
    r = good; r.op = 99;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.channel = 3;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.callback = NULL;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.buf = NULL;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.len = 0;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.offset = UINT64_MAX - 100;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.offset = (uint64_t)INT64_MAX;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.op = IOE_OP_FALLOCATE;  /* fallocate with a buffer */
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = good; r.op = IOE_OP_FALLOCATE; r.buf = NULL; r.len = 0;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    CHECK_EQ(ioe_read(ctx, fd, buf, 0, 0, IOE_CHANNEL_READ, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_write(ctx, fd, NULL, 10, 0, IOE_CHANNEL_WRITE, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_fsync(ctx, fd, 7, on_complete, &s[0]), -EINVAL);
    CHECK_EQ(ioe_fdatasync(ctx, fd, IOE_CHANNEL_PRIO, NULL, &s[0]), -EINVAL);
    CHECK_EQ(ioe_fallocate(NULL, fd, 0, 0, 10, IOE_CHANNEL_WRITE, on_complete, &s[0]), -EINVAL);

    /* Batch: NULL array, empty batch, a bad first request, a bad request in the middle. */
    CHECK_EQ(ioe_submit_batch(NULL, &good, 1), -EINVAL);
    CHECK_EQ(ioe_submit_batch(ctx, NULL, 2), -EINVAL);
    CHECK_EQ(ioe_submit_batch(ctx, NULL, 0), 0);
    struct ioe_request batch[3] = {good, good, good};
    batch[0].op = 42;
    CHECK_EQ(ioe_submit_batch(ctx, batch, 3), -EINVAL);
    batch[0] = good;
    batch[0].user_data = &s[1];
    batch[1].channel = 9;
    CHECK_EQ(ioe_submit_batch(ctx, batch, 3), 1);  /* only the first was queued */
    waiter_wait(&w, 1);
    CHECK_EQ(s[1].result, sizeof buf);

    /* Nothing refused called back. */
    CHECK_EQ(atomic_load(&s[0].calls), 0);

    /* Invalid descriptors: the kernel's -EBADF arrives in the callback. */
    CHECK_EQ(ioe_read(ctx, -1, buf, 512, 0, IOE_CHANNEL_READ, on_complete, &s[2]), 0);
    CHECK_EQ(ioe_write(ctx, 1 << 20, buf, 512, 0, IOE_CHANNEL_WRITE, on_complete, &s[3]), 0);
    CHECK_EQ(ioe_fsync(ctx, -5, IOE_CHANNEL_PRIO, on_complete, &s[4]), 0);
    CHECK_EQ(ioe_fallocate(ctx, 1 << 20, 0, 0, 4096, IOE_CHANNEL_WRITE, on_complete, &s[5]), 0);
    waiter_wait(&w, 5);
    for (int i = 2; i <= 5; i++) CHECK_EQ(s[i].result, -EBADF);

    /* A mode the file system rejects. */
    CHECK_EQ(ioe_fallocate(ctx, fd, 0x7f00, 0, 4096, IOE_CHANNEL_WRITE, on_complete, &s[6]), 0);
    waiter_wait(&w, 6);
    CHECK(s[6].result < 0);

    /* Still working. */
    s[7].result = INT64_MIN;
    CHECK_EQ(ioe_read(ctx, fd, buf, sizeof buf, 0, IOE_CHANNEL_READ, on_complete, &s[7]), 0);
    waiter_wait(&w, 7);
    CHECK_EQ(s[7].result, sizeof buf);

    struct ioe_stats stats;
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(stats.submitted, 7);
    CHECK_EQ(stats.completed, 7);
    CHECK_EQ(stats.failed, 5);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
}

int main(void) {
    if (run_backends(run) == SKIP_EXIT) return SKIP_EXIT;
    printf("errors: ok\n");
    return 0;
}
