/* Contexts and worker pools: options, creation on every backend, queries,
 * bad arguments, automatic backend choice (and why it fell back, under a
 * seccomp profile that forbids io_uring as Docker's default does), and that
 * destroying releases every descriptor. */
#include "test_util.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

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

    /* Beyond the kernel's largest CQ: invalid whatever the backend (auto
     * must not hide it by falling back to AIO). */
    const uint32_t all[3] = {IOE_BACKEND_AUTO, IOE_BACKEND_URING, IOE_BACKEND_AIO};
    for (int b = 0; b < 3; b++) {
        ioe_context_options_init(&opts);
        opts.backend = all[b];
        opts.flags = IOE_SETUP_CQSIZE;
        opts.cq_size = 65536 * 2;
        CHECK_EQ(ioe_context_create(&opts, &ctx), -EINVAL);
        CHECK(ctx == NULL);
    }
}

/* Creates a context with `backend`; returns its error or 0 (destroyed). */
static int try_create(uint32_t backend) {
    struct ioe_context_options opts;
    ioe_context_options_init(&opts);
    opts.backend = backend;
    struct ioe_context *ctx = NULL;
    int rc = ioe_context_create(&opts, &ctx);
    if (rc == 0) CHECK_EQ(ioe_context_destroy(ctx), 0);
    return rc;
}

/* AUTO runs io_uring where it can, else AIO, and says why. */
static void auto_choice(void) {
    int uring_error = try_create(IOE_BACKEND_URING);
    struct ioe_context *ctx = NULL;
    CHECK_EQ(ioe_context_create(NULL, &ctx), 0);
    CHECK_EQ(ioe_context_depth(ctx), IOE_DEFAULT_DEPTH);
    if (uring_error == 0) {
        CHECK_EQ(ioe_context_backend(ctx), IOE_BACKEND_URING);
        CHECK_EQ(ioe_context_fallback_reason(ctx), 0);
    } else {
        CHECK_EQ(ioe_context_backend(ctx), IOE_BACKEND_AIO);
        CHECK_EQ(ioe_context_fallback_reason(ctx), uring_error);
        printf("auto runs aio here: %s\n", ioe_strerror(uring_error));
    }
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    CHECK_EQ(ioe_context_fallback_reason(NULL), -EINVAL);
}

/* Denies io_uring_setup with `errno_value` from now on, in this process. */
static void forbid_io_uring(int errno_value) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (errno_value & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
    CHECK(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0);
}

/* Where io_uring is forbidden (as in a container under Docker's default
 * seccomp profile): an explicit request fails with that error, AUTO runs
 * AIO, reports the reason, and does I/O. In a child process, so the
 * filter does not outlive the check. */
static void auto_under_seccomp(void) {
    if (!backend_available(IOE_BACKEND_AIO)) return;
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        forbid_io_uring(EPERM);
        CHECK_EQ(try_create(IOE_BACKEND_URING), -EPERM);
        struct ioe_context *ctx = NULL;
        CHECK_EQ(ioe_context_create(NULL, &ctx), 0);
        CHECK_EQ(ioe_context_backend(ctx), IOE_BACKEND_AIO);
        CHECK_EQ(ioe_context_fallback_reason(ctx), -EPERM);
        int fd = temp_file(4096, 0);
        CHECK_EQ(pwrite(fd, "seccomp", 7, 0), 7);
        struct waiter w;
        waiter_init(&w);
        struct slot *s = slots_new(1, &w);
        static char buf[4096];
        CHECK_EQ(ioe_read(ctx, fd, buf, sizeof buf, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
        waiter_wait(&w, 1);
        CHECK_EQ(s[0].result, 4096);
        CHECK(memcmp(buf, "seccomp", 7) == 0);
        CHECK_EQ(ioe_context_destroy(ctx), 0);
        free(s);
        close(fd);
        exit(0);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
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
    /* Forks: before any pool exists, so the child owns all it allocates. */
    auto_under_seccomp();

    int fds_before = count_open_fds();
    struct ioe_workers *workers = NULL;
    CHECK_EQ(ioe_workers_create(2, &workers), 0);
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        queries(BACKENDS[b], NULL);
        queries(BACKENDS[b], workers);
    }
    auto_choice();

    /* io_uring setup flags. */
    struct ioe_context *ctx = NULL;
    struct ioe_context_options opts;
    if (backend_available(IOE_BACKEND_URING)) {
        ioe_context_options_init(&opts);
        opts.backend = IOE_BACKEND_URING;
        opts.flags = IOE_SETUP_SQPOLL | IOE_SETUP_CQSIZE;
        opts.sqpoll_idle_ms = 20;
        opts.cq_size = 1024;
        CHECK_EQ(ioe_context_create(&opts, &ctx), 0);
        CHECK_EQ(ioe_context_destroy(ctx), 0);
    }

    /* A pool outlives the caller's handle while contexts use it. */
    ioe_context_options_init(&opts);
    opts.workers = workers;
    opts.depth = 4;
    CHECK_EQ(ioe_context_create(&opts, &ctx), 0);
    CHECK_EQ(ioe_workers_destroy(workers), 0);
    CHECK_EQ(ioe_context_depth(ctx), 4);
    CHECK_EQ(ioe_context_destroy(ctx), 0);

    /* Every ring, AIO context and helper descriptor is released. */
    CHECK_EQ(count_open_fds(), fds_before);
    printf("context: ok\n");
    return 0;
}
