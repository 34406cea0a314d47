/* Helpers shared by the C tests: checks, completion tracking, temp files. */
#ifndef IOE_TEST_UTIL_H
#define IOE_TEST_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <ioengine.h>

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

#define CHECK_EQ(actual, expected)                                                          \
    do {                                                                                    \
        long long a_ = (long long)(actual), e_ = (long long)(expected);                     \
        if (a_ != e_) {                                                                     \
            fprintf(stderr, "%s:%d: %s is %lld, expected %s = %lld\n", __FILE__, __LINE__, \
                    #actual, a_, #expected, e_);                                            \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

static const uint32_t BACKENDS[2] = {IOE_BACKEND_URING, IOE_BACKEND_AIO};

/* Exit code ctest reports as "skipped" (SKIP_RETURN_CODE in CMakeLists). */
#define SKIP_EXIT 77

/* Whether `backend` can run here. A backend the machine does not offer
 * (io_uring disabled by sysctl or seccomp, AIO's fs.aio-max-nr used up)
 * is reported once as skipped; any other failure fails the test. */
static inline int backend_available(uint32_t backend) {
    static int known[3] = {-1, -1, -1};
    if (backend > 2) return 0;
    if (known[backend] >= 0) return known[backend];
    struct ioe_context_options opts;
    CHECK_EQ(ioe_context_options_init(&opts), 0);
    opts.backend = backend;
    opts.depth = 1;
    struct ioe_context *ctx = NULL;
    int rc = ioe_context_create(&opts, &ctx);
    if (rc == 0) {
        CHECK_EQ(ioe_context_destroy(ctx), 0);
        known[backend] = 1;
    } else if (rc == -ENOSYS || rc == -EPERM || rc == -EACCES || rc == -EOPNOTSUPP ||
               (backend == IOE_BACKEND_AIO && rc == -EAGAIN)) {
        printf("SKIP %s: not available here (%s)\n", ioe_backend_name(backend), ioe_strerror(rc));
        known[backend] = 0;
    } else {
        fprintf(stderr, "ioe_context_create(%s): %s\n", ioe_backend_name(backend), ioe_strerror(rc));
        exit(1);
    }
    return known[backend];
}

/* For a test of one backend: true (and a message) if it cannot run here. */
static inline int skip_unless_backend(uint32_t backend) {
    return !backend_available(backend);
}

/* Counts completions; waits with a generous hang guard (never a timing check). */
struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    long done;
};

static inline void waiter_init(struct waiter *w) {
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->done = 0;
}

static inline void waiter_signal(struct waiter *w) {
    pthread_mutex_lock(&w->mu);
    w->done++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static inline void waiter_wait(struct waiter *w, long n) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 120;
    pthread_mutex_lock(&w->mu);
    while (w->done < n) {
        if (pthread_cond_timedwait(&w->cv, &w->mu, &deadline) == ETIMEDOUT) {
            fprintf(stderr, "hang: %ld of %ld completions after 120 s\n", w->done, n);
            exit(1);
        }
    }
    pthread_mutex_unlock(&w->mu);
}

static inline long waiter_done(struct waiter *w) {
    pthread_mutex_lock(&w->mu);
    long n = w->done;
    pthread_mutex_unlock(&w->mu);
    return n;
}

/* One request's completion: its result and how many times it called back. */
struct slot {
    struct waiter *w;
    int64_t result;
    atomic_int calls;
};

static inline void on_complete(void *user_data, int64_t result) {
    struct slot *s = user_data;
    s->result = result;
    atomic_fetch_add(&s->calls, 1);
    waiter_signal(s->w);
}

static inline struct slot *slots_new(size_t n, struct waiter *w) {
    struct slot *s = calloc(n, sizeof *s);
    CHECK(s != NULL);
    for (size_t i = 0; i < n; i++) {
        s[i].w = w;
        s[i].result = INT64_MIN;
        atomic_init(&s[i].calls, 0);
    }
    return s;
}

/* Every slot called back exactly once. */
static inline void slots_check_once(struct slot *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (atomic_load(&s[i].calls) != 1) {
            fprintf(stderr, "request %zu called back %d times\n", i, atomic_load(&s[i].calls));
            exit(1);
        }
    }
}

/* A temporary file of `size` bytes, already unlinked; `extra_flags` e.g. O_DIRECT. */
static inline int temp_file(off_t size, int extra_flags) {
    const char *dir = getenv("TMPDIR");
    char path[512];
    snprintf(path, sizeof path, "%s/ioe-ctest-XXXXXX", dir ? dir : "/tmp");
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    int fd2 = open(path, O_RDWR | extra_flags);
    CHECK(fd2 >= 0);
    CHECK(unlink(path) == 0);
    close(fd);
    CHECK(ftruncate(fd2, size) == 0);
    return fd2;
}

/* Deterministic bytes for block `block`. */
static inline void fill_pattern(uint8_t *buf, size_t len, uint64_t block) {
    uint64_t x = block * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
}

static inline int matches_pattern(const uint8_t *buf, size_t len, uint64_t block) {
    uint8_t *expected = malloc(len);
    CHECK(expected != NULL);
    fill_pattern(expected, len, block);
    int same = memcmp(buf, expected, len) == 0;
    free(expected);
    return same;
}

static inline struct ioe_context *open_context(uint32_t backend, uint32_t depth, struct ioe_workers *workers) {
    struct ioe_context_options opts;
    CHECK_EQ(ioe_context_options_init(&opts), 0);
    opts.backend = backend;
    opts.depth = depth;
    opts.workers = workers;
    struct ioe_context *ctx = NULL;
    int rc = ioe_context_create(&opts, &ctx);
    if (rc != 0) {
        fprintf(stderr, "ioe_context_create(%s): %s\n", ioe_backend_name(backend), ioe_strerror(rc));
        exit(1);
    }
    CHECK_EQ(ioe_context_backend(ctx), backend);
    return ctx;
}

/* An io_uring context with IOE_SETUP_IOPOLL and inline callbacks. */
static inline struct ioe_context *open_iopoll_context(uint32_t depth) {
    struct ioe_context_options opts;
    CHECK_EQ(ioe_context_options_init(&opts), 0);
    opts.backend = IOE_BACKEND_URING;
    opts.flags = IOE_SETUP_IOPOLL;
    opts.depth = depth;
    struct ioe_context *ctx = NULL;
    CHECK_EQ(ioe_context_create(&opts, &ctx), 0);
    return ctx;
}

/* Runs `run` on each backend available here; returns SKIP_EXIT if none is,
 * else 0. */
static inline int run_backends(void (*run)(uint32_t backend)) {
    int ran = 0;
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        run(BACKENDS[b]);
        ran++;
    }
    return ran == 0 ? SKIP_EXIT : 0;
}

/* Runs `run` on each backend available here, with inline callbacks and
 * with a pool of `pool_threads` callback threads. Exits with SKIP_EXIT if
 * no backend is available. */
static inline void run_matrix(void (*run)(uint32_t backend, struct ioe_workers *workers), uint32_t pool_threads) {
    struct ioe_workers *pool = NULL;
    CHECK_EQ(ioe_workers_create(pool_threads, &pool), 0);
    int ran = 0;
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        run(BACKENDS[b], NULL);
        run(BACKENDS[b], pool);
        ran++;
    }
    CHECK_EQ(ioe_workers_destroy(pool), 0);
    if (ran == 0) exit(SKIP_EXIT);
}

/* Open file descriptors of this process, to check nothing leaks. */
static inline int count_open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    int n = 0;
    while (readdir(d) != NULL) n++;
    closedir(d);
    return n;
}

/* Hang guard: a test still running `seconds` from now prints
 * "NAME: hung" and fails, rather than hanging ctest. A guard, never a
 * timing check; call it again to re-arm, alarm(0) to disarm. */
static const char *hang_guard_name = "test";

static inline void hang_guard_fired(int sig) {
    (void)sig;
    /* Only async-signal-safe calls here. */
    (void)!write(2, hang_guard_name, strlen(hang_guard_name));
    static const char msg[] = ": hung\n";
    (void)!write(2, msg, sizeof msg - 1);
    _exit(1);
}

static inline void hang_guard(const char *name, unsigned seconds) {
    hang_guard_name = name;
    signal(SIGALRM, hang_guard_fired);
    alarm(seconds);
}

#endif
