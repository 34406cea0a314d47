/* The TCP server on both backends (io_uring and epoll), driven by plain
 * socket clients: many concurrent clients with every byte checked,
 * messages far larger than the socket buffers, a client that resets
 * mid-stream, half-close both ways, a slow reader and the high-water
 * callback, sends from another thread (also after the peer left), borrowed
 * sends, stop with live connections, EMFILE at accept, 1,000 concurrent
 * connections, and the process's descriptors and memory afterwards. */
#include "net_util.h"

#include <signal.h>

enum mode { ECHO, DISCARD, FLOOD, SHUTWR, KEEP, REPLY_CLOSE };

struct srv {
    struct ioe_server *server;
    int port;
    enum mode mode;
    size_t flood_bytes;
    struct waiter connects, closes, eofs, high_waters, write_completes;
    atomic_long bytes_in;
    atomic_long closed_clean, closed_reset, closed_cancelled, closed_other;
    atomic_int peer_ok;
    atomic_int send_after_shutdown; /* SHUTWR: what a send after shutdown_write returned */
    struct ioe_conn *kept; /* KEEP: a reference taken in on_connect */
};

static void on_connect(struct ioe_conn *conn, void *user_data) {
    struct srv *s = user_data;
    uint8_t addr[128];
    uint32_t len = sizeof addr;
    if (ioe_conn_peer(conn, addr, &len) == 0 && len == sizeof(struct sockaddr_in) &&
        ((struct sockaddr_in *)addr)->sin_family == AF_INET && ((struct sockaddr_in *)addr)->sin_port != 0)
        atomic_store(&s->peer_ok, 1);
    CHECK(ioe_conn_set_context(conn, s) == 0);
    if (s->mode == FLOOD) {
        /* Queue it all at once: far above the high-water mark. */
        uint8_t *chunk = malloc(1 << 20);
        CHECK(chunk != NULL);
        for (size_t off = 0; off < s->flood_bytes; off += 1 << 20) {
            fill_pattern(chunk, 1 << 20, off >> 20);
            CHECK_EQ(ioe_conn_send(conn, chunk, 1 << 20), 0);
        }
        free(chunk);
    }
    if (s->mode == KEEP) s->kept = ioe_conn_ref(conn);
    waiter_signal(&s->connects);
}

static size_t on_data(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    struct srv *s = user_data;
    CHECK(ioe_conn_context(conn) == s);
    atomic_fetch_add(&s->bytes_in, (long)len);
    switch (s->mode) {
    case ECHO:
        CHECK_EQ(ioe_conn_send(conn, data, len), 0);
        return len;
    case REPLY_CLOSE:
        /* "BYE!": a reply of flood_bytes, then a graceful close. */
        if (len >= 4 && memcmp(data, "BYE!", 4) == 0) {
            uint8_t *reply = malloc(s->flood_bytes);
            CHECK(reply != NULL);
            fill_pattern(reply, s->flood_bytes, 77);
            CHECK_EQ(ioe_conn_send(conn, reply, s->flood_bytes), 0);
            free(reply);
            CHECK_EQ(ioe_conn_close(conn), 0);
        }
        return len;
    case SHUTWR:
        if (len >= 4 && memcmp(data, "SHUT", 4) == 0) {
            CHECK_EQ(ioe_conn_shutdown_write(conn), 0);
            atomic_store(&s->send_after_shutdown, ioe_conn_send(conn, "late", 4));
        }
        return len;
    default:
        return len;
    }
}

static void on_eof(struct ioe_conn *conn, void *user_data) {
    struct srv *s = user_data;
    waiter_signal(&s->eofs);
    /* SHUTWR: the write side is shut already; the connection must end by
     * itself now that both directions are done. */
    if (s->mode != SHUTWR) CHECK_EQ(ioe_conn_close(conn), 0);
}

static void on_high_water(struct ioe_conn *conn, size_t queued, void *user_data) {
    struct srv *s = user_data;
    CHECK(queued > 0 && ioe_conn_queued(conn) >= 0);
    waiter_signal(&s->high_waters);
}

static void on_write_complete(struct ioe_conn *conn, void *user_data) {
    (void)conn;
    waiter_signal(&((struct srv *)user_data)->write_completes);
}

static void on_close(struct ioe_conn *conn, int error, void *user_data) {
    struct srv *s = user_data;
    CHECK_EQ(ioe_conn_is_closed(conn), 1);
    CHECK_EQ(ioe_conn_send(conn, "x", 1), -ENOTCONN);
    if (error == 0) atomic_fetch_add(&s->closed_clean, 1);
    else if (error == ECONNRESET || error == EPIPE) atomic_fetch_add(&s->closed_reset, 1);
    else if (error == ECANCELED) atomic_fetch_add(&s->closed_cancelled, 1);
    else {
        fprintf(stderr, "connection closed with %s\n", strerror(error));
        atomic_fetch_add(&s->closed_other, 1);
    }
    waiter_signal(&s->closes);
}

/* Extra options for the next server started (0: defaults). */
static uint32_t next_flags, next_recv_buffers, next_recv_buffer_size, next_max_connections;
static uint32_t next_linger_ms = UINT32_MAX; /* UINT32_MAX: the default */

static struct srv *start_server(uint32_t backend, uint32_t threads, enum mode mode, uint64_t high_water) {
    struct srv *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    s->mode = mode;
    waiter_init(&s->connects);
    waiter_init(&s->closes);
    waiter_init(&s->eofs);
    waiter_init(&s->high_waters);
    waiter_init(&s->write_completes);
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = threads;
    if (high_water) opts.high_water = high_water;
    opts.flags = next_flags;
    opts.sqpoll_idle_ms = 50;
    if (next_recv_buffers) opts.recv_buffers = next_recv_buffers;
    if (next_recv_buffer_size) opts.recv_buffer_size = next_recv_buffer_size;
    if (next_max_connections) opts.max_connections = next_max_connections;
    if (next_linger_ms != UINT32_MAX) opts.linger_ms = next_linger_ms;
    next_flags = next_recv_buffers = next_recv_buffer_size = next_max_connections = 0;
    next_linger_ms = UINT32_MAX;
    struct ioe_server_callbacks cbs = {.on_connect = on_connect, .on_data = on_data, .on_eof = on_eof,
                                       .on_write_complete = on_write_complete, .on_high_water = on_high_water,
                                       .on_close = on_close, .user_data = s};
    CHECK_EQ(ioe_server_create(&opts, &cbs, &s->server), 0);
    CHECK_EQ(ioe_server_backend(s->server), backend);
    CHECK_EQ(ioe_server_fallback_reason(s->server), 0);
    CHECK_EQ(ioe_server_start(s->server), 0);
    CHECK_EQ(ioe_server_start(s->server), -EINVAL);
    s->port = ioe_server_port(s->server);
    CHECK(s->port > 0);
    CHECK(ioe_server_setup_flags(s->server) >= 0);
    return s;
}

static void stop_server(struct srv *s) {
    CHECK_EQ(ioe_server_stop(s->server), 0);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, 0);
    CHECK_EQ(st.cq_overflows, 0);
    CHECK_EQ(waiter_done(&s->connects), waiter_done(&s->closes)); /* every connection closed once */
    CHECK_EQ((long)st.accepted, waiter_done(&s->connects) + (long)st.rejected);
    CHECK_EQ(ioe_server_destroy(s->server), 0);
    free(s);
}

/* --- many clients ---------------------------------------------------------- */

struct client_job {
    int port;
    uint64_t seed;
    int messages;
    size_t max_size;
};

static void *echo_client(void *arg) {
    struct client_job *job = arg;
    int fd = connect_to(job->port);
    uint8_t *out = malloc(job->max_size), *in = malloc(job->max_size);
    CHECK(out && in);
    uint64_t x = job->seed | 1;
    for (int m = 0; m < job->messages; m++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t len = 1 + (size_t)(x % job->max_size);
        fill_pattern(out, len, job->seed * 1000 + (uint64_t)m);
        CHECK_EQ(exchange(fd, out, len, in, len), len);
        CHECK(memcmp(in, out, len) == 0);
    }
    CHECK(shutdown(fd, SHUT_WR) == 0);
    CHECK_EQ(read_to_eof(fd, in, job->max_size), 0); /* the server closes after its output */
    close(fd);
    free(out);
    free(in);
    return NULL;
}

static void echo_many(uint32_t backend, uint32_t threads) {
    enum { CLIENTS = 24 };
    struct srv *s = start_server(backend, threads, ECHO, 0);
    pthread_t t[CLIENTS];
    struct client_job jobs[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        jobs[i] = (struct client_job){.port = s->port, .seed = (uint64_t)i + 1, .messages = 30, .max_size = 100000};
        CHECK(pthread_create(&t[i], NULL, echo_client, &jobs[i]) == 0);
    }
    for (int i = 0; i < CLIENTS; i++) CHECK(pthread_join(t[i], NULL) == 0);
    waiter_wait(&s->closes, CLIENTS);
    CHECK_EQ(atomic_load(&s->closed_clean), CLIENTS);
    CHECK_EQ(waiter_done(&s->eofs), CLIENTS);
    CHECK_EQ(atomic_load(&s->peer_ok), 1);
    stop_server(s);
}

/* io_uring: a loop with 2 receive buffers of 512 bytes and 16 clients
 * sending at once runs its buffer ring dry (ENOBUFS): receiving pauses and
 * resumes, every byte still comes back, nothing stalls. */
static void starved_receive_buffers(uint32_t backend) {
    enum { CLIENTS = 16 };
    if (backend != IOE_NET_BACKEND_URING) return;
    next_recv_buffers = 2;
    next_recv_buffer_size = 512;
    struct srv *s = start_server(backend, 0, ECHO, 0);
    pthread_t t[CLIENTS];
    struct client_job jobs[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        jobs[i] = (struct client_job){.port = s->port, .seed = (uint64_t)i + 50, .messages = 20, .max_size = 20000};
        CHECK(pthread_create(&t[i], NULL, echo_client, &jobs[i]) == 0);
    }
    for (int i = 0; i < CLIENTS; i++) CHECK(pthread_join(t[i], NULL) == 0);
    waiter_wait(&s->closes, CLIENTS);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK(st.recv_starved > 0); /* the path was taken */
    printf("receive buffers ran out %llu times; every byte came back\n", (unsigned long long)st.recv_starved);
    stop_server(s);
}

/* io_uring: with a kernel thread polling the submission queue (SQPOLL). */
static void sqpoll_echo(uint32_t backend) {
    if (backend != IOE_NET_BACKEND_URING) return;
    next_flags = IOE_SERVER_SQPOLL;
    struct srv *s = start_server(backend, 0, ECHO, 0);
    struct client_job job = {.port = s->port, .seed = 31, .messages = 20, .max_size = 50000};
    echo_client(&job);
    waiter_wait(&s->closes, 1);
    stop_server(s);
}

/* 16 MiB each way at once: far beyond any socket buffer. */
static void large_messages(uint32_t backend) {
    struct srv *s = start_server(backend, 1, ECHO, 0);
    struct client_job job = {.port = s->port, .seed = 77, .messages = 2, .max_size = 16 << 20};
    echo_client(&job);
    waiter_wait(&s->closes, 1);
    stop_server(s);
}

/* A client that resets halfway: its connection ends, the server goes on. */
static void reset_mid_stream(uint32_t backend) {
    struct srv *s = start_server(backend, 0, ECHO, 0);
    int fd = connect_to(s->port);
    static uint8_t buf[1 << 20];
    fill_pattern(buf, sizeof buf, 5);
    CHECK(send(fd, buf, sizeof buf / 2, MSG_NOSIGNAL) > 0);
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    CHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    close(fd); /* RST */
    waiter_wait(&s->closes, 1);
    CHECK_EQ(atomic_load(&s->closed_other), 0);
    struct client_job job = {.port = s->port, .seed = 9, .messages = 5, .max_size = 10000};
    echo_client(&job);
    waiter_wait(&s->closes, 2);
    stop_server(s);
}

/* The client shuts its write side: everything comes back, then EOF. The
 * server shuts its write side: the client sees EOF and can still send. */
static void half_close(uint32_t backend) {
    struct srv *s = start_server(backend, 0, ECHO, 0);
    int fd = connect_to(s->port);
    static uint8_t out[10000], in[20000];
    fill_pattern(out, sizeof out, 3);
    CHECK_EQ(send(fd, out, sizeof out, MSG_NOSIGNAL), sizeof out);
    CHECK(shutdown(fd, SHUT_WR) == 0);
    CHECK_EQ(read_to_eof(fd, in, sizeof in), sizeof out);
    CHECK(memcmp(in, out, sizeof out) == 0);
    close(fd);
    waiter_wait(&s->closes, 1);
    stop_server(s);

    s = start_server(backend, 0, SHUTWR, 0);
    fd = connect_to(s->port);
    CHECK_EQ(send(fd, "SHUT", 4, MSG_NOSIGNAL), 4);
    CHECK_EQ(read_to_eof(fd, in, sizeof in), 0); /* the server's write side is shut */
    CHECK_EQ(atomic_load(&s->send_after_shutdown), -ENOTCONN);
    CHECK_EQ(send(fd, "more!", 5, MSG_NOSIGNAL), 5);
    /* The client finishes too, keeping its socket open: both directions are
     * done, so the server closes the connection by itself (cleanly), and
     * does not spin on it meanwhile. */
    CHECK(shutdown(fd, SHUT_WR) == 0);
    waiter_wait(&s->closes, 1);
    CHECK_EQ(atomic_load(&s->closed_clean), 1);
    CHECK_EQ(atomic_load(&s->bytes_in), 9); /* received after its shutdown too */
    close(fd);
    stop_server(s);
}

/* 32 MiB queued for a client that does not read: high water, then every
 * byte in order once it reads, then write-complete. */
static void slow_reader(uint32_t backend) {
    struct srv *s = start_server(backend, 0, FLOOD, 4 << 20);
    s->flood_bytes = 32 << 20;
    int fd = connect_to(s->port);
    waiter_wait(&s->high_waters, 1);
    CHECK_EQ(waiter_done(&s->write_completes), 0);
    uint8_t *in = malloc(s->flood_bytes), *expected = malloc(1 << 20);
    CHECK(in && expected);
    CHECK_EQ(exchange(fd, NULL, 0, in, s->flood_bytes), s->flood_bytes);
    for (size_t off = 0; off < s->flood_bytes; off += 1 << 20) {
        fill_pattern(expected, 1 << 20, off >> 20);
        CHECK(memcmp(in + off, expected, 1 << 20) == 0);
    }
    waiter_wait(&s->write_completes, 1);
    close(fd);
    waiter_wait(&s->closes, 1);
    free(in);
    free(expected);
    stop_server(s);
}

/* --- other threads --------------------------------------------------------- */


/* A reference taken in a callback: sends from another thread arrive in
 * order; once the peer left they fail cleanly; the handle stays valid. */
static void sends_from_another_thread(uint32_t backend) {
    struct srv *s = start_server(backend, 1, KEEP, 0);
    int fd = connect_to(s->port);
    waiter_wait(&s->connects, 1);
    struct ioe_conn *conn = s->kept;
    CHECK(conn != NULL);
    enum { N = 1000, SIZE = 100 };
    uint8_t msg[SIZE];
    for (int i = 0; i < N; i++) {
        fill_pattern(msg, SIZE, (uint64_t)i);
        CHECK_EQ(ioe_conn_send(conn, msg, SIZE), 0);
    }
    static uint8_t in[N * SIZE];
    CHECK_EQ(exchange(fd, NULL, 0, in, sizeof in), sizeof in);
    for (int i = 0; i < N; i++) CHECK(matches_pattern(in + (size_t)i * SIZE, SIZE, (uint64_t)i));

    /* Borrowed: 1 MiB, not copied. */
    uint8_t *big = malloc(1 << 20);
    CHECK(big != NULL);
    fill_pattern(big, 1 << 20, 99);
    struct borrowed b;
    borrowed_init(&b);
    CHECK_EQ(ioe_conn_send_borrowed(conn, big, 1 << 20, borrowed_done, &b), 0);
    uint8_t *back = malloc(1 << 20);
    CHECK_EQ(exchange(fd, NULL, 0, back, 1 << 20), 1 << 20);
    CHECK(memcmp(back, big, 1 << 20) == 0);
    waiter_wait(&b.done, 1);
    CHECK_EQ(b.result, 1 << 20);

    /* The peer leaves; the handle stays valid and says so. */
    close(fd);
    waiter_wait(&s->closes, 1);
    CHECK_EQ(ioe_conn_is_closed(conn), 1);
    CHECK_EQ(ioe_conn_send(conn, msg, SIZE), -ENOTCONN);
    CHECK_EQ(ioe_conn_send_borrowed(conn, big, 1 << 20, borrowed_done, &b), -ENOTCONN);
    CHECK_EQ(ioe_conn_close(conn), 0);
    CHECK_EQ(ioe_conn_unref(conn), 0);
    free(big);
    free(back);
    stop_server(s);
}

/* Stop with live connections: each gets on_close (ECANCELED). */
static void stop_with_live_connections(uint32_t backend) {
    enum { N = 10 };
    struct srv *s = start_server(backend, 2, ECHO, 0);
    int fds[N];
    for (int i = 0; i < N; i++) fds[i] = connect_to(s->port);
    waiter_wait(&s->connects, N);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, N);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    CHECK_EQ(waiter_done(&s->closes), N);
    CHECK_EQ(atomic_load(&s->closed_cancelled), N);
    uint8_t buf[16];
    for (int i = 0; i < N; i++) {
        CHECK_EQ(read_to_eof(fds[i], buf, sizeof buf), 0);
        close(fds[i]);
    }
    stop_server(s);
}

/* Out of descriptors at accept: the server pauses, then serves once there
 * are descriptors again. */
static void emfile_at_accept(uint32_t backend) {
    struct srv *s = start_server(backend, 0, ECHO, 0);
    enum { N = 4 };
    /* The client sockets first; then every other descriptor number is
     * taken (io_uring's accept checks RLIMIT_NOFILE as it was when it was
     * armed, so only a full table makes it fail), and the clients connect
     * (connecting takes no descriptor). */
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fds[i] >= 0);
    }
    struct rlimit lim;
    CHECK(getrlimit(RLIMIT_NOFILE, &lim) == 0);
    int *filler = malloc(lim.rlim_cur * sizeof *filler);
    CHECK(filler != NULL);
    size_t filled = 0;
    for (int fd; (fd = dup(0)) >= 0;) filler[filled++] = fd;
    CHECK_EQ(errno, EMFILE);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < N; i++) CHECK(connect(fds[i], (struct sockaddr *)&addr, sizeof addr) == 0);
    /* The server tried and paused (its counter says so). */
    for (time_t start = time(NULL);; sched_yield()) {
        struct ioe_net_stats st;
        CHECK_EQ(ioe_server_stats(s->server, &st), 0);
        if (st.accept_pauses > 0) break;
        CHECK(time(NULL) - start < 60);
    }
    for (size_t i = 0; i < filled; i++) close(filler[i]);
    free(filler);
    for (int i = 0; i < N; i++) {
        uint8_t out[64], in[64];
        fill_pattern(out, sizeof out, (uint64_t)i);
        CHECK_EQ(exchange(fds[i], out, sizeof out, in, sizeof in), sizeof in);
        CHECK(memcmp(in, out, sizeof out) == 0);
        close(fds[i]);
    }
    waiter_wait(&s->closes, N);
    stop_server(s);
}

/* max_connections holds across loops: 3 of 5 clients are served. */
static void connection_limit(uint32_t backend) {
    enum { N = 5, MAX = 3 };
    next_max_connections = MAX;
    struct srv *s = start_server(backend, 2, ECHO, 0);
    int fds[N];
    for (int i = 0; i < N; i++) fds[i] = connect_to(s->port);
    /* The two beyond the limit are closed at once: they read end of file. */
    int refused = 0;
    for (int i = MAX; i < N; i++) {
        uint8_t b;
        refused += read_to_eof(fds[i], &b, 1) == 0;
    }
    CHECK_EQ(refused, N - MAX);
    waiter_wait(&s->connects, MAX);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, MAX);
    CHECK_EQ(st.rejected, N - MAX);
    for (int i = 0; i < MAX; i++) {
        uint8_t out[16], in[16];
        fill_pattern(out, sizeof out, (uint64_t)i);
        CHECK_EQ(exchange(fds[i], out, sizeof out, in, sizeof in), sizeof in);
        CHECK(memcmp(in, out, sizeof out) == 0);
    }
    for (int i = 0; i < N; i++) close(fds[i]);
    waiter_wait(&s->closes, MAX);
    stop_server(s);
}

/* --- lingering close ----------------------------------------------------- */

enum peer_after_reply { PEER_SENDS_THEN_CLOSES, PEER_STAYS, SERVER_STOPS };

/* The server answers "BYE!" with a reply larger than the client's receive
 * window and closes gracefully; the client has not read the reply yet when
 * the close is under way. Closing the socket outright would let data the
 * client sends next (a pipelined request) make the kernel reset the
 * connection and drop the part of the reply still in the send buffer. With
 * lingering the client gets the whole reply and a clean end of file,
 * whatever it sends late, and the connection closes when the client does
 * (or the linger time passes, or the server stops). */
static void reply_then_close(uint32_t backend, enum peer_after_reply peer) {
    const size_t reply_len = 256 << 10;
    if (peer == PEER_STAYS) next_linger_ms = 50;
    struct srv *s = start_server(backend, 0, REPLY_CLOSE, 0);
    s->flood_bytes = reply_len;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    int small = 4096; /* most of the reply waits in the server's send buffer */
    CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small) == 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
    CHECK_EQ(send(fd, "BYE!", 4, MSG_NOSIGNAL), 4);
    /* Wait until the server is closing: the whole reply handed to the
     * kernel and the connection lingering (or, without lingering, closed). */
    for (time_t start = time(NULL);; sched_yield()) {
        struct ioe_net_stats st;
        CHECK_EQ(ioe_server_stats(s->server, &st), 0);
        if (st.lingering == 1 || waiter_done(&s->closes) == 1) break;
        CHECK(time(NULL) - start < 60);
    }
    if (peer == SERVER_STOPS) {
        /* The lingering connection closes, cleanly: its output is out. */
        CHECK_EQ(ioe_server_stop(s->server), 0);
        CHECK_EQ(atomic_load(&s->closed_clean), 1);
    } else if (peer == PEER_SENDS_THEN_CLOSES) {
        uint8_t late[1000];
        memset(late, 'x', sizeof late);
        CHECK_EQ(send(fd, late, sizeof late, MSG_NOSIGNAL), (ssize_t)sizeof late);
    }
    uint8_t *reply = malloc(reply_len), *want = malloc(reply_len);
    CHECK(reply != NULL && want != NULL);
    fill_pattern(want, reply_len, 77);
    CHECK_EQ(read_to_eof(fd, reply, reply_len), reply_len);
    CHECK(memcmp(reply, want, reply_len) == 0);
    free(reply);
    free(want);
    /* PEER_STAYS: the linger time passes and the server closes first. */
    if (peer == PEER_STAYS) waiter_wait(&s->closes, 1);
    close(fd);
    waiter_wait(&s->closes, 1);
    CHECK_EQ(atomic_load(&s->closed_clean), 1);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.lingering, 0);
    stop_server(s);
}

/* 1,000 connections at once, each echoing 64 bytes, from one thread. */
static void thousand_connections(uint32_t backend) {
    enum { N = 1000 };
    struct srv *s = start_server(backend, 2, ECHO, 0);
    static int fds[N];
    static uint8_t got[N][64];
    static size_t have[N];
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(s->port);
        uint8_t out[64];
        fill_pattern(out, sizeof out, (uint64_t)i + 500);
        CHECK_EQ(send(fds[i], out, sizeof out, MSG_NOSIGNAL), sizeof out);
        have[i] = 0;
    }
    static struct pollfd p[N];
    int done = 0;
    time_t start = time(NULL);
    while (done < N) {
        CHECK(time(NULL) - start < 60);
        int n = 0;
        for (int i = 0; i < N; i++)
            if (have[i] < 64) p[n++] = (struct pollfd){.fd = fds[i], .events = POLLIN};
        int ready = poll(p, (nfds_t)n, 1000);
        if (ready <= 0) continue;
        for (int k = 0; k < n; k++) {
            if (!(p[k].revents & POLLIN)) continue;
            int i = 0;
            while (fds[i] != p[k].fd) i++;
            ssize_t r = recv(fds[i], got[i] + have[i], 64 - have[i], 0);
            CHECK(r > 0);
            have[i] += (size_t)r;
            if (have[i] == 64) {
                CHECK(matches_pattern(got[i], 64, (uint64_t)i + 500));
                done++;
            }
        }
    }
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(s->server, &st), 0);
    CHECK_EQ(st.connections, N);
    for (int i = 0; i < N; i++) close(fds[i]);
    waiter_wait(&s->closes, N);
    stop_server(s);
}

static void bad_arguments(void) {
    struct ioe_server_options opts;
    struct ioe_server_callbacks cbs = {.on_data = net_util_discard};
    struct ioe_server *srv = (struct ioe_server *)1;
    CHECK_EQ(ioe_server_options_init(NULL), -EINVAL);
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    CHECK_EQ(ioe_server_create(NULL, &cbs, &srv), -EINVAL);
    CHECK(srv == NULL);
    CHECK_EQ(ioe_server_create(&opts, NULL, &srv), -EINVAL);
    CHECK_EQ(ioe_server_create(&opts, &cbs, NULL), -EINVAL);
    struct ioe_server_callbacks no_data = {0};
    CHECK_EQ(ioe_server_create(&opts, &no_data, &srv), -EINVAL);
    opts.address = "not an address";
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.flags = IOE_SERVER_IOPOLL; /* sockets cannot be busy-polled this way */
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);
    opts.flags = 1u << 30;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.backend = 7;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.recv_buffers = 1000; /* not a power of two */
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.reserved[1] = 1;
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), -EINVAL);

    /* A port in use. */
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    CHECK_EQ(ioe_server_create(&opts, &cbs, &srv), 0);
    struct ioe_server *second = NULL;
    opts.port = (uint16_t)ioe_server_port(srv);
    CHECK_EQ(ioe_server_create(&opts, &cbs, &second), -EADDRINUSE);
    CHECK(second == NULL);
    CHECK_EQ(ioe_server_destroy(srv), 0); /* never started */

    CHECK_EQ(ioe_server_start(NULL), -EINVAL);
    CHECK_EQ(ioe_server_stop(NULL), -EINVAL);
    CHECK_EQ(ioe_server_destroy(NULL), -EINVAL);
    CHECK_EQ(ioe_server_port(NULL), -EINVAL);
    CHECK_EQ(ioe_server_backend(NULL), -EINVAL);
    CHECK_EQ(ioe_server_fallback_reason(NULL), -EINVAL);
    CHECK_EQ(ioe_server_setup_flags(NULL), -EINVAL);
    struct ioe_net_stats st;
    CHECK_EQ(ioe_server_stats(NULL, &st), -EINVAL);
    CHECK(ioe_conn_ref(NULL) == NULL);
    CHECK_EQ(ioe_conn_unref(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_send(NULL, "x", 1), -EINVAL);
    CHECK_EQ(ioe_conn_send_borrowed(NULL, "x", 1, borrowed_done, NULL), -EINVAL);
    CHECK_EQ(ioe_conn_queued(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_close(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_shutdown_write(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_abort(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_is_closed(NULL), -EINVAL);
    CHECK_EQ(ioe_conn_set_context(NULL, NULL), -EINVAL);
    CHECK(ioe_conn_context(NULL) == NULL);
    uint32_t len = 0;
    CHECK_EQ(ioe_conn_peer(NULL, &st, &len), -EINVAL);
}

#define STEP(call)                                  \
    do {                                            \
        fprintf(stderr, "  %s\n", #call);            \
        call;                                       \
    } while (0)

static void run(uint32_t backend) {
    int fds = count_open_fds();
    STEP(echo_many(backend, 0));
    STEP(echo_many(backend, 2));
    STEP(large_messages(backend));
    STEP(starved_receive_buffers(backend));
    STEP(sqpoll_echo(backend));
    STEP(reset_mid_stream(backend));
    STEP(half_close(backend));
    STEP(slow_reader(backend));
    STEP(sends_from_another_thread(backend));
    STEP(stop_with_live_connections(backend));
    STEP(emfile_at_accept(backend));
    STEP(connection_limit(backend));
    STEP(reply_then_close(backend, PEER_SENDS_THEN_CLOSES));
    STEP(reply_then_close(backend, PEER_STAYS));
    STEP(reply_then_close(backend, SERVER_STOPS));
    long rss_before = rss_kib();
    thousand_connections(backend);
    long rss_after = rss_kib();
    CHECK_EQ(count_open_fds(), fds);
    /* Memory back where it was (allocator caches aside). */
    CHECK(rss_after - rss_before < 4096);
    printf("%s: every scenario passed; RSS %ld -> %ld KiB around 1,000 connections\n",
           backend == IOE_NET_BACKEND_URING ? "io_uring" : "epoll", rss_before, rss_after);
}

int main(void) {
    /* Room for 1,000 connections (two descriptors each, in this process). */
    struct rlimit lim;
    CHECK(getrlimit(RLIMIT_NOFILE, &lim) == 0);
    if (lim.rlim_cur < 4096 && lim.rlim_max >= 4096) {
        lim.rlim_cur = 4096;
        CHECK(setrlimit(RLIMIT_NOFILE, &lim) == 0);
    }
    bad_arguments();
    int ran = 0;
    for (int b = 0; b < 2; b++) {
        if (!net_backend_available(NET_BACKENDS[b])) continue;
        run(NET_BACKENDS[b]);
        ran++;
    }
    if (ran == 0) return SKIP_EXIT;
    printf("net: ok\n");
    return 0;
}
