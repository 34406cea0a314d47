/* Contexts and worker pools: options, creation on every backend, queries,
 * bad arguments, and that destroying releases every descriptor. */
#include "test_util.h"

static void bad_options(void) {
    struct ioe_context_options opts;
    struct ioe_context *ctx = (struct ioe_context *)1;

    CHECK_EQ(ioe_context_options_init(NULL), -EINVAL);
    CHECK_EQ(ioe_context_create(NULL, NULL), -EINVAL);

    ioe_context_options_init(&opts);
    CHECK_EQ(opts.depth, IOE_DEFAULT_DEPTH);
    CHECK_EQ(opts.backend, IOE_BACKEND_AUTO);
    CHECK(opts.workers == NULL);

    opts.depth = 0;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);
    CHECK(ctx == NULL);
    opts.depth = IOE_MAX_DEPTH + 1;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);
    opts.depth = UINT32_MAX;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);

    ioe_context_options_init(&opts);
    opts.backend = 3;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);
    opts.backend = UINT32_MAX;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);

    ioe_context_options_init(&opts);
    opts.flags = 1u << 20;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);

    ioe_context_options_init(&opts);
    opts.reserved[2] = 1;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);

    ioe_context_options_init(&opts);
    opts.flags = IOE_SETUP_CQSIZE;
    opts.cq_size = opts.depth - 1;
    CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);
    CHECK(ctx == NULL);
}

static void null_handles(void) {
    struct ioe_stats stats;
    CHECK_EQ(ioe_context_destroy(NULL), -EINVAL);
    CHECK_EQ(ioe_context_backend(NULL), -EINVAL);
    CHECK_EQ(ioe_context_depth(NULL), -EINVAL);
    CHECK_EQ(ioe_context_pending(NULL), -EINVAL);
    CHECK_EQ(ioe_context_running(NULL), -EINVAL);
    CHECK_EQ(ioe_context_stats(NULL, &stats), -EINVAL);
    CHECK_EQ(ioe_workers_destroy(NULL), -EINVAL);

    struct ioe_workers *w = (struct ioe_workers *)1;
    CHECK_EQ(ioe_workers_create(0, &w), -EINVAL);
    CHECK(w == NULL);
    CHECK_EQ(ioe_workers_create(1u << 30, &w), -EINVAL);
    CHECK_EQ(ioe_workers_create(2, NULL), -EINVAL);
}

static void queries(uint32_t backend, struct ioe_workers *workers) {
    struct ioe_context *ctx = open_context(backend, 48, workers);
    struct ioe_stats stats;
    CHECK_EQ(ioe_context_depth(ctx), 48);
    CHECK_EQ(ioe_context_pending(ctx), 0);
    CHECK_EQ(ioe_context_running(ctx), 0);
    CHECK_EQ(ioe_context_stats(ctx, NULL), -EINVAL);
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(stats.submitted, 0);
    CHECK_EQ(stats.completed, 0);
    CHECK_EQ(stats.in_flight, 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
}

int main(void) {
    bad_options();
    null_handles();

    int fds_before = count_open_fds();
    struct ioe_workers *workers = NULL;
    CHECK_EQ(ioe_workers_create(2, &workers), 0);
    for (int b = 0; b < 2; b++) {
        queries(BACKENDS[b], NULL);
        queries(BACKENDS[b], workers);
    }

    /* AUTO picks io_uring on this kernel; default options work. */
    struct ioe_context *ctx = NULL;
    CHECK_EQ(ioe_context_create(NULL, &ctx), 0);
    CHECK_EQ(ioe_context_backend(ctx), IOE_BACKEND_URING);
    CHECK_EQ(ioe_context_depth(ctx), IOE_DEFAULT_DEPTH);
    CHECK_EQ(ioe_context_destroy(ctx), 0);

    /* io_uring setup flags. */
    struct ioe_context_options opts;
    ioe_context_options_init(&opts);
    opts.backend = IOE_BACKEND_URING;
    opts.flags = IOE_SETUP_SQPOLL | IOE_SETUP_CQSIZE;
    opts.sqpoll_idle_ms = 20;
    opts.cq_size = 1024;
    CHECK_EQ(ioe_context_create(&opts, &ctx), 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);

    /* A pool outlives the caller's handle while contexts use it. */
    ctx = open_context(IOE_BACKEND_AIO, 4, workers);
    CHECK_EQ(ioe_workers_destroy(workers), 0);
    CHECK_EQ(ioe_context_depth(ctx), 4);
    CHECK_EQ(ioe_context_destroy(ctx), 0);

    /* Every ring, AIO context and helper descriptor is released. */
    CHECK_EQ(count_open_fds(), fds_before);
    printf("context: ok\n");
    return 0;
}
