/* An idle context uses no CPU: after its I/O completes, every engine
 * thread (submitter, poller, helpers, callback pool) sleeps in the kernel,
 * on both backends, with inline and pool callbacks, and on an IOPOLL ring,
 * whose io_uring_enter returns at once when nothing is in flight. */
#include "test_util.h"

#include <stdbool.h>

#define BLOCK 4096
#define MAX_THREADS 64

struct engine_thread {
    int tid;
    char name[32];
};

/* The engine's threads in this process (named "ioe-..."). */
static int engine_threads(struct engine_thread *out, int max) {
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < max) {
        if (e->d_name[0] == '.') continue;
        char path[300], name[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL) continue;
        if (fgets(name, sizeof name, f) != NULL && strncmp(name, "ioe-", 4) == 0) {
            name[strcspn(name, "\n")] = 0;
            out[n].tid = atoi(e->d_name);
            snprintf(out[n].name, sizeof out[n].name, "%s", name);
            n++;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}

/* A thread's scheduler state letter and CPU time in clock ticks. */
static void thread_state(int tid, char *state, long long *ticks) {
    char path[128], buf[1024];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    CHECK(fgets(buf, sizeof buf, f) != NULL);
    fclose(f);
    /* After "pid (comm) ": state is field 3, utime and stime fields 14-15. */
    char *p = strrchr(buf, ')');
    CHECK(p != NULL);
    unsigned long long utime = 0, stime = 0;
    CHECK(sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", state, &utime, &stime) == 3);
    *ticks = (long long)(utime + stime);
}

/* Every engine thread sleeps ('S' or 'D'), and over a window of 300 ms
 * uses at most one clock tick of CPU. A poller that spins is always
 * running: it never reaches 'S', and the hang guard fails the test. */
static int check_engine_idle(const char *what, struct engine_thread *t) {
    int n = engine_threads(t, MAX_THREADS);
    CHECK(n >= 2);
    long long before[MAX_THREADS];
    for (int i = 0; i < n; i++) {
        char state = '?';
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (;;) {
            thread_state(t[i].tid, &state, &before[i]);
            if (state == 'S' || state == 'D') break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec > 20) {
                fprintf(stderr, "%s: thread %s never sleeps (state %c): it spins while idle\n", what, t[i].name,
                        state);
                exit(1);
            }
            sched_yield();
        }
    }
    /* A measuring window, not synchronisation: nothing is in flight. */
    struct timespec window = {0, 300 * 1000 * 1000};
    nanosleep(&window, NULL);
    for (int i = 0; i < n; i++) {
        char state;
        long long after;
        thread_state(t[i].tid, &state, &after);
        if (after - before[i] > 1) {
            fprintf(stderr, "%s: idle thread %s used %lld ticks of CPU in 300 ms\n", what, t[i].name,
                    after - before[i]);
            exit(1);
        }
    }
    printf("%s: %d engine threads asleep\n", what, n);
    return n;
}

static void one_io_then_idle(struct ioe_context *ctx, int fd, const char *what) {
    /* Once ioe_context_create has returned, every thread it started runs
     * under its name: none shows up later. */
    struct engine_thread at_create[MAX_THREADS];
    int started = engine_threads(at_create, MAX_THREADS);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(1, &w);
    void *buf = NULL;
    CHECK_EQ(ioe_buffer_alloc(BLOCK, 0, &buf), 0);
    CHECK_EQ(ioe_read(ctx, fd, buf, BLOCK, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
    waiter_wait(&w, 1);
    struct engine_thread later[MAX_THREADS];
    int n = check_engine_idle(what, later);
    for (int i = 0; i < n; i++) {
        bool seen = false;
        for (int j = 0; j < started; j++) seen = seen || at_create[j].tid == later[i].tid;
        if (!seen) {
            fprintf(stderr, "%s: engine thread %s (%d) was not running under its name when create returned\n", what,
                    later[i].name, later[i].tid);
            exit(1);
        }
    }
    CHECK_EQ(n, started);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    slots_check_once(s, 1);
    ioe_buffer_free(buf);
    free(s);
}

/* Waits until the engine threads are only those in `keep`. A destroy (of
 * a context or pool) joins its threads, and pthread_join returns a moment
 * before a thread leaves /proc/self/task: the next case must not count it.
 * A thread that never goes ends the test by the ctest timeout. */
static void wait_until_only(const struct engine_thread *keep, int nkeep) {
    for (;;) {
        struct engine_thread now[MAX_THREADS];
        int n = engine_threads(now, MAX_THREADS), extra = 0;
        for (int i = 0; i < n; i++) {
            bool kept = false;
            for (int j = 0; j < nkeep; j++) kept = kept || keep[j].tid == now[i].tid;
            extra += !kept;
        }
        if (extra == 0) return;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
}

static void idle(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(BLOCK, 0);
    char what[64];
    snprintf(what, sizeof what, "%s, %s callbacks", ioe_backend_name(backend), workers ? "pool" : "inline");
    struct engine_thread before[MAX_THREADS];
    int nbefore = engine_threads(before, MAX_THREADS);
    one_io_then_idle(open_context(backend, 16, workers), fd, what);
    wait_until_only(before, nbefore);
    close(fd);
}

static void idle_iopoll(void) {
    wait_until_only(NULL, 0); /* the pool's threads, joined by run_matrix */
    struct ioe_context *ctx = open_iopoll_context(8);
    int fd = temp_file(BLOCK, O_DIRECT);
    one_io_then_idle(ctx, fd, "io_uring IOPOLL");
    close(fd);
}

int main(void) {
    run_matrix(idle, 1);
    if (backend_available(IOE_BACKEND_URING)) idle_iopoll();
    printf("idle: ok\n");
    return 0;
}
