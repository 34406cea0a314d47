/* The server's edges, on both backends: calls from callbacks while another
 * thread stops, descriptors after stop, connections arriving during stop,
 * a peer that half-closes and then resets, abort of a borrowed send, no
 * callback after ioe_conn_close, the stats as on_close runs, and options
 * out of range. Each case failed before its fix (found in review). */
#include "net_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/un.h>

/* A counting server: on_data per mode, references the first connection. */
struct es {
    struct ioe_server *server;
    int port;
    struct waiter connects, closes, eofs;
    atomic_int last_error;
    atomic_int stop_rc; /* what ioe_server_stop returned inside on_close */
    int stop_in_close;
    int keep_on_eof; /* on_eof leaves the connection open */
    /* The first connection, referenced: set once, by whichever loop thread
     * gets there first (with two loops, on_connect runs on both at once; a
     * plain check-then-set leaked the loser's reference). */
    _Atomic(struct ioe_conn *) kept;
    atomic_int close_returned; /* ioe_conn_close on `kept` has returned */
    atomic_int callbacks_after_close, data_calls;
};

static void e_on_connect(struct ioe_conn *conn, void *user_data) {
    struct es *s = user_data;
    if (atomic_load(&s->kept) == NULL) {
        struct ioe_conn *ref = ioe_conn_ref(conn), *none = NULL;
        if (!atomic_compare_exchange_strong(&s->kept, &none, ref)) CHECK_EQ(ioe_conn_unref(ref), 0);
    }
    waiter_signal(&s->connects);
}

static size_t e_on_data(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    struct es *s = user_data;
    (void)data;
    if (conn == s->kept && atomic_load(&s->close_returned)) atomic_fetch_add(&s->callbacks_after_close, 1);
    atomic_fetch_add(&s->data_calls, 1);
    return len;
}

static void e_on_eof(struct ioe_conn *conn, void *user_data) {
    struct es *s = user_data;
    if (conn == s->kept && atomic_load(&s->close_returned)) atomic_fetch_add(&s->callbacks_after_close, 1);
    waiter_signal(&s->eofs);
    if (!s->keep_on_eof) CHECK_EQ(ioe_conn_close(conn), 0);
}

static void e_on_close(struct ioe_conn *conn, int error, void *user_data) {
    struct es *s = user_data;
    (void)conn;
    atomic_store(&s->last_error, error);
    if (s->stop_in_close) {
        atomic_store(&s->stop_rc, ioe_server_stop(s->server));
        CHECK_EQ(ioe_server_start(s->server), -EINVAL);
    }
    waiter_signal(&s->closes);
}

static struct es *e_start(uint32_t backend, uint32_t threads) {
    struct es *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    waiter_init(&s->connects);
    waiter_init(&s->closes);
    waiter_init(&s->eofs);
    atomic_init(&s->stop_rc, 1);
    atomic_init(&s->last_error, -1);
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = threads;
    struct ioe_server_callbacks cbs = {.on_connect = e_on_connect,
                                       .on_data = e_on_data,
                                       .on_eof = e_on_eof,
                                       .on_close = e_on_close,
                                       .user_data = s};
    CHECK_EQ(ioe_server_create(&opts, &cbs, &s->server), 0);
    CHECK_EQ(ioe_server_start(s->server), 0);
    s->port = ioe_server_port(s->server);
    return s;
}

static void e_finish(struct es *s) {
    if (s->kept != NULL) CHECK_EQ(ioe_conn_unref(s->kept), 0);
    CHECK_EQ(ioe_server_destroy(s->server), 0);
    free(s);
}

/* ioe_server_stop from on_close while another thread stops the server:
 * -EDEADLK at once (it used to wait for the stopping thread's lock while
 * that thread waited for this loop: a hang); ioe_server_start: -EINVAL. */
static void stop_from_on_close(uint32_t backend) {
    struct es *s = e_start(backend, 1);
    s->stop_in_close = 1;
    int fd = connect_to(s->port);
    waiter_wait(&s->connects, 1);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    CHECK_EQ(atomic_load(&s->stop_rc), -EDEADLK);
    CHECK_EQ(atomic_load(&s->last_error), ECANCELED);
    close(fd);
    e_finish(s);
}

/* Stop closes every descriptor the server opened (the loops' eventfds
 * stayed open until destroy, or for as long as a connection reference). */
static void stop_closes_every_descriptor(uint32_t backend) {
    int before = count_open_fds();
    struct es *s = e_start(backend, 2);
    int fd = connect_to(s->port);
    waiter_wait(&s->connects, 1);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    close(fd);
    CHECK_EQ(count_open_fds(), before);
    /* The handle still answers, and refuses. */
    CHECK_EQ(ioe_conn_send(s->kept, "x", 1), -ENOTCONN);
    CHECK_EQ(ioe_conn_is_closed(s->kept), 1);
    e_finish(s);
}


/* Abort with a borrowed send partly sent: its done gets -ECANCELED, as
 * documented (it used to get the count of bytes sent so far, which a
 * caller cannot tell from success without comparing lengths). */
static void abort_cancels_partly_sent_borrowed(uint32_t backend) {
    struct es *s = e_start(backend, 1);
    int fd = connect_to(s->port); /* never reads */
    waiter_wait(&s->connects, 1);
    const size_t big = 64 << 20;
    uint8_t *buf = calloc(1, big);
    CHECK(buf != NULL);
    struct borrowed b;
    borrowed_init(&b);
    CHECK_EQ(ioe_conn_send_borrowed(s->kept, buf, big, borrowed_done, &b), 0);
    /* Until part of it is in the socket buffers. */
    time_t start = time(NULL);
    while (ioe_conn_queued(s->kept) == (int64_t)big) {
        CHECK(time(NULL) - start < 60);
        sched_yield();
    }
    CHECK_EQ(ioe_conn_abort(s->kept), 0);
    waiter_wait(&b.done, 1);
    waiter_wait(&s->closes, 1);
    CHECK_EQ(b.result, -ECANCELED);
    close(fd);
    e_finish(s);
    free(buf);
}

static atomic_int flood_run;
static int flood_port;

/* Connects and resets, as fast as it can. */
static void *flood(void *arg) {
    (void)arg;
    while (atomic_load(&flood_run)) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)flood_port)};
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
            struct linger reset = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        }
        close(fd);
    }
    return NULL;
}

/* Connections accepted while the server stops are either served or
 * counted as rejected, and none stays counted after stop (one handed to a
 * loop that had just ended was closed but never counted out). */
static void connections_arriving_during_stop(uint32_t backend) {
    for (int round = 0; round < 100; round++) {
        struct es *s = e_start(backend, 2);
        flood_port = s->port;
        atomic_store(&flood_run, 1);
        pthread_t t[2];
        for (int i = 0; i < 2; i++) CHECK(pthread_create(&t[i], NULL, flood, NULL) == 0);
        /* Stop while connections pour in. */
        struct ioe_net_stats st;
        do {
            CHECK_EQ(ioe_server_stats(s->server, &st), 0);
            sched_yield();
        } while (st.accepted < 20);
        CHECK_EQ(ioe_server_stop(s->server), 0);
        atomic_store(&flood_run, 0);
        for (int i = 0; i < 2; i++) CHECK(pthread_join(t[i], NULL) == 0);
        CHECK_EQ(ioe_server_stats(s->server, &st), 0);
        long connects = waiter_done(&s->connects), closes = waiter_done(&s->closes);
        if (st.connections != 0 || (long)st.accepted != connects + (long)st.rejected || connects != closes) {
            fprintf(stderr, "round %d: connections %llu, accepted %llu, on_connect %ld, on_close %ld, rejected %llu\n",
                    round, (unsigned long long)st.connections, (unsigned long long)st.accepted, connects, closes,
                    (unsigned long long)st.rejected);
            exit(1);
        }
        e_finish(s);
    }
}

/* The peer half-closes (the application keeps the connection to send
 * later), then resets: the connection ends with the socket's error. On
 * io_uring it used to stay open and counted until the next send. */
static void half_closed_peer_resets(uint32_t backend) {
    struct es *s = e_start(backend, 1);
    s->keep_on_eof = 1;
    int fd = connect_to(s->port);
    waiter_wait(&s->connects, 1);
    CHECK(shutdown(fd, SHUT_WR) == 0);
    waiter_wait(&s->eofs, 1);
    struct linger reset = {1, 0};
    CHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset) == 0);
    close(fd);
    waiter_wait(&s->closes, 1);
    int error = atomic_load(&s->last_error);
    CHECK(error == ECONNRESET || error == EPIPE);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, 0);
    /* A half-closed peer that stays is not closed by the watch. */
    int stays = connect_to(s->port);
    waiter_wait(&s->connects, 2);
    CHECK(shutdown(stays, SHUT_WR) == 0);
    waiter_wait(&s->eofs, 2);
    CHECK_EQ(waiter_done(&s->closes), 1);
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, 1);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    CHECK_EQ(waiter_done(&s->closes), 2);
    close(stays);
    e_finish(s);
}

/* A loop watches half-closed peers with an epoll set of its own; once no
 * such connection is left the set is closed (it used to stay open for the
 * loop's life: one descriptor more than before the first half-close). */
static void half_close_watch_releases_its_descriptor(uint32_t backend) {
    struct es *s = e_start(backend, 1);
    s->keep_on_eof = 1;
    int fd = connect_to(s->port);
    waiter_wait(&s->connects, 1);
    int with_connection = count_open_fds();
    CHECK(shutdown(fd, SHUT_WR) == 0);
    waiter_wait(&s->eofs, 1);
    struct linger reset = {1, 0};
    CHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset) == 0);
    close(fd);
    waiter_wait(&s->closes, 1);
    /* The set closes when its cancelled poll ends, just after on_close:
     * wait for the count (bounded), not for a time. */
    for (int i = 0; i < 10000 && count_open_fds() != with_connection - 2; i++) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    CHECK_EQ(count_open_fds(), with_connection - 2);
    /* And a new half-closed peer is watched again. */
    int again = connect_to(s->port);
    waiter_wait(&s->connects, 2);
    CHECK(shutdown(again, SHUT_WR) == 0);
    waiter_wait(&s->eofs, 2);
    CHECK(setsockopt(again, SOL_SOCKET, SO_LINGER, &reset, sizeof reset) == 0);
    close(again);
    waiter_wait(&s->closes, 2);
    int error = atomic_load(&s->last_error);
    CHECK(error == ECONNRESET || error == EPIPE);
    e_finish(s);
}

static size_t unix_echo(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    (void)user_data;
    uint8_t peer[128];
    uint32_t peer_len = sizeof peer;
    /* A Unix-socket connection has no peer address to give. */
    CHECK_EQ(ioe_conn_peer(conn, peer, &peer_len), -ENOTCONN);
    CHECK_EQ(ioe_conn_send(conn, data, len), 0);
    return len;
}

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    CHECK(strlen(path) < sizeof addr.sun_path);
    memcpy(addr.sun_path, path, strlen(path) + 1);
    CHECK(connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
    return fd;
}

/* A server on a Unix socket ("unix:PATH" or an absolute path): it echoes,
 * has port 0, replaces a stale socket file, refuses a live one with
 * -EADDRINUSE, and removes its file when it stops. */
static void unix_socket(uint32_t backend) {
    char dir[] = "/tmp/ioe-unix-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[64], spec[96];
    snprintf(path, sizeof path, "%s/nbd.sock", dir);
    snprintf(spec, sizeof spec, "unix:%s", path);
    /* A stale socket file: bound by a socket that is gone. */
    int stale = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    CHECK(strlen(path) < sizeof sun.sun_path);
    memcpy(sun.sun_path, path, strlen(path) + 1);
    CHECK(bind(stale, (struct sockaddr *)&sun, sizeof sun) == 0);
    close(stale);
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = spec;
    opts.backend = backend;
    opts.threads = 1;
    struct ioe_server_callbacks cbs = {.on_data = unix_echo};
    struct ioe_server *server = NULL;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &server), 0);
    CHECK_EQ(ioe_server_start(server), 0);
    CHECK_EQ(ioe_server_port(server), 0);
    /* A second server on the live path: refused. */
    struct ioe_server *second = NULL;
    opts.address = path;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &second), -EADDRINUSE);
    CHECK(second == NULL);
    int fd = connect_unix(path);
    uint8_t out[100000], in[sizeof out];
    for (size_t i = 0; i < sizeof out; i++) out[i] = (uint8_t)(i * 7);
    CHECK_EQ(exchange(fd, out, sizeof out, in, sizeof in), sizeof in);
    CHECK(memcmp(out, in, sizeof out) == 0);
    close(fd);
    CHECK_EQ(ioe_server_destroy(server), 0);
    CHECK(access(path, F_OK) != 0 && errno == ENOENT);
    /* Not a socket there: refused, and left alone. */
    int plain = open(path, O_CREAT | O_WRONLY, 0600);
    CHECK(plain >= 0);
    close(plain);
    CHECK_EQ(ioe_server_create(&opts, &cbs, &second), -EADDRINUSE);
    CHECK(access(path, F_OK) == 0);
    unlink(path);
    /* Too long a path. */
    char longer[200];
    memset(longer, 'a', sizeof longer - 1);
    longer[0] = '/';
    longer[sizeof longer - 1] = 0;
    opts.address = longer;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &second), -ENAMETOOLONG);
    CHECK(rmdir(dir) == 0);
}

static atomic_int writer_run;

static void *writer(void *arg) {
    int fd = *(int *)arg;
    char chunk[64];
    memset(chunk, 'a', sizeof chunk);
    while (atomic_load(&writer_run))
        if (send(fd, chunk, sizeof chunk, MSG_NOSIGNAL) < 0) break;
    return NULL;
}

/* Once ioe_conn_close has returned (from a thread of the application's,
 * with data pouring in), neither on_data nor on_eof starts for that
 * connection; on_close follows once the peer finishes. */
static void no_callback_after_close(uint32_t backend) {
    for (int round = 0; round < 20; round++) {
        struct es *s = e_start(backend, 1);
        int fd = connect_to(s->port);
        waiter_wait(&s->connects, 1);
        atomic_store(&writer_run, 1);
        pthread_t t;
        CHECK(pthread_create(&t, NULL, writer, &fd) == 0);
        while (atomic_load(&s->data_calls) < 100) sched_yield();
        CHECK_EQ(ioe_conn_close(s->kept), 0);
        atomic_store(&s->close_returned, 1);
        /* The server shuts its side (lingering); the peer stops and
         * finishes, so the close completes. */
        uint8_t scratch[4096];
        (void)read_to_eof(fd, scratch, sizeof scratch);
        atomic_store(&writer_run, 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK(shutdown(fd, SHUT_WR) == 0);
        waiter_wait(&s->closes, 1);
        CHECK_EQ(atomic_load(&s->callbacks_after_close), 0);
        CHECK_EQ(atomic_load(&s->last_error), 0);
        close(fd);
        e_finish(s);
    }
}

/* When on_close runs, the connection no longer counts in the stats (or
 * against max_connections). */
static void stats_as_on_close_runs(uint32_t backend) {
    struct es *s = e_start(backend, 1);
    for (int i = 0; i < 200; i++) {
        int fd = connect_to(s->port);
        waiter_wait(&s->connects, i + 1);
        close(fd);
        waiter_wait(&s->closes, i + 1);
        struct ioe_net_stats st;
        CHECK_EQ(ioe_server_stats(s->server, &st), 0);
        if (st.connections != 0) {
            fprintf(stderr, "round %d: on_close ran, stats still count %llu connections\n", i,
                    (unsigned long long)st.connections);
            exit(1);
        }
    }
    e_finish(s);
}

/* Receive buffer sizes the library cannot serve are refused at create (a
 * 2 GiB buffer was taken, and on io_uring every connection then died of
 * EINVAL). */
static void receive_buffer_bounds(uint32_t backend) {
    static const struct {
        uint32_t buffers, size;
        int expected;
    } cases[] = {
        {256, 0x80000000u, -EINVAL}, /* 2 GiB */
        {256, (16u << 20) + 1, -EINVAL},
        {128, 16u << 20, -EINVAL}, /* 2 GiB in all */
        {64, 16u << 20, 0},        /* 1 GiB in all: allowed (the ring is not touched here) */
        {4, 1u << 20, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct ioe_server_options opts;
        CHECK_EQ(ioe_server_options_init(&opts), 0);
        opts.address = "127.0.0.1";
        opts.backend = backend;
        opts.threads = 0;
        opts.recv_buffers = cases[i].buffers;
        opts.recv_buffer_size = cases[i].size;
        struct ioe_server_callbacks cbs = {.on_data = net_util_discard};
        struct ioe_server *srv = (struct ioe_server *)1;
        CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), cases[i].expected);
        if (cases[i].expected == 0) CHECK_EQ(ioe_server_destroy(srv), 0);
        else CHECK(srv == NULL);
    }
}

/* With an argument, runs only the case of that name. */
int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    static const struct {
        const char *name;
        void (*run)(uint32_t backend);
    } cases[] = {
        {"stop_from_on_close", stop_from_on_close},
        {"stop_closes_every_descriptor", stop_closes_every_descriptor},
        {"abort_cancels_partly_sent_borrowed", abort_cancels_partly_sent_borrowed},
        {"connections_arriving_during_stop", connections_arriving_during_stop},
        {"half_closed_peer_resets", half_closed_peer_resets},
        {"half_close_watch_releases_its_descriptor", half_close_watch_releases_its_descriptor},
        {"no_callback_after_close", no_callback_after_close},
        {"stats_as_on_close_runs", stats_as_on_close_runs},
        {"receive_buffer_bounds", receive_buffer_bounds},
        {"unix_socket", unix_socket},
    };
    int ran = 0;
    for (int b = 0; b < 2; b++) {
        if (!net_backend_available(NET_BACKENDS[b])) continue;
        const char *backend = NET_BACKENDS[b] == IOE_NET_BACKEND_URING ? "io_uring" : "epoll";
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            if (argc > 1 && strcmp(argv[1], cases[i].name) != 0) continue;
            hang_guard(cases[i].name, 120);
            cases[i].run(NET_BACKENDS[b]);
            alarm(0);
            printf("%s, %s: ok\n", backend, cases[i].name);
        }
        ran++;
    }
    if (ran == 0) return SKIP_EXIT;
    return 0;
}
