/* Many threads submit to one context at once: nothing lost, nothing
 * duplicated, every read returns the bytes on disk. */
#include "test_util.h"

#define THREADS 6
#define PER_THREAD 3000
#define BLOCKS 256
#define BS 512

struct job {
    struct ioe_context *ctx;
    int fd;
    int index;
    struct slot *slots;
    uint8_t *bufs;
};

static void *submitter(void *arg) {
    struct job *j = arg;
    uint64_t x = (uint64_t)j->index * 7919 + 17;
    for (int i = 0; i < PER_THREAD; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint64_t block = x % BLOCKS;
        size_t n = (size_t)j->index * PER_THREAD + (size_t)i;
        uint8_t *buf = j->bufs + n * BS;
        struct ioe_request req = {.fd = j->fd, .buf = buf, .len = BS, .offset = block * BS,
                                  .callback = on_complete, .user_data = &j->slots[n]};
        if (i % 3 == 0) {
            /* Rewrites the block's own pattern, so reads always see it. */
            fill_pattern(buf, BS, block);
            req.op = IOE_OP_WRITE;
            req.channel = IOE_CHANNEL_WRITE;
        } else {
            req.op = IOE_OP_READ;
            req.channel = i % 3 == 1 ? IOE_CHANNEL_READ : IOE_CHANNEL_PRIO;
        }
        CHECK_EQ(ioe_submit(j->ctx, &req), 0);
    }
    return NULL;
}

static void run(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(0, 0);
    uint8_t disk[BLOCKS * BS];
    for (int b = 0; b < BLOCKS; b++) fill_pattern(disk + b * BS, BS, (uint64_t)b);
    CHECK_EQ(pwrite(fd, disk, sizeof disk, 0), sizeof disk);

    struct ioe_context *ctx = open_context(backend, 32, workers);
    struct waiter w;
    waiter_init(&w);
    size_t total = (size_t)THREADS * PER_THREAD;
    struct slot *slots = slots_new(total, &w);
    uint8_t *bufs = calloc(total, BS);
    CHECK(bufs != NULL);

    pthread_t tids[THREADS];
    struct job jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (struct job){.ctx = ctx, .fd = fd, .index = t, .slots = slots, .bufs = bufs};
        CHECK(pthread_create(&tids[t], NULL, submitter, &jobs[t]) == 0);
    }
    for (int t = 0; t < THREADS; t++) CHECK(pthread_join(tids[t], NULL) == 0);
    waiter_wait(&w, (long)total);
    slots_check_once(slots, total);
    for (size_t n = 0; n < total; n++) CHECK_EQ(slots[n].result, BS);
    /* Every buffer, read or written, must hold its block's pattern:
     * re-derive each request's block from the same generator. */
    for (int t = 0; t < THREADS; t++) {
        uint64_t x = (uint64_t)t * 7919 + 17;
        for (int i = 0; i < PER_THREAD; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            size_t n = (size_t)t * PER_THREAD + (size_t)i;
            CHECK(matches_pattern(bufs + n * BS, BS, x % BLOCKS));
        }
    }
    struct ioe_stats stats;
    ioe_context_stats(ctx, &stats);
    CHECK_EQ(stats.submitted, total);
    CHECK_EQ(stats.completed, total);
    CHECK_EQ(stats.failed, 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(slots);
    free(bufs);
    close(fd);
}

int main(void) {
    run_matrix(run, 2);
    printf("threads: ok\n");
    return 0;
}
