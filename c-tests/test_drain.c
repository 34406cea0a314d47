/* Destroy drains: with hundreds of requests queued and in flight, every
 * callback runs exactly once before ioe_context_destroy returns. From a
 * callback of the context, destroy refuses with -EDEADLK and submitting
 * still works; a callback of another context may destroy it, unless it
 * runs on the pool the context's own callbacks need. */
#include "test_util.h"

#define BLOCK 4096
#define N 800

struct chained {
    struct ioe_context *ctx;
    int fd;
    uint8_t *buf;
    struct slot *next;
    atomic_int destroy_rc;
    atomic_int submit_rc;
    struct waiter *w;
};

static void chain_cb(void *user_data, int64_t result) {
    struct chained *c = user_data;
    CHECK_EQ(result, BLOCK);
    atomic_store(&c->destroy_rc, ioe_context_destroy(c->ctx));
    atomic_store(&c->submit_rc, ioe_read(c->ctx, c->fd, c->buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, c->next));
    waiter_signal(c->w);
}

static void run(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file((off_t)N * BLOCK, 0);
    struct ioe_context *ctx = open_context(backend, 16, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(N + 1, &w);
    uint8_t *buf = calloc(N, BLOCK);
    CHECK(buf != NULL);
    for (int i = 0; i < N; i++) {
        if (i % 2)
            CHECK_EQ(ioe_read(ctx, fd, buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i * BLOCK, IOE_CHANNEL_READ,
                              on_complete, &s[i]), 0);
        else
            CHECK_EQ(ioe_write(ctx, fd, buf + (size_t)i * BLOCK, BLOCK, (uint64_t)i * BLOCK,
                               i % 4 ? IOE_CHANNEL_WRITE : IOE_CHANNEL_PRIO, on_complete, &s[i]), 0);
    }
    /* Most are still queued here (depth 16). */
    CHECK(ioe_context_pending(ctx) + ioe_context_running(ctx) > 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(waiter_done(&w), N); /* all done before destroy returned */
    slots_check_once(s, N);
    for (int i = 0; i < N; i++) CHECK_EQ(s[i].result, BLOCK);

    /* Callbacks may submit but not destroy. */
    ctx = open_context(backend, 4, workers);
    struct waiter w2;
    waiter_init(&w2);
    struct slot *next = slots_new(1, &w2);
    struct chained c = {.ctx = ctx, .fd = fd, .buf = buf, .next = next, .w = &w2};
    atomic_init(&c.destroy_rc, 1);
    atomic_init(&c.submit_rc, 1);
    CHECK_EQ(ioe_write(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_WRITE, chain_cb, &c), 0);
    waiter_wait(&w2, 2); /* the chained callback and the read it submitted */
    CHECK_EQ(atomic_load(&c.destroy_rc), -EDEADLK);
    CHECK_EQ(atomic_load(&c.submit_rc), 0);
    CHECK_EQ(next->result, BLOCK);
    CHECK_EQ(ioe_context_destroy(ctx), 0);

    free(next);
    free(s);
    free(buf);
    close(fd);
}

struct destroy_other {
    struct ioe_context *victim;
    atomic_int rc;
    struct waiter *w;
};

static void destroy_other_cb(void *user_data, int64_t result) {
    struct destroy_other *d = user_data;
    CHECK(result >= 0);
    atomic_store(&d->rc, ioe_context_destroy(d->victim));
    waiter_signal(d->w);
}

/* A callback of `caller` destroys `victim`; returns what destroy said. */
static int destroy_from_callback_of(struct ioe_context *caller, struct ioe_context *victim, int fd) {
    struct waiter w;
    waiter_init(&w);
    struct destroy_other d = {.victim = victim, .w = &w};
    atomic_init(&d.rc, 1);
    static uint8_t buf[512];
    CHECK_EQ(ioe_read(caller, fd, buf, sizeof buf, 0, IOE_CHANNEL_READ, destroy_other_cb, &d), 0);
    waiter_wait(&w, 1);
    return atomic_load(&d.rc);
}

static void destroy_another_context(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(BLOCK, 0);
    /* Different threads: allowed, and the victim is gone afterwards. */
    struct ioe_context *caller = open_context(backend, 4, workers);
    struct ioe_context *victim = open_context(backend, 4, NULL);
    CHECK_EQ(destroy_from_callback_of(caller, victim, fd), 0);
    /* Sharing a pool: the victim's callbacks could need the calling thread. */
    if (workers != NULL) {
        victim = open_context(backend, 4, workers);
        CHECK_EQ(destroy_from_callback_of(caller, victim, fd), -EDEADLK);
        CHECK_EQ(ioe_context_destroy(victim), 0);
    }
    CHECK_EQ(ioe_context_destroy(caller), 0);
    close(fd);
}

int main(void) {
    run_matrix(run, 3);
    run_matrix(destroy_another_context, 1);
    printf("drain: ok\n");
    return 0;
}
