/* Faults from the system, on each backend: the expected error reaches the
 * request's callback (or the create call), exactly once, and the engine
 * serves again afterwards.
 *   - RLIMIT_FSIZE: a write past it gets -EFBIG, one across it is short;
 *   - a full file system (a 256 KiB tmpfs, root only): -ENOSPC, then
 *     writes succeed once space is freed;
 *   - fs.aio-max-nr used up (root only): an AIO context is refused with
 *     -EAGAIN, automatic choice still opens one (io_uring);
 *   - thread creation refused (a pids cgroup, root only): every create
 *     call answers -EAGAIN, and works once threads may be created again;
 *   - pipes (the offset ignored, as for any stream), directories (-EISDIR), read-only
 *     descriptors (-EBADF), a file truncated under a read (short read),
 *     offsets near and past INT64_MAX, lengths over 2 and 4 GiB;
 *   - a buffer allocation that cannot succeed (-ENOMEM);
 *   - a callback that blocks while many requests are queued behind it;
 *   - SIGPIPE left at its default: a peer that resets while a server
 *     sends does not kill the process.
 * The sysctl and rlimit changes are restored before each case ends; ctest
 * runs this test alone (RUN_SERIAL) because of the sysctl. */
#include "net_util.h"

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>

static struct waiter w;

/* Runs one request and returns its result (the callback's, or the submit
 * error when refused at once: then no callback ran). */
static int64_t run_one(struct ioe_context *ctx, struct ioe_request r) {
    struct slot s = {.w = &w, .result = INT64_MIN};
    r.callback = on_complete;
    r.user_data = &s;
    long before = waiter_done(&w);
    int rc = ioe_submit(ctx, &r);
    if (rc < 0) {
        CHECK_EQ(atomic_load(&s.calls), 0);
        return rc;
    }
    waiter_wait(&w, before + 1);
    CHECK_EQ(atomic_load(&s.calls), 1);
    return s.result;
}

static struct ioe_request rw(uint32_t op, int fd, void *buf, uint64_t len, uint64_t offset) {
    struct ioe_request r = {.op = op, .fd = fd, .buf = buf, .len = len, .offset = offset,
                            .channel = op == IOE_OP_READ ? IOE_CHANNEL_READ : IOE_CHANNEL_WRITE};
    return r;
}

/* The engine still reads and writes correctly. */
static void still_serving(struct ioe_context *ctx) {
    int fd = temp_file(8192, 0);
    uint8_t out[4096], in[4096];
    fill_pattern(out, sizeof out, 77);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_WRITE, fd, out, sizeof out, 4096)), (int64_t)sizeof out);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, in, sizeof in, 4096)), (int64_t)sizeof in);
    CHECK(memcmp(in, out, sizeof in) == 0);
    close(fd);
}

static const char *name(uint32_t backend) { return ioe_backend_name(backend); }

static void file_size_limit(uint32_t backend) {
    struct ioe_context *ctx = open_context(backend, 16, NULL);
    int fd = temp_file(0, 0);
    uint8_t buf[8192];
    fill_pattern(buf, sizeof buf, 5);
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_FSIZE, &saved) == 0);
    struct rlimit small = {.rlim_cur = 64 << 10, .rlim_max = saved.rlim_max};
    CHECK(setrlimit(RLIMIT_FSIZE, &small) == 0);
    int64_t past = run_one(ctx, rw(IOE_OP_WRITE, fd, buf, 4096, 128 << 10));
    int64_t across = run_one(ctx, rw(IOE_OP_WRITE, fd, buf, sizeof buf, 60 << 10));
    int64_t within = run_one(ctx, rw(IOE_OP_WRITE, fd, buf, 4096, 0));
    CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);
    CHECK_EQ(past, -EFBIG);
    CHECK_EQ(across, 4096); /* up to the limit */
    CHECK_EQ(within, 4096);
    uint8_t back[4096];
    CHECK_EQ(pread(fd, back, sizeof back, 60 << 10), 4096);
    CHECK(memcmp(back, buf, sizeof back) == 0);
    still_serving(ctx);
    close(fd);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    printf("%s: RLIMIT_FSIZE: -EFBIG past it, a short write across it: ok\n", name(backend));
}

static void full_file_system(uint32_t backend) {
    const char *tmp = getenv("TMPDIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/ioe-enospc-XXXXXX", tmp ? tmp : "/tmp");
    CHECK(mkdtemp(dir) != NULL);
    if (geteuid() != 0 || mount("tmpfs", dir, "tmpfs", 0, "size=256k") != 0) {
        printf("SKIP %s: ENOSPC: cannot mount a small tmpfs here (%s)\n", name(backend),
               geteuid() != 0 ? "not root" : strerror(errno));
        rmdir(dir);
        return;
    }
    /* Held by a descriptor and detached at once: whatever happens next,
     * no mount is left behind (it goes when the descriptors close). */
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY);
    int fd = dirfd >= 0 ? openat(dirfd, "f", O_RDWR | O_CREAT, 0600) : -1;
    CHECK(umount2(dir, MNT_DETACH) == 0);
    CHECK(rmdir(dir) == 0);
    CHECK(dirfd >= 0 && fd >= 0);
    struct ioe_context *ctx = open_context(backend, 16, NULL);
    uint8_t buf[64 << 10];
    uint64_t written = 0;
    int64_t last = 0;
    for (int i = 0; i < 64 && last >= 0; i++) {
        fill_pattern(buf, sizeof buf, (uint64_t)i);
        last = run_one(ctx, rw(IOE_OP_WRITE, fd, buf, sizeof buf, written));
        if (last > 0) written += (uint64_t)last;
    }
    CHECK_EQ(last, -ENOSPC);
    CHECK(written > 0 && written <= 256 << 10);
    /* What was acknowledged is there. */
    uint8_t *back = malloc(written);
    CHECK(back != NULL);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, back, written, 0)), (int64_t)written);
    for (uint64_t at = 0; at + sizeof buf <= written; at += sizeof buf) {
        fill_pattern(buf, sizeof buf, at / sizeof buf);
        CHECK(memcmp(back + at, buf, sizeof buf) == 0);
    }
    free(back);
    /* Space freed: writes succeed again. */
    struct ioe_request punch = {.op = IOE_OP_FALLOCATE, .fd = fd, .len = written, .offset = 0,
                                .fallocate_mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE};
    CHECK_EQ(run_one(ctx, punch), 0);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_WRITE, fd, buf, sizeof buf, 0)), (int64_t)sizeof buf);
    still_serving(ctx);
    close(fd);
    close(dirfd);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    printf("%s: ENOSPC on a full tmpfs, then writes again: ok\n", name(backend));
}

static int read_sysctl(const char *path, long *value) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = fscanf(f, "%ld", value);
    fclose(f);
    return n == 1 ? 0 : -1;
}

static int write_sysctl(const char *path, long value) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    int n = fprintf(f, "%ld\n", value);
    return fclose(f) == 0 && n > 0 ? 0 : -1;
}

/* fs.aio-max-nr as it was, for on_alarm to put back (-1: untouched). */
static char aio_saved_text[32];
static volatile sig_atomic_t aio_limit_changed;

static void restore_aio_limit(void) {
    if (!aio_limit_changed) return;
    int fd = open("/proc/sys/fs/aio-max-nr", O_WRONLY);
    if (fd >= 0) {
        (void)!write(fd, aio_saved_text, strlen(aio_saved_text));
        close(fd);
    }
    aio_limit_changed = 0;
}

static void aio_limit_used_up(void) {
    const char *max_path = "/proc/sys/fs/aio-max-nr";
    long saved, used;
    if (read_sysctl(max_path, &saved) != 0 || read_sysctl("/proc/sys/fs/aio-nr", &used) != 0) {
        printf("SKIP fs.aio-max-nr: cannot read it here\n");
        return;
    }
    snprintf(aio_saved_text, sizeof aio_saved_text, "%ld\n", saved);
    if (write_sysctl(max_path, used) != 0) {
        printf("SKIP fs.aio-max-nr: cannot change it here\n");
        return;
    }
    aio_limit_changed = 1;
    /* The create calls run in a child: whatever happens there, the limit
     * is put back here as soon as it ends. */
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        alarm(60);
        struct ioe_context_options opts;
        CHECK_EQ(ioe_context_options_init(&opts), 0);
        opts.backend = IOE_BACKEND_AIO;
        struct ioe_context *aio = NULL, *any = NULL;
        CHECK_EQ(ioe_context_create(&opts, &aio), -EAGAIN);
        CHECK(aio == NULL);
        opts.backend = IOE_BACKEND_AUTO;
        int auto_rc = ioe_context_create(&opts, &any);
        if (backend_available(IOE_BACKEND_URING)) {
            CHECK_EQ(auto_rc, 0);
            CHECK_EQ(ioe_context_backend(any), IOE_BACKEND_URING);
            still_serving(any);
            CHECK_EQ(ioe_context_destroy(any), 0);
        } else {
            CHECK_EQ(auto_rc, -EAGAIN);
        }
        _exit(0);
    }
    int status = 0;
    pid_t waited = child > 0 ? waitpid(child, &status, 0) : -1;
    restore_aio_limit();
    long now = 0;
    CHECK(read_sysctl(max_path, &now) == 0 && now == saved);
    CHECK(child > 0 && waited == child);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* Restored: AIO opens again. */
    struct ioe_context *aio = open_context(IOE_BACKEND_AIO, 16, NULL);
    still_serving(aio);
    CHECK_EQ(ioe_context_destroy(aio), 0);
    printf("fs.aio-max-nr used up: AIO -EAGAIN, auto %s: ok\n",
           backend_available(IOE_BACKEND_URING) ? "on io_uring" : "-EAGAIN");
}

/* A pids cgroup for the child (v1 or v2); its directory, or NULL. */
static const char *pids_cgroup(char *dir, size_t len) {
    const char *roots[] = {"/sys/fs/cgroup/pids", "/sys/fs/cgroup"};
    for (int i = 0; i < 2; i++) {
        snprintf(dir, len, "%s/ioe-test-%d", roots[i], (int)getpid());
        if (mkdir(dir, 0755) != 0) continue;
        char path[300];
        snprintf(path, sizeof path, "%s/pids.max", dir);
        if (access(path, W_OK) == 0) return dir;
        rmdir(dir);
    }
    return NULL;
}

static int write_file(const char *dir, const char *file, const char *text) {
    char path[300];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

/* In the child: with no thread to be had, every create call says -EAGAIN;
 * then with threads allowed again, all of them work. */
static void child_without_threads(const char *dir) {
    char pid[32];
    snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    alarm(60); /* not inherited from the parent */
    /* A cgroup tree that takes no limit or no process here: skipped. */
    if (write_file(dir, "pids.max", "1\n") != 0 || write_file(dir, "cgroup.procs", pid) != 0) _exit(SKIP_EXIT);
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        struct ioe_context_options opts;
        CHECK_EQ(ioe_context_options_init(&opts), 0);
        opts.backend = BACKENDS[b];
        struct ioe_context *ctx = NULL;
        CHECK_EQ(ioe_context_create(&opts, &ctx), -EAGAIN);
        CHECK(ctx == NULL);
    }
    struct ioe_workers *workers = NULL;
    CHECK_EQ(ioe_workers_create(2, &workers), -EAGAIN);
    struct ioe_server_options sopts;
    CHECK_EQ(ioe_server_options_init(&sopts), 0);
    sopts.address = "127.0.0.1";
    sopts.threads = 2;
    struct ioe_server_callbacks cbs = {.on_data = net_util_discard};
    struct ioe_server *server = NULL;
    int rc = ioe_server_create(&sopts, &cbs, &server);
    if (rc == 0) {
        CHECK_EQ(ioe_server_start(server), -EAGAIN);
        CHECK_EQ(ioe_server_destroy(server), 0);
    } else {
        CHECK_EQ(rc, -EAGAIN);
    }
    CHECK(write_file(dir, "pids.max", "max\n") == 0);
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        struct ioe_context *ctx = open_context(BACKENDS[b], 8, NULL);
        still_serving(ctx);
        CHECK_EQ(ioe_context_destroy(ctx), 0);
    }
    CHECK_EQ(ioe_workers_create(2, &workers), 0);
    CHECK_EQ(ioe_workers_destroy(workers), 0);
    _exit(0);
}

static void threads_refused(void) {
    char dir[256];
    if (geteuid() != 0 || !pids_cgroup(dir, sizeof dir)) {
        printf("SKIP thread creation refused: no pids cgroup can be made here\n");
        return;
    }
    fflush(stdout);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) child_without_threads(dir);
    int status = 0;
    pid_t waited = waitpid(child, &status, 0);
    /* The child has left the cgroup by exiting (or by its alarm): the
     * directory goes before anything is checked. */
    int removed = rmdir(dir);
    CHECK(waited == child && removed == 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == SKIP_EXIT) {
        printf("SKIP thread creation refused: the pids cgroup takes no limit or process here\n");
        return;
    }
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    printf("thread creation refused: every create -EAGAIN, then working again: ok\n");
}

static void odd_files(uint32_t backend) {
    struct ioe_context *ctx = open_context(backend, 16, NULL);
    uint8_t buf[4096];
    memset(buf, 1, sizeof buf);
    /* A pipe: the offset is ignored (a stream), on both backends. */
    int p[2];
    CHECK(pipe(p) == 0);
    uint8_t word[16] = "through the pipe";
    CHECK_EQ(run_one(ctx, rw(IOE_OP_WRITE, p[1], word, sizeof word, 12345)), (int64_t)sizeof word);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, p[0], buf, sizeof word, 999)), (int64_t)sizeof word);
    CHECK(memcmp(buf, word, sizeof word) == 0);
    close(p[0]);
    close(p[1]);
    /* A directory. */
    int dir = open("/tmp", O_RDONLY | O_DIRECTORY);
    CHECK(dir >= 0);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, dir, buf, sizeof buf, 0)), -EISDIR);
    close(dir);
    /* A read-only descriptor written to, a write-only one read. */
    int fd = temp_file(16384, 0);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int ro = open(path, O_RDONLY), wo = open(path, O_WRONLY);
    CHECK(ro >= 0 && wo >= 0);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_WRITE, ro, buf, sizeof buf, 0)), -EBADF);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, wo, buf, sizeof buf, 0)), -EBADF);
    close(ro);
    close(wo);
    /* Truncated under the reader: past the end 0, across it short. */
    CHECK(ftruncate(fd, 6000) == 0);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, buf, sizeof buf, 8192)), 0);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, buf, sizeof buf, 4096)), 6000 - 4096);
    /* Offsets near and past INT64_MAX: up to it, end of file (reads) or
     * too big (writes); past it (with the length), refused. */
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, buf, sizeof buf, INT64_MAX - sizeof buf)), 0);
    int64_t near_end = run_one(ctx, rw(IOE_OP_WRITE, fd, buf, sizeof buf, INT64_MAX - sizeof buf));
    /* ext4 stops at 16 TiB (-EFBIG); tmpfs, xfs and btrfs take it. */
    CHECK(near_end == -EFBIG || near_end == -EINVAL || near_end == (int64_t)sizeof buf);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, buf, sizeof buf, INT64_MAX - 100)), -EINVAL);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, buf, sizeof buf, (uint64_t)INT64_MAX + 1)), -EINVAL);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_WRITE, fd, buf, sizeof buf, UINT64_MAX - 10)), -EINVAL);
    /* Lengths over 2 GiB and 4 GiB (address space only: the file is 6000
     * bytes, so a read returns what is there). */
    size_t huge = (size_t)5 << 30;
    void *space = mmap(NULL, huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(space != MAP_FAILED);
    CHECK_EQ(run_one(ctx, rw(IOE_OP_READ, fd, space, (uint64_t)3 << 30, 0)), 6000);
    int64_t over4 = run_one(ctx, rw(IOE_OP_READ, fd, space, huge, 0));
    CHECK(over4 == 6000 || over4 == -EINVAL);
    CHECK(munmap(space, huge) == 0);
    close(fd);
    still_serving(ctx);
    struct ioe_stats stats;
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(stats.submitted, stats.completed);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    printf("%s: pipes, directories, wrong-mode descriptors, truncation, huge offsets and lengths "
           "(past 4 GiB: %s): ok\n",
           name(backend), over4 == -EINVAL ? "-EINVAL" : "short read");
}

/* A callback that blocks (a slow callback) until the main thread has
 * queued many more requests: submissions are still accepted, and every
 * request completes once it returns, none lost, none twice. */
struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool open, entered;
};
static struct gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, false};

static void slow_callback(void *user_data, int64_t result) {
    pthread_mutex_lock(&gate.mu);
    gate.entered = true;
    pthread_cond_broadcast(&gate.cv);
    while (!gate.open) pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);
    on_complete(user_data, result);
}

static void slow_callbacks(uint32_t backend, uint32_t pool_threads) {
    struct ioe_workers *pool = NULL;
    if (pool_threads) CHECK_EQ(ioe_workers_create(pool_threads, &pool), 0);
    struct ioe_context *ctx = open_context(backend, 16, pool);
    enum { MANY = 300 };
    int fd = temp_file(MANY * 512, 0);
    struct waiter done;
    waiter_init(&done);
    struct slot *slots = slots_new(MANY + 1, &done);
    static uint8_t bufs[MANY + 1][512];
    gate.open = gate.entered = false;
    CHECK_EQ(ioe_read(ctx, fd, bufs[MANY], 512, 0, IOE_CHANNEL_READ, slow_callback, &slots[MANY]), 0);
    pthread_mutex_lock(&gate.mu);
    while (!gate.entered) pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);
    /* The first callback is blocked: queue many more meanwhile. */
    for (int i = 0; i < MANY; i++) {
        CHECK_EQ(ioe_write(ctx, fd, bufs[i], 512, (uint64_t)i * 512, IOE_CHANNEL_WRITE, on_complete, &slots[i]), 0);
    }
    pthread_mutex_lock(&gate.mu);
    gate.open = true;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    waiter_wait(&done, MANY + 1);
    slots_check_once(slots, MANY + 1);
    for (int i = 0; i <= MANY; i++) CHECK_EQ(slots[i].result, 512);
    still_serving(ctx);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    if (pool) CHECK_EQ(ioe_workers_destroy(pool), 0);
    free(slots);
    close(fd);
    printf("%s: a callback blocked (%s) while %d requests were queued: all completed once: ok\n", name(backend),
           pool_threads ? "pool" : "inline", MANY);
}

/* SIGPIPE at its default: a server sending to a peer that reset. */
static atomic_int sigpipe_closed;
static struct waiter sigpipe_done;

static size_t flood_on_data(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    (void)data;
    (void)user_data;
    static uint8_t chunk[256 << 10];
    for (int i = 0; i < 64; i++) {
        if (ioe_conn_send(conn, chunk, sizeof chunk) != 0) break;
    }
    return len;
}

static void flood_on_close(struct ioe_conn *conn, int error, void *user_data) {
    (void)conn;
    (void)user_data;
    atomic_store(&sigpipe_closed, error);
    waiter_signal(&sigpipe_done);
}

static void no_sigpipe(uint32_t backend) {
    long closes = waiter_done(&sigpipe_done);
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = 1;
    struct ioe_server_callbacks cbs = {.on_data = flood_on_data, .on_close = flood_on_close};
    struct ioe_server *server = NULL;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &server), 0);
    CHECK_EQ(ioe_server_start(server), 0);
    int sock = connect_to(ioe_server_port(server));
    CHECK_EQ(write(sock, "go", 2), 2);
    /* Take a little, then reset with 16 MiB still coming. */
    uint8_t some[4096];
    CHECK(read(sock, some, sizeof some) > 0);
    struct linger hard = {.l_onoff = 1, .l_linger = 0};
    CHECK_EQ(setsockopt(sock, SOL_SOCKET, SO_LINGER, &hard, sizeof hard), 0);
    close(sock);
    waiter_wait(&sigpipe_done, closes + 1);
    int error = atomic_load(&sigpipe_closed);
    CHECK(error == ECONNRESET || error == EPIPE);
    CHECK_EQ(ioe_server_destroy(server), 0);
    printf("net backend %u: peer reset during a large send, SIGPIPE at its default: process alive, on_close %s: ok\n",
           backend, strerror(error));
}

static void on_alarm(int sig) {
    (void)sig;
    restore_aio_limit();
    static const char msg[] = "faults: hung\n";
    (void)!write(2, msg, sizeof msg - 1);
    _exit(1);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    alarm(300);
    /* A write past RLIMIT_FSIZE raises SIGXFSZ, which would end the
     * process: a program that sets the limit ignores it, as here. */
    signal(SIGXFSZ, SIG_IGN);
    /* SIGPIPE stays at its default on purpose. */
    waiter_init(&w);
    waiter_init(&sigpipe_done);
    int fds = count_open_fds();
    int ran = 0;
    for (int b = 0; b < 2; b++) {
        if (!backend_available(BACKENDS[b])) continue;
        file_size_limit(BACKENDS[b]);
        full_file_system(BACKENDS[b]);
        odd_files(BACKENDS[b]);
        slow_callbacks(BACKENDS[b], 0);
        slow_callbacks(BACKENDS[b], 2);
        ran++;
    }
    /* Memory the caller asks for and cannot have: -ENOMEM, nothing stored. */
    void *huge = (void *)1;
    CHECK_EQ(ioe_buffer_alloc((size_t)1 << 62, 0, &huge), -ENOMEM);
    CHECK(huge == NULL);
    if (backend_available(IOE_BACKEND_AIO)) aio_limit_used_up();
    threads_refused();
    for (int i = 0; i < 2; i++) {
        if (net_backend_available(NET_BACKENDS[i])) no_sigpipe(NET_BACKENDS[i]);
    }
    CHECK_EQ(count_open_fds(), fds);
    return ran ? 0 : SKIP_EXIT;
}
