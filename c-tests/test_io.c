/* Reads, writes, syncs and fallocate on both backends, with inline callbacks
 * and with a worker pool: data written at random offsets reads back
 * identical, every channel and the batch call work, counters add up; on
 * pipes and sockets a read completes with what arrived, as read(2) does. */
#include "test_util.h"

#include <sys/socket.h>

#define BLOCK 4096
#define FILE_BLOCKS 512
#define IOS 200

static void random_write_read(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file((off_t)FILE_BLOCKS * BLOCK, 0);
    struct ioe_context *ctx = open_context(backend, 16, workers);
    struct waiter w;
    waiter_init(&w);

    /* Distinct random blocks. */
    uint64_t blocks[IOS];
    uint8_t used[FILE_BLOCKS] = {0};
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < IOS;) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint64_t b = x % FILE_BLOCKS;
        if (!used[b]) { used[b] = 1; blocks[i++] = b; }
    }

    uint8_t *bufs = malloc((size_t)IOS * BLOCK);
    CHECK(bufs != NULL);
    struct slot *writes = slots_new(IOS, &w);
    const uint32_t channels[3] = {IOE_CHANNEL_PRIO, IOE_CHANNEL_READ, IOE_CHANNEL_WRITE};
    /* Half with ioe_write, half through one ioe_submit_batch call. */
    for (int i = 0; i < IOS / 2; i++) {
        fill_pattern(bufs + (size_t)i * BLOCK, BLOCK, blocks[i]);
        CHECK_EQ(ioe_write(ctx, fd, bufs + (size_t)i * BLOCK, BLOCK, blocks[i] * BLOCK, channels[i % 3],
                           on_complete, &writes[i]), 0);
    }
    struct ioe_request reqs[IOS / 2];
    for (int i = IOS / 2; i < IOS; i++) {
        fill_pattern(bufs + (size_t)i * BLOCK, BLOCK, blocks[i]);
        reqs[i - IOS / 2] = (struct ioe_request){
            .op = IOE_OP_WRITE, .channel = channels[i % 3], .fd = fd,
            .buf = bufs + (size_t)i * BLOCK, .len = BLOCK, .offset = blocks[i] * BLOCK,
            .callback = on_complete, .user_data = &writes[i]};
    }
    CHECK_EQ(ioe_submit_batch(ctx, reqs, IOS / 2), IOS / 2);
    waiter_wait(&w, IOS);
    slots_check_once(writes, IOS);
    for (int i = 0; i < IOS; i++) CHECK_EQ(writes[i].result, BLOCK);

    /* Read back into cleared buffers, on every channel, and compare; from
     * the device, not the page cache (on AIO such reads run on helpers). */
    CHECK(fdatasync(fd) == 0);
    CHECK(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
    memset(bufs, 0, (size_t)IOS * BLOCK);
    struct slot *reads = slots_new(IOS, &w);
    for (int i = 0; i < IOS; i++) {
        CHECK_EQ(ioe_read(ctx, fd, bufs + (size_t)i * BLOCK, BLOCK, blocks[i] * BLOCK, channels[i % 3],
                          on_complete, &reads[i]), 0);
    }
    waiter_wait(&w, 2 * IOS);
    slots_check_once(reads, IOS);
    for (int i = 0; i < IOS; i++) {
        CHECK_EQ(reads[i].result, BLOCK);
        CHECK(matches_pattern(bufs + (size_t)i * BLOCK, BLOCK, blocks[i]));
    }

    /* Independent check with pread(2). */
    uint8_t check[BLOCK];
    for (int i = 0; i < IOS; i++) {
        CHECK_EQ(pread(fd, check, BLOCK, (off_t)(blocks[i] * BLOCK)), BLOCK);
        CHECK(matches_pattern(check, BLOCK, blocks[i]));
    }

    struct ioe_stats stats;
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(stats.submitted, 2 * IOS);
    CHECK_EQ(stats.completed, 2 * IOS);
    CHECK_EQ(stats.failed, 0);
    CHECK_EQ(stats.pending, 0);
    CHECK_EQ(stats.in_flight, 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(writes);
    free(reads);
    free(bufs);
    close(fd);
}

static void sync_ops_and_eof(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(0, 0);
    struct ioe_context *ctx = open_context(backend, 4, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(8, &w);

    CHECK_EQ(ioe_fallocate(ctx, fd, 0, 0, 1 << 20, IOE_CHANNEL_WRITE, on_complete, &s[0]), 0);
    waiter_wait(&w, 1);
    CHECK_EQ(s[0].result, 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    CHECK_EQ(st.st_size, 1 << 20);

    static uint8_t data[10000];
    fill_pattern(data, sizeof data, 7);
    CHECK(ftruncate(fd, sizeof data) == 0);
    CHECK_EQ(ioe_write(ctx, fd, data, sizeof data, 0, IOE_CHANNEL_WRITE, on_complete, &s[1]), 0);
    waiter_wait(&w, 2);
    CHECK_EQ(s[1].result, sizeof data);

    CHECK_EQ(ioe_fsync(ctx, fd, IOE_CHANNEL_PRIO, on_complete, &s[2]), 0);
    CHECK_EQ(ioe_fdatasync(ctx, fd, IOE_CHANNEL_WRITE, on_complete, &s[3]), 0);
    waiter_wait(&w, 4);
    CHECK_EQ(s[2].result, 0);
    CHECK_EQ(s[3].result, 0);

    /* A read across end of file returns the bytes that exist; past it, 0. */
    static uint8_t back[8192];
    CHECK_EQ(ioe_read(ctx, fd, back, sizeof back, 8192, IOE_CHANNEL_READ, on_complete, &s[4]), 0);
    CHECK_EQ(ioe_read(ctx, fd, back, 100, 50000, IOE_CHANNEL_READ, on_complete, &s[5]), 0);
    waiter_wait(&w, 6);
    CHECK_EQ(s[4].result, sizeof data - 8192);
    CHECK(memcmp(back, data + 8192, sizeof data - 8192) == 0);
    CHECK_EQ(s[5].result, 0);

    /* The generic request form of fsync. */
    struct ioe_request req = {.op = IOE_OP_FSYNC, .channel = IOE_CHANNEL_PRIO, .fd = fd,
                              .callback = on_complete, .user_data = &s[6]};
    CHECK_EQ(ioe_submit(ctx, &req), 0);
    waiter_wait(&w, 7);
    CHECK_EQ(s[6].result, 0);
    slots_check_once(s, 7);

    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
}

/* 10 bytes wait in a pipe (or socket); a read of 64 completes with those
 * 10, while the writer stays open: it does not wait for 54 more. */
static void short_reads_of_streams(uint32_t backend, struct ioe_workers *workers) {
    struct ioe_context *ctx = open_context(backend, 4, workers);
    for (int kind = 0; kind < 2; kind++) {
        int fds[2];
        if (kind == 0)
            CHECK(pipe(fds) == 0);
        else
            CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
        struct waiter w;
        waiter_init(&w);
        struct slot *s = slots_new(1, &w);
        static char buf[64];
        memset(buf, 0, sizeof buf);
        CHECK_EQ(write(fds[1], "ten bytes!", 10), 10);
        CHECK_EQ(ioe_read(ctx, fds[0], buf, sizeof buf, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
        waiter_wait(&w, 1);
        CHECK_EQ(s[0].result, 10);
        CHECK(memcmp(buf, "ten bytes!", 10) == 0);
        slots_check_once(s, 1);
        close(fds[1]);
        close(fds[0]);
        free(s);
    }
    CHECK_EQ(ioe_context_destroy(ctx), 0);
}

struct pipe_from_callback {
    struct ioe_context *ctx;
    int pipe_fd;
    char *buf;
    struct slot *pipe_read;
    struct waiter *returned;
};

/* A callback that submits a read of an empty pipe, then reports that the
 * submission returned: it must not wait for the pipe. */
static void submit_pipe_read(void *arg, int64_t result) {
    struct pipe_from_callback *p = arg;
    CHECK(result >= 0);
    CHECK_EQ(ioe_read(p->ctx, p->pipe_fd, p->buf, 64, 0, IOE_CHANNEL_READ, on_complete, p->pipe_read), 0);
    waiter_signal(p->returned);
}

/* A read of an empty pipe (it waits until someone writes) holds up nothing:
 * submitted from outside, from an inline callback (the poller) or from a
 * pool callback, the submission returns at once and file I/O on the same
 * context keeps completing. On AIO, io_submit would run such a read (and
 * a buffered read of uncached data) right inside the call. */
static void blocking_reads_block_nobody(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(BLOCK, 0);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    for (int from_callback = 0; from_callback < 2; from_callback++) {
        int fds[2];
        CHECK(pipe(fds) == 0);
        struct waiter w, returned;
        waiter_init(&w);
        waiter_init(&returned);
        struct slot *s = slots_new(3, &w);
        static char pipe_buf[64];
        static uint8_t file_buf[BLOCK];
        struct pipe_from_callback p = {.ctx = ctx, .pipe_fd = fds[0], .buf = pipe_buf, .pipe_read = &s[0],
                                       .returned = &returned};
        if (from_callback) {
            CHECK_EQ(ioe_read(ctx, fd, file_buf, BLOCK, 0, IOE_CHANNEL_READ, submit_pipe_read, &p), 0);
            waiter_wait(&returned, 1);
        } else {
            CHECK_EQ(ioe_read(ctx, fds[0], pipe_buf, 64, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
        }
        /* Other I/O completes while the pipe read waits, on every channel. */
        CHECK_EQ(ioe_read(ctx, fd, file_buf, BLOCK, 0, IOE_CHANNEL_PRIO, on_complete, &s[1]), 0);
        CHECK_EQ(ioe_write(ctx, fd, file_buf, BLOCK, 0, IOE_CHANNEL_WRITE, on_complete, &s[2]), 0);
        waiter_wait(&w, 2);
        CHECK_EQ(s[1].result, BLOCK);
        CHECK_EQ(s[2].result, BLOCK);
        CHECK_EQ(atomic_load(&s[0].calls), 0);
        /* Now the pipe read gets its data. */
        CHECK_EQ(write(fds[1], "hello", 5), 5);
        waiter_wait(&w, 3);
        CHECK_EQ(s[0].result, 5);
        CHECK(memcmp(pipe_buf, "hello", 5) == 0);
        slots_check_once(s, 3);
        free(s);
        close(fds[0]);
        close(fds[1]);
    }
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    close(fd);
}

static void run(uint32_t backend, struct ioe_workers *workers) {
    random_write_read(backend, workers);
    sync_ops_and_eof(backend, workers);
    short_reads_of_streams(backend, workers);
    blocking_reads_block_nobody(backend, workers);
}

int main(void) {
    run_matrix(run, 2);
    printf("io: ok\n");
    return 0;
}
