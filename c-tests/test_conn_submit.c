/* Block requests on a connection's loop (ioe_conn_submit), on both
 * backends (io_uring: the loop's own ring; epoll: the loop's helper
 * threads): a server that answers each command byte with a file read (or
 * a durable write), with the callback on the loop thread; more requests at
 * once than a loop keeps in flight; reads past the end; reads of an empty
 * pipe, more than an epoll loop's file helpers, which must not hold up the
 * file reads behind them; refusals
 * (invalid, IOE_REQ_DRAIN, a stopped server); a stop with requests in
 * flight; every callback exactly once, every byte compared with the file,
 * descriptors and threads back to their baseline. */
#include "net_util.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>

#define BLOCK 4096
#define FILE_BLOCKS 64
#define MANY 600 /* more than a loop keeps in flight (256) */
#define PIPE_READS 6 /* more than an epoll loop's helpers for files (4) */

struct fs_server {
    struct ioe_server *server;
    int fd;
    int pipe_fds[2];
    atomic_int callbacks, off_loop, errors, stop_done, stop_refused;
    struct waiter callbacks_done, connected;
    struct ioe_conn *kept;
};

struct op {
    struct fs_server *s;
    struct ioe_conn *conn;
    pthread_t loop_thread;
    uint8_t buf[BLOCK];
    char kind;
};

static struct fs_server *g;

static void on_read_done(void *ud, int64_t result) {
    struct op *o = ud;
    struct fs_server *s = o->s;
    if (o->kind == 's') {
        /* The stop case: done, or refused by the stop; counted only. */
        if (result == BLOCK && matches_pattern(o->buf, BLOCK, 5)) atomic_fetch_add(&s->stop_done, 1);
        else if (result == -ESHUTDOWN) atomic_fetch_add(&s->stop_refused, 1);
        else atomic_fetch_add(&s->errors, 1);
    } else if (!pthread_equal(pthread_self(), o->loop_thread)) {
        atomic_fetch_add(&s->off_loop, 1);
    }
    if (o->kind == 's') {
        /* No reply: the connection may be gone. */
    } else if (o->kind == 'p') {
        /* A byte from the pipe: answered with 'p' and the byte. */
        if (result == 1) {
            uint8_t reply[2] = {'p', o->buf[0]};
            CHECK_EQ(ioe_conn_send(o->conn, reply, 2), 0);
        } else {
            atomic_fetch_add(&s->errors, 1);
        }
    } else if (o->kind == 'w') {
        /* A durable write: answer with its result byte. */
        uint8_t ok = result == BLOCK ? 'k' : 'x';
        CHECK_EQ(ioe_conn_send(o->conn, &ok, 1), 0);
    } else if (result == BLOCK || (o->kind == 'e' && result >= 0)) {
        /* The block (or the bytes past the end that exist), then its length. */
        uint32_t n = (uint32_t)result;
        CHECK_EQ(ioe_conn_send(o->conn, &n, sizeof n), 0);
        if (n) CHECK_EQ(ioe_conn_send(o->conn, o->buf, n), 0);
    } else {
        atomic_fetch_add(&s->errors, 1);
    }
    ioe_conn_unref(o->conn);
    free(o);
    atomic_fetch_add(&s->callbacks, 1);
    waiter_signal(&s->callbacks_done);
}

static int submit_op(struct ioe_conn *conn, char kind, uint32_t block) {
    struct op *o = calloc(1, sizeof *o);
    CHECK(o != NULL);
    o->s = g;
    o->conn = ioe_conn_ref(conn);
    o->loop_thread = pthread_self();
    o->kind = kind;
    struct ioe_request r = {.op = IOE_OP_READ, .fd = g->fd, .buf = o->buf, .len = BLOCK,
                            .offset = (uint64_t)block * BLOCK, .callback = on_read_done, .user_data = o};
    if (kind == 'w') {
        r.op = IOE_OP_WRITE;
        r.rw_flags = IOE_RWF_DSYNC;
        fill_pattern(o->buf, BLOCK, 1000 + block);
    } else if (kind == 'e') {
        r.offset = (uint64_t)FILE_BLOCKS * BLOCK - 100; /* 100 bytes before the end */
    } else if (kind == 's') {
        r.offset = 5 * BLOCK;
    } else if (kind == 'p') {
        r.fd = g->pipe_fds[0];
        r.len = 1;
        r.offset = 0;
    }
    int rc = ioe_conn_submit(conn, &r);
    if (rc < 0) {
        ioe_conn_unref(o->conn);
        free(o);
    }
    return rc;
}

/* Each byte is a command: 'r' + block reads it, 'w' + block writes it
 * durably, 'e' reads past the end, 'M' starts MANY reads of block 0..63,
 * 'P' starts PIPE_READS one-byte reads of the pipe. */
static size_t fs_on_data(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    (void)user_data;
    const uint8_t *p = data;
    size_t used = 0;
    while (used < len) {
        char kind = (char)p[used];
        if (kind == 'M') {
            for (int i = 0; i < MANY; i++) CHECK_EQ(submit_op(conn, 'r', (uint32_t)(i % FILE_BLOCKS)), 0);
            used++;
            continue;
        }
        if (kind == 'P') {
            for (int i = 0; i < PIPE_READS; i++) CHECK_EQ(submit_op(conn, 'p', 0), 0);
            used++;
            continue;
        }
        if (kind == 'e') {
            CHECK_EQ(submit_op(conn, 'e', 0), 0);
            used++;
            continue;
        }
        if (len - used < 2) break;
        CHECK_EQ(submit_op(conn, kind, p[used + 1]), 0);
        used += 2;
    }
    return used;
}

static void fs_on_connect(struct ioe_conn *conn, void *user_data) {
    struct fs_server *s = user_data;
    if (!s->kept) s->kept = ioe_conn_ref(conn);
    waiter_signal(&s->connected);
}

static struct fs_server *fs_start(uint32_t backend, int fd) {
    struct fs_server *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    s->fd = fd;
    CHECK_EQ(pipe(s->pipe_fds), 0);
    waiter_init(&s->callbacks_done);
    waiter_init(&s->connected);
    g = s;
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = 1;
    struct ioe_server_callbacks cbs = {.on_connect = fs_on_connect, .on_data = fs_on_data, .user_data = s};
    CHECK_EQ(ioe_server_create(&opts, &cbs, &s->server), 0);
    CHECK_EQ(ioe_server_start(s->server), 0);
    return s;
}

/* Reads exactly `len` bytes; 0, or -1 at end of file. */
static int read_exact(int sock, void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(sock, (uint8_t *)buf + got, len - got);
        if (r == 0) return -1;
        CHECK(r > 0 || errno == EINTR);
        if (r > 0) got += (size_t)r;
    }
    return 0;
}

static void read_block(int sock, uint8_t *buf, uint32_t *len) {
    CHECK_EQ(read_exact(sock, len, sizeof *len), 0);
    if (*len) CHECK_EQ(read_exact(sock, buf, *len), 0);
}

/* Threads of this process now. */
static int count_threads(void) {
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void run(uint32_t backend) {
    const char *name = backend == IOE_NET_BACKEND_URING ? "io_uring" : "epoll";
    int fds = count_open_fds(), threads = count_threads();
    int fd = temp_file((off_t)FILE_BLOCKS * BLOCK, 0);
    uint8_t block[BLOCK];
    for (uint32_t b = 0; b < FILE_BLOCKS; b++) {
        fill_pattern(block, BLOCK, b);
        CHECK_EQ(pwrite(fd, block, BLOCK, (off_t)b * BLOCK), BLOCK);
    }
    struct fs_server *s = fs_start(backend, fd);
    int sock = connect_to(ioe_server_port(s->server));
    uint8_t got[BLOCK];
    uint32_t n;
    /* Reads of blocks, one at a time and several in one message. */
    for (uint32_t b = 0; b < 8; b++) {
        uint8_t cmd[2] = {'r', (uint8_t)b};
        CHECK_EQ(write(sock, cmd, 2), 2);
        read_block(sock, got, &n);
        CHECK_EQ(n, BLOCK);
        CHECK(matches_pattern(got, BLOCK, b));
    }
    /* Durable writes, then the bytes in the file. */
    uint8_t writes[4] = {'w', 10, 'w', 11};
    CHECK_EQ(write(sock, writes, 4), 4);
    uint8_t acks[2];
    CHECK_EQ(read_exact(sock, acks, 2), 0);
    CHECK(acks[0] == 'k' && acks[1] == 'k');
    for (uint32_t b = 10; b < 12; b++) {
        CHECK_EQ(pread(fd, got, BLOCK, (off_t)b * BLOCK), BLOCK);
        CHECK(matches_pattern(got, BLOCK, 1000 + b));
    }
    /* Past the end: the bytes that exist. */
    CHECK_EQ(write(sock, "e", 1), 1);
    read_block(sock, got, &n);
    CHECK_EQ(n, 100);
    fill_pattern(block, BLOCK, FILE_BLOCKS - 1);
    CHECK(memcmp(got, block + BLOCK - 100, 100) == 0);
    /* Reads of an empty pipe wait; a file read sent after them is answered
     * while they wait (on epoll, with more of them than helpers for files,
     * the old helpers all blocked on the pipe and this hung); then bytes
     * in the pipe answer each of them. */
    CHECK_EQ(write(sock, "P", 1), 1);
    uint8_t after_pipe[2] = {'r', 3};
    CHECK_EQ(write(sock, after_pipe, 2), 2);
    read_block(sock, got, &n);
    CHECK_EQ(n, BLOCK);
    CHECK(matches_pattern(got, BLOCK, 3));
    const char pipe_bytes[PIPE_READS] = "abcdef";
    CHECK_EQ(write(s->pipe_fds[1], pipe_bytes, PIPE_READS), PIPE_READS);
    int bytes_seen = 0;
    for (int i = 0; i < PIPE_READS; i++) {
        uint8_t reply[2];
        CHECK_EQ(read_exact(sock, reply, 2), 0);
        CHECK(reply[0] == 'p' && reply[1] >= 'a' && reply[1] < 'a' + PIPE_READS);
        CHECK((bytes_seen & (1 << (reply[1] - 'a'))) == 0);
        bytes_seen |= 1 << (reply[1] - 'a');
    }
    /* More at once than a loop keeps in flight: every one answered. */
    CHECK_EQ(write(sock, "M", 1), 1);
    int seen[FILE_BLOCKS] = {0};
    for (int i = 0; i < MANY; i++) {
        read_block(sock, got, &n);
        CHECK_EQ(n, BLOCK);
        int match = -1;
        for (uint32_t b = 0; b < FILE_BLOCKS && match < 0; b++) {
            if (b == 10 || b == 11) {
                if (matches_pattern(got, BLOCK, 1000 + b)) match = (int)b;
            } else if (matches_pattern(got, BLOCK, b)) {
                match = (int)b;
            }
        }
        CHECK(match >= 0);
        seen[match]++;
    }
    for (int b = 0; b < FILE_BLOCKS; b++) CHECK_EQ(seen[b], (MANY / FILE_BLOCKS) + (b < MANY % FILE_BLOCKS));
    int total = 8 + 2 + 1 + PIPE_READS + 1 + MANY;
    waiter_wait(&s->callbacks_done, total);
    CHECK_EQ(atomic_load(&s->callbacks), total);
    CHECK_EQ(atomic_load(&s->off_loop), 0);
    CHECK_EQ(atomic_load(&s->errors), 0);

    /* Refusals, with no callback: invalid, a drain request, NULLs. */
    struct ioe_request bad = {.op = IOE_OP_READ, .fd = fd, .buf = NULL, .len = BLOCK, .callback = on_read_done};
    CHECK_EQ(ioe_conn_submit(s->kept, &bad), -EINVAL);
    uint8_t spare[BLOCK];
    struct ioe_request drain = {.op = IOE_OP_READ, .fd = fd, .buf = spare, .len = BLOCK,
                                .callback = on_read_done, .flags = IOE_REQ_DRAIN};
    CHECK_EQ(ioe_conn_submit(s->kept, &drain), -EINVAL);
    CHECK_EQ(ioe_conn_submit(NULL, &drain), -EINVAL);
    CHECK_EQ(ioe_conn_submit(s->kept, NULL), -EINVAL);
    close(sock);
    /* Once the server stopped: -ESHUTDOWN. */
    CHECK_EQ(ioe_server_stop(s->server), 0);
    drain.flags = 0;
    CHECK_EQ(ioe_conn_submit(s->kept, &drain), -ESHUTDOWN);
    CHECK_EQ(atomic_load(&s->callbacks), total);
    CHECK_EQ(ioe_conn_unref(s->kept), 0);
    CHECK_EQ(ioe_server_destroy(s->server), 0);
    close(s->pipe_fds[0]);
    close(s->pipe_fds[1]);
    free(s);

    /* A stop with requests in flight and queued, submitted from this
     * thread: every callback has run, exactly once, when the stop returns
     * (done, or refused with -ESHUTDOWN if the loop had not taken it). */
    s = fs_start(backend, fd);
    sock = connect_to(ioe_server_port(s->server));
    waiter_wait(&s->connected, 1);
    for (int i = 0; i < MANY; i++) CHECK_EQ(submit_op(s->kept, 's', 0), 0);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    CHECK_EQ(atomic_load(&s->callbacks), MANY);
    CHECK_EQ(atomic_load(&s->stop_done) + atomic_load(&s->stop_refused), MANY);
    CHECK_EQ(atomic_load(&s->errors), 0);
    int done = atomic_load(&s->stop_done), refused = atomic_load(&s->stop_refused);
    close(sock);
    CHECK_EQ(ioe_conn_unref(s->kept), 0);
    CHECK_EQ(ioe_server_destroy(s->server), 0);
    close(s->pipe_fds[0]);
    close(s->pipe_fds[1]);
    free(s);
    close(fd);
    /* The loops and any file helpers have ended; nothing left open. */
    CHECK_EQ(count_threads(), threads);
    CHECK_EQ(count_open_fds(), fds);
    printf("%s: reads, durable writes, end of file, pipe reads beside file reads, %d at once, refusals, stop with %d done and %d refused: ok\n",
           name, MANY, done, refused);
}

int main(void) {
    hang_guard("conn_submit", 120);
    signal(SIGPIPE, SIG_IGN);
    int ran = 0;
    for (int i = 0; i < 2; i++) {
        if (!net_backend_available(NET_BACKENDS[i])) continue;
        run(NET_BACKENDS[i]);
        ran++;
    }
    return ran ? 0 : SKIP_EXIT;
}
