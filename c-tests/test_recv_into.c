/* Receiving into the application's buffer (ioe_conn_recv_into), on both
 * server backends: payloads that are already received (copied from the
 * engine's buffers), payloads that arrive after the buffer was given (the
 * kernel receives into it), payloads larger than the socket buffers, a
 * done that asks for the next part, bytes after a payload going back to
 * on_data, a peer that stops or resets halfway, a buffer given after
 * shutdown_write, a close or an abort with a buffer waiting, a server
 * stopped with a buffer waiting, and refusals. Every byte is compared, every done counted
 * exactly once and before on_close, every buffer freed (ASan run). */
#include "net_util.h"

#include <pthread.h>
#include <signal.h>

/* A message: u32 length | flags, u32 seed, then `length` bytes of
 * pattern(seed). Payloads of SMALL bytes or more go through recv_into. */
#define SMALL 64
#define F_ACK 0x80000000u   /* the server sends 'A' once the buffer is given */
#define F_CHAIN 0x40000000u /* received in two parts, the second asked from done */
#define F_SHUT 0x20000000u  /* ack, shutdown_write, then the buffer; done counts, no reply */
#define F_CLOSE 0x10000000u /* the buffer, ack, then ioe_conn_close */
#define F_ABORT 0x08000000u /* the buffer, ack, then ioe_conn_abort */
#define LEN_MASK 0x07ffffffu

struct rx_server {
    struct ioe_server *server;
    atomic_int given, dones, failed_dones, closes, bad, shut_ok;
    atomic_int last_error;
    struct waiter closed, failed, connected;
    struct ioe_conn *kept;
};

/* Per connection: the payload being received. */
struct rx_conn {
    struct rx_server *s;
    uint8_t *buf;
    uint32_t len, seed, flags;
    int part;
};

static void reply(struct ioe_conn *conn, uint32_t seed, uint32_t status) {
    uint32_t out[2] = {seed, status};
    CHECK_EQ(ioe_conn_send(conn, out, sizeof out), 0);
}

static void on_done(struct ioe_conn *conn, void *buf, int64_t result, void *user_data) {
    struct rx_conn *c = user_data;
    struct rx_server *s = c->s;
    atomic_fetch_add(&s->dones, 1);
    if (ioe_conn_context(conn) != c) atomic_fetch_add(&s->bad, 1);
    if (result < 0) {
        atomic_store(&s->last_error, (int)-result);
        atomic_fetch_add(&s->failed_dones, 1);
        free(c->buf);
        c->buf = NULL;
        waiter_signal(&s->failed);
        return;
    }
    if ((c->flags & F_CHAIN) && c->part == 0) {
        /* The first half is in: ask for the second from here. */
        uint32_t half = c->len / 2;
        if (buf != c->buf || result != half) atomic_fetch_add(&s->bad, 1);
        c->part = 1;
        CHECK_EQ(ioe_conn_recv_into(conn, c->buf + half, c->len - half, on_done, c), 0);
        atomic_fetch_add(&s->given, 1);
        return;
    }
    uint8_t *start = c->part ? c->buf : buf;
    uint32_t expect = c->part ? c->len - c->len / 2 : c->len;
    if (result != expect || start != c->buf) atomic_fetch_add(&s->bad, 1);
    if (c->flags & F_SHUT) {
        /* The write side is shut: counted instead of answered. */
        if (matches_pattern(c->buf, c->len, c->seed)) atomic_fetch_add(&s->shut_ok, 1);
        else atomic_fetch_add(&s->bad, 1);
    } else {
        reply(conn, c->seed, matches_pattern(c->buf, c->len, c->seed) ? 0 : 1);
    }
    free(c->buf);
    c->buf = NULL;
}

static size_t rx_on_data(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    struct rx_server *s = user_data;
    struct rx_conn *c = ioe_conn_context(conn);
    const uint8_t *p = data;
    size_t used = 0;
    if (c->buf) atomic_fetch_add(&s->bad, 1); /* on_data while a buffer waits */
    while (len - used >= 8) {
        uint32_t word, seed;
        memcpy(&word, p + used, 4);
        memcpy(&seed, p + used + 4, 4);
        uint32_t n = word & LEN_MASK;
        if (n < SMALL) {
            /* Small: parsed from on_data, whole. */
            if (len - used < 8 + (size_t)n) break;
            reply(conn, seed, matches_pattern(p + used + 8, n, seed) ? 0 : 1);
            used += 8 + n;
            continue;
        }
        c->buf = malloc(n);
        CHECK(c->buf != NULL);
        c->len = n;
        c->seed = seed;
        c->flags = word;
        c->part = 0;
        uint32_t first = (word & F_CHAIN) ? n / 2 : n;
        if (word & F_SHUT) {
            /* Receiving goes on after shutdown_write. */
            CHECK_EQ(ioe_conn_send(conn, "A", 1), 0);
            CHECK_EQ(ioe_conn_shutdown_write(conn), 0);
        }
        CHECK_EQ(ioe_conn_recv_into(conn, c->buf, first, on_done, c), 0);
        atomic_fetch_add(&s->given, 1);
        /* Only one at a time. */
        CHECK_EQ(ioe_conn_recv_into(conn, c->buf, first, on_done, c), -EBUSY);
        if (word & F_ACK) CHECK_EQ(ioe_conn_send(conn, "A", 1), 0);
        if (word & F_CLOSE) CHECK_EQ(ioe_conn_close(conn), 0);
        if (word & F_ABORT) CHECK_EQ(ioe_conn_abort(conn), 0);
        if (word & (F_CLOSE | F_ABORT)) {
            /* Closing: no more buffers. */
            uint8_t byte;
            CHECK_EQ(ioe_conn_recv_into(conn, &byte, 1, on_done, c), -ENOTCONN);
        }
        return used + 8; /* the payload follows into the buffer */
    }
    return used;
}

static void rx_on_connect(struct ioe_conn *conn, void *user_data) {
    struct rx_server *s = user_data;
    struct rx_conn *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->s = s;
    CHECK_EQ(ioe_conn_set_context(conn, c), 0);
    /* Not from on_data: refused. */
    uint8_t byte;
    CHECK_EQ(ioe_conn_recv_into(conn, &byte, 1, on_done, c), -EINVAL);
    if (!s->kept) s->kept = ioe_conn_ref(conn);
    waiter_signal(&s->connected);
}

static void rx_on_close(struct ioe_conn *conn, int error, void *user_data) {
    (void)error;
    struct rx_server *s = user_data;
    struct rx_conn *c = ioe_conn_context(conn);
    /* Every given buffer's done ran before this. */
    if (c->buf) atomic_fetch_add(&s->bad, 1);
    free(c);
    atomic_fetch_add(&s->closes, 1);
    waiter_signal(&s->closed);
}

static struct rx_server *rx_start(uint32_t backend) {
    struct rx_server *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    waiter_init(&s->closed);
    waiter_init(&s->failed);
    waiter_init(&s->connected);
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = 1;
    struct ioe_server_callbacks cbs = {
        .on_connect = rx_on_connect, .on_data = rx_on_data, .on_close = rx_on_close, .user_data = s};
    CHECK_EQ(ioe_server_create(&opts, &cbs, &s->server), 0);
    CHECK_EQ(ioe_server_start(s->server), 0);
    return s;
}

/* Appends one message to `out` (which has room); returns its length. */
static size_t put_message(uint8_t *out, uint32_t len, uint32_t flags, uint32_t seed) {
    uint32_t word = len | flags;
    memcpy(out, &word, 4);
    memcpy(out + 4, &seed, 4);
    fill_pattern(out + 8, len, seed);
    return 8 + (size_t)len;
}

static void expect_replies(int sock, const uint32_t *seeds, size_t count) {
    uint32_t *in = malloc(count * 8);
    CHECK(in != NULL);
    CHECK_EQ(exchange(sock, NULL, 0, (uint8_t *)in, count * 8), count * 8);
    for (size_t i = 0; i < count; i++) {
        CHECK_EQ(in[2 * i], seeds[i]);
        CHECK_EQ(in[2 * i + 1], 0);
    }
    free(in);
}

static const char *const NAMES[2] = {"io_uring", "epoll"};

static void run(uint32_t backend) {
    const char *name = NAMES[backend == IOE_NET_BACKEND_EPOLL];
    struct rx_server *s = rx_start(backend);
    int port = ioe_server_port(s->server);
    int sock = connect_to(port);
    size_t cap = 8u << 20;
    uint8_t *out = malloc(cap);
    CHECK(out != NULL);

    /* 1. Everything in one write: small and large messages back to back,
     * so payloads are mostly copied out of what was already received and
     * the bytes after each go back to on_data. */
    static const uint32_t sizes[] = {1, 63, 64, 65, 4096, 100, 131072, 7, 1u << 20, 4095, 200000, 2};
    size_t n = 0, count = sizeof sizes / sizeof sizes[0];
    uint32_t seeds[64];
    for (size_t i = 0; i < count; i++) {
        seeds[i] = (uint32_t)(100 + i);
        n += put_message(out + n, sizes[i], 0, seeds[i]);
    }
    uint8_t none;
    CHECK_EQ(exchange(sock, out, n, &none, 0), 0);
    expect_replies(sock, seeds, count);

    /* 2. Header first, payload only after the server gave its buffer: the
     * kernel receives into it (1 MiB: more than the socket buffers, so in
     * several pieces), for sizes around the engine's receive buffer. */
    static const uint32_t late[] = {64, 65536, 65537, 1u << 20, 3 * 4096 + 5};
    for (size_t i = 0; i < sizeof late / sizeof late[0]; i++) {
        uint32_t seed = (uint32_t)(200 + i);
        size_t m = put_message(out, late[i], F_ACK, seed);
        uint8_t ack = 0;
        CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
        CHECK_EQ(ack, 'A');
        CHECK_EQ(exchange(sock, out + 8, m - 8, &none, 0), 0);
        expect_replies(sock, &seed, 1);
    }

    /* 3. A done that asks for the next part, with a small message after
     * it in the same write; and the same with the payload sent late. */
    n = put_message(out, 300001, F_CHAIN, 300);
    n += put_message(out + n, 5, 0, 301);
    CHECK_EQ(exchange(sock, out, n, &none, 0), 0);
    uint32_t chain_seeds[2] = {300, 301};
    expect_replies(sock, chain_seeds, 2);
    n = put_message(out, 500000, F_CHAIN | F_ACK, 302);
    uint8_t ack = 0;
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(ack, 'A');
    CHECK_EQ(exchange(sock, out + 8, n - 8, &none, 0), 0);
    uint32_t seed302 = 302;
    expect_replies(sock, &seed302, 1);
    CHECK_EQ(atomic_load(&s->bad), 0);
    CHECK_EQ(atomic_load(&s->dones), atomic_load(&s->given));
    CHECK_EQ(atomic_load(&s->failed_dones), 0);

    /* 4. Refusals on a live connection, from outside its callbacks. */
    waiter_wait(&s->connected, 1);
    uint8_t byte;
    CHECK_EQ(ioe_conn_recv_into(s->kept, &byte, 1, on_done, NULL), -EINVAL);
    CHECK_EQ(ioe_conn_recv_into(s->kept, NULL, 1, on_done, NULL), -EINVAL);
    CHECK_EQ(ioe_conn_recv_into(s->kept, &byte, 0, on_done, NULL), -EINVAL);
    CHECK_EQ(ioe_conn_recv_into(s->kept, &byte, 1, NULL, NULL), -EINVAL);
    CHECK_EQ(ioe_conn_recv_into(NULL, &byte, 1, on_done, NULL), -EINVAL);

    /* 5. The peer stops sending halfway: the done learns -ECONNRESET,
     * before on_close. */
    n = put_message(out, 100000, F_ACK, 400);
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(exchange(sock, out + 8, 50000, &none, 0), 0);
    CHECK_EQ(shutdown(sock, SHUT_WR), 0);
    waiter_wait(&s->failed, 1);
    CHECK_EQ(atomic_load(&s->last_error), ECONNRESET);
    waiter_wait(&s->closed, 1);
    close(sock);

    /* 6. The peer resets halfway: the done learns an error, then on_close. */
    sock = connect_to(port);
    n = put_message(out, 100000, F_ACK, 500);
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(exchange(sock, out + 8, 1000, &none, 0), 0);
    struct linger hard = {.l_onoff = 1, .l_linger = 0};
    CHECK_EQ(setsockopt(sock, SOL_SOCKET, SO_LINGER, &hard, sizeof hard), 0);
    close(sock);
    waiter_wait(&s->failed, 2);
    CHECK(atomic_load(&s->last_error) == ECONNRESET || atomic_load(&s->last_error) == EPIPE);
    waiter_wait(&s->closed, 2);

    /* 7. After shutdown_write the buffer still fills (the client sees the
     * ack, then end of file, then sends the payload). */
    sock = connect_to(port);
    n = put_message(out, 150000, F_SHUT, 700);
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(ack, 'A');
    CHECK_EQ(read_to_eof(sock, &ack, 1), 0);
    CHECK_EQ(exchange(sock, out + 8, n - 8, &none, 0), 0);
    close(sock);
    waiter_wait(&s->closed, 3);
    CHECK_EQ(atomic_load(&s->shut_ok), 1);
    CHECK_EQ(atomic_load(&s->failed_dones), 2);

    /* 8. The application closes, then aborts, with a buffer waiting:
     * -ECANCELED once, before on_close (for the close, once the peer
     * finishes: the close lingers for it). */
    sock = connect_to(port);
    n = put_message(out, 100000, F_ACK | F_CLOSE, 800);
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(read_to_eof(sock, &ack, 1), 0);
    close(sock);
    waiter_wait(&s->failed, 3);
    CHECK_EQ(atomic_load(&s->last_error), ECANCELED);
    waiter_wait(&s->closed, 4);
    sock = connect_to(port);
    /* (An abort drops queued output: no ack to wait for.) */
    n = put_message(out, 100000, F_ABORT, 900);
    CHECK_EQ(write(sock, out, 8), 8);
    waiter_wait(&s->failed, 4);
    CHECK_EQ(atomic_load(&s->last_error), ECANCELED);
    waiter_wait(&s->closed, 5);
    close(sock);

    /* 9. The server stops with a buffer waiting: -ECANCELED, once. */
    sock = connect_to(port);
    n = put_message(out, 100000, F_ACK, 600);
    CHECK_EQ(exchange(sock, out, 8, &ack, 1), 1);
    CHECK_EQ(ioe_server_stop(s->server), 0);
    CHECK_EQ(atomic_load(&s->failed_dones), 5);
    CHECK_EQ(atomic_load(&s->last_error), ECANCELED);
    CHECK_EQ(atomic_load(&s->closes), 6);
    close(sock);

    CHECK_EQ(atomic_load(&s->bad), 0);
    CHECK_EQ(atomic_load(&s->dones), atomic_load(&s->given));
    CHECK_EQ(ioe_conn_unref(s->kept), 0);
    CHECK_EQ(ioe_server_destroy(s->server), 0);
    printf("%s: %d buffers given, %d done (%d failed as expected): ok\n", name, atomic_load(&s->given),
           atomic_load(&s->dones), atomic_load(&s->failed_dones));
    free(out);
    free(s);
}

int main(void) {
    hang_guard("recv_into", 120);
    signal(SIGPIPE, SIG_IGN);
    int fds = count_open_fds();
    int ran = 0;
    for (int i = 0; i < 2; i++) {
        if (!net_backend_available(NET_BACKENDS[i])) continue;
        run(NET_BACKENDS[i]);
        ran++;
    }
    CHECK_EQ(count_open_fds(), fds);
    return ran ? 0 : SKIP_EXIT;
}
