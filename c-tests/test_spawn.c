/* When threads cannot be created (RLIMIT_NPROC, a pids cgroup), creating a
 * context or a callback pool fails with -EAGAIN, promptly, and leaks no
 * thread, descriptor or memory; once threads can be created again the
 * library works as before. Runs in a child process as an unprivileged user
 * of its own (root ignores RLIMIT_NPROC), so it needs root to start;
 * skipped otherwise. */
#include "test_util.h"

#include <grp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

static int task_count(void) {
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* Waits until this process is down to its main thread again. pthread_join
 * (and so ioe_context_destroy) returns once the kernel has cleared the
 * joined thread's tid, which it does a moment before the thread leaves
 * /proc/self/task and stops counting against RLIMIT_NPROC; under load that
 * moment is long enough to see. A thread that really leaked never goes,
 * and the child's alarm ends the test. */
static void expect_only_main_thread(void) {
    for (int polls = 0; task_count() != 1; polls++) {
        if (polls == 1000) fprintf(stderr, "still waiting for %d threads to exit\n", task_count() - 1);
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
}

/* Lets this user (whose only task is this process) have `extra` threads. */
static void allow_threads(int extra) {
    struct rlimit lim;
    CHECK(getrlimit(RLIMIT_NPROC, &lim) == 0);
    lim.rlim_cur = (rlim_t)(1 + extra);
    CHECK(setrlimit(RLIMIT_NPROC, &lim) == 0);
}

static void unlimit_threads(void) {
    struct rlimit lim;
    CHECK(getrlimit(RLIMIT_NPROC, &lim) == 0);
    lim.rlim_cur = lim.rlim_max;
    CHECK(setrlimit(RLIMIT_NPROC, &lim) == 0);
}

static void child(void) {
    /* A hang (the defect this guards against) ends the child by SIGALRM. */
    alarm(120);
    unlimit_threads();
    const uint32_t backends[3] = {IOE_BACKEND_URING, IOE_BACKEND_AIO, IOE_BACKEND_AUTO};
    int fds = count_open_fds();
    int failures = 0;
    for (int b = 0; b < 3; b++) {
        if (backends[b] != IOE_BACKEND_AUTO && !backend_available(backends[b])) continue;
        for (int extra = 0; extra <= 3; extra++) {
            struct ioe_context_options opts;
            CHECK_EQ(ioe_context_options_init(&opts), 0);
            opts.backend = backends[b];
            opts.depth = 8;
            struct ioe_context *ctx = (struct ioe_context *)1;
            allow_threads(extra);
            int rc = ioe_context_create(&opts, &ctx);
            unlimit_threads();
            if (rc == 0) {
                CHECK(ctx != NULL);
                CHECK_EQ(ioe_context_destroy(ctx), 0);
            } else {
                CHECK_EQ(rc, -EAGAIN);
                CHECK(ctx == NULL);
                failures++;
            }
            /* Every thread that started has been joined, nothing is open. */
            expect_only_main_thread();
            CHECK_EQ(count_open_fds(), fds);
            printf("%s with %d threads allowed: %s\n", ioe_backend_name(backends[b]), extra,
                   rc == 0 ? "created" : "-EAGAIN");
        }
    }
    CHECK(failures > 0);

    /* A pool of 4 with room for 2. */
    struct ioe_workers *w = (struct ioe_workers *)1;
    allow_threads(2);
    CHECK_EQ(ioe_workers_create(4, &w), -EAGAIN);
    unlimit_threads();
    CHECK(w == NULL);
    expect_only_main_thread();

    /* Still working. */
    int fd = temp_file(4096, 0);
    struct ioe_context *ctx = NULL;
    CHECK_EQ(ioe_context_create(NULL, &ctx), 0);
    struct waiter wt;
    waiter_init(&wt);
    struct slot *s = slots_new(1, &wt);
    static uint8_t buf[4096];
    CHECK_EQ(ioe_read(ctx, fd, buf, sizeof buf, 0, IOE_CHANNEL_READ, on_complete, &s[0]), 0);
    waiter_wait(&wt, 1);
    CHECK_EQ(s[0].result, 4096);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
    CHECK_EQ(count_open_fds(), fds);
    exit(0);
}

int main(void) {
    if (geteuid() != 0) {
        printf("SKIP: needs root to run a child under RLIMIT_NPROC as another user\n");
        return SKIP_EXIT;
    }
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        /* Root is exempt from RLIMIT_NPROC: become a user of our own (a uid
         * no other process has, so that only our threads count). The hard
         * limit stays, so the soft one can be lifted again. */
        uid_t uid = (uid_t)(2000000 + getpid());
        struct rlimit lim;
        CHECK(getrlimit(RLIMIT_NPROC, &lim) == 0);
        lim.rlim_cur = 1;
        CHECK(setrlimit(RLIMIT_NPROC, &lim) == 0);
        CHECK(setgroups(0, NULL) == 0);
        CHECK(setgid(uid) == 0);
        CHECK(setuid(uid) == 0);
        child();
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "child killed by signal %d%s\n", WTERMSIG(status),
                WTERMSIG(status) == SIGALRM ? " (context creation hung)" : "");
        return 1;
    }
    CHECK(WIFEXITED(status));
    if (WEXITSTATUS(status) != 0) return WEXITSTATUS(status);
    printf("spawn: ok\n");
    return 0;
}
