/* Ordering and limits: accepted requests run concurrently unless
 * IOE_REQ_DRAIN orders them (a drain request waits for everything accepted
 * before it, and everything accepted after it waits for the drain request),
 * on both backends, with inline and pool callbacks; max_queued refuses with
 * -EAGAIN once reached and counts the refusals. A read of an empty pipe
 * stands for a request that takes as long as the test wants. */
#include "test_util.h"

#define BLOCK 4096

static struct ioe_request req(uint32_t op, uint32_t channel, int fd, void *buf, uint64_t len, uint64_t offset,
                              struct slot *s, uint32_t flags) {
    return (struct ioe_request){.op = op, .channel = channel, .fd = fd, .buf = buf, .len = len, .offset = offset,
                                .callback = on_complete, .user_data = s, .flags = flags};
}

static void drain_orders(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(2 * BLOCK, 0);
    static uint8_t old_data[BLOCK], new_data[BLOCK], r0[BLOCK], later[BLOCK];
    memset(old_data, 0x11, BLOCK);
    memset(new_data, 0xab, BLOCK);
    CHECK_EQ(pwrite(fd, old_data, BLOCK, 0), BLOCK);
    int fds[2];
    CHECK(pipe(fds) == 0);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(4, &w);
    static char pipe_buf[16];

    struct ioe_request r;
    r = req(IOE_OP_READ, IOE_CHANNEL_READ, fds[0], pipe_buf, sizeof pipe_buf, 0, &s[0], 0); /* before */
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    r = req(IOE_OP_READ, IOE_CHANNEL_READ, fd, r0, BLOCK, BLOCK, &s[1], 0); /* before */
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    r = req(IOE_OP_WRITE, IOE_CHANNEL_WRITE, fd, new_data, BLOCK, 0, &s[2], IOE_REQ_DRAIN);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    r = req(IOE_OP_READ, IOE_CHANNEL_PRIO, fd, later, BLOCK, 0, &s[3], 0); /* after, even on PRIO */
    CHECK_EQ(ioe_submit(ctx, &r), 0);

    /* The read accepted before the drain ran; the drain write and the read
     * after it wait behind the pipe read. */
    waiter_wait(&w, 1);
    CHECK_EQ(s[1].result, BLOCK);
    struct ioe_stats st;
    CHECK_EQ(ioe_context_stats(ctx, &st), 0);
    CHECK_EQ(st.completed, 1);
    CHECK_EQ(st.in_flight, 1);
    CHECK_EQ(st.pending, 2);
    uint8_t check[BLOCK];
    CHECK_EQ(pread(fd, check, BLOCK, 0), BLOCK);
    CHECK(memcmp(check, old_data, BLOCK) == 0);

    /* The pipe read completes, then the write, then the read, which sees it. */
    CHECK_EQ(write(fds[1], "go", 2), 2);
    waiter_wait(&w, 4);
    slots_check_once(s, 4);
    CHECK_EQ(s[0].result, 2);
    CHECK_EQ(s[2].result, BLOCK);
    CHECK_EQ(s[3].result, BLOCK);
    CHECK(memcmp(later, new_data, BLOCK) == 0);

    /* Unknown flags and unknown rw_flags are refused. */
    r = req(IOE_OP_READ, IOE_CHANNEL_READ, fd, later, BLOCK, 0, &s[0], 1u << 7);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = req(IOE_OP_READ, IOE_CHANNEL_READ, fd, later, BLOCK, 0, &s[0], 0);
    r.rw_flags = 1u << 20;
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);

    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fds[0]);
    close(fds[1]);
    close(fd);
}

/* The usual durable write: the data, then an fdatasync that covers it. */
static void write_then_sync(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(0, 0);
    struct ioe_context *ctx = open_context(backend, 16, workers);
    struct waiter w;
    waiter_init(&w);
    enum { WRITES = 64 };
    struct slot *s = slots_new(WRITES + 1, &w);
    static uint8_t data[WRITES][BLOCK];
    for (int i = 0; i < WRITES; i++) {
        fill_pattern(data[i], BLOCK, (uint64_t)i);
        CHECK_EQ(ioe_write(ctx, fd, data[i], BLOCK, (uint64_t)i * BLOCK, IOE_CHANNEL_WRITE, on_complete, &s[i]), 0);
    }
    struct ioe_request sync = {.op = IOE_OP_FDATASYNC, .channel = IOE_CHANNEL_WRITE, .fd = fd,
                               .callback = on_complete, .user_data = &s[WRITES], .flags = IOE_REQ_DRAIN};
    CHECK_EQ(ioe_submit(ctx, &sync), 0);
    waiter_wait(&w, WRITES + 1);
    slots_check_once(s, WRITES + 1);
    for (int i = 0; i < WRITES; i++) CHECK_EQ(s[i].result, BLOCK);
    CHECK_EQ(s[WRITES].result, 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
}

static void queue_limit(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(BLOCK, 0);
    int fds[2];
    CHECK(pipe(fds) == 0);
    struct ioe_context_options opts;
    CHECK_EQ(ioe_context_options_init(&opts), 0);
    CHECK_EQ(opts.max_queued, 0);
    opts.backend = backend;
    opts.depth = 1;
    opts.max_queued = 2;
    opts.workers = workers;
    struct ioe_context *ctx = NULL;
    CHECK_EQ(ioe_context_create(&opts, &ctx), 0);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(5, &w);
    static char pipe_buf[8];
    static uint8_t buf[BLOCK];
    /* The pipe read takes the one slot; then two may wait, no more. */
    CHECK_EQ(ioe_read(ctx, fds[0], pipe_buf, sizeof pipe_buf, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
    /* Wait (with a hang guard) until the engine has taken it into the slot. */
    for (time_t start = time(NULL); ioe_context_running(ctx) != 1; sched_yield()) CHECK(time(NULL) - start < 60);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &s[1]), 0);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_PRIO, on_complete, &s[2]), 0);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &s[3]), -EAGAIN);
    struct ioe_merger *m = NULL;
    CHECK_EQ(ioe_merger_create(ctx, fd, IOE_OP_READ, IOE_CHANNEL_READ, 1 << 20, &m), 0);
    CHECK_EQ(ioe_merger_add(m, buf, BLOCK, 0, on_complete, &s[3]), -EAGAIN);
    CHECK_EQ(ioe_merger_destroy(m), 0);
    struct ioe_stats st;
    CHECK_EQ(ioe_context_stats(ctx, &st), 0);
    CHECK_EQ(st.queue_full, 2);
    CHECK_EQ(st.pending, 2);
    /* Once the queue moves, submissions are accepted again. */
    CHECK_EQ(write(fds[1], "x", 1), 1);
    waiter_wait(&w, 3);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &s[4]), 0);
    waiter_wait(&w, 4);
    CHECK_EQ(atomic_load(&s[3].calls), 0);
    CHECK_EQ(s[0].result, 1);
    for (int i = 1; i <= 4; i++)
        if (i != 3) CHECK_EQ(s[i].result, BLOCK);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fds[0]);
    close(fds[1]);
    close(fd);
}

static void run(uint32_t backend, struct ioe_workers *workers) {
    drain_orders(backend, workers);
    write_then_sync(backend, workers);
    queue_limit(backend, workers);
}

int main(void) {
    run_matrix(run, 2);
    printf("order: ok\n");
    return 0;
}
