/* Helpers for the server tests: a plain-socket client (not built on the
 * library), waiting with hang guards, and a counting test server. */
#ifndef IOE_NET_UTIL_H
#define IOE_NET_UTIL_H

#include "test_util.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>

static const uint32_t NET_BACKENDS[2] = {IOE_NET_BACKEND_URING, IOE_NET_BACKEND_EPOLL};

static inline size_t net_util_discard(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    (void)conn;
    (void)data;
    (void)user_data;
    return len;
}

/* A borrowed send's outcome: `done` counts the call, `result` is what it
 * got (written before the waiter is signalled, read after waiting). */
struct borrowed {
    struct waiter done;
    int64_t result;
};

static inline void borrowed_init(struct borrowed *b) {
    waiter_init(&b->done);
    b->result = INT64_MIN;
}

static inline void borrowed_done(void *user_data, int64_t result) {
    struct borrowed *b = user_data;
    b->result = result;
    waiter_signal(&b->done);
}

/* Whether a server backend can run here (reported once if not). */
static inline int net_backend_available(uint32_t backend) {
    static int known[3] = {-1, -1, -1};
    if (known[backend] >= 0) return known[backend];
    struct ioe_server_options opts;
    CHECK_EQ(ioe_server_options_init(&opts), 0);
    opts.address = "127.0.0.1";
    opts.backend = backend;
    opts.threads = 0;
    struct ioe_server_callbacks cbs = {.on_data = net_util_discard};
    struct ioe_server *srv = NULL;
    int rc = ioe_server_create(&opts, &cbs, &srv);
    if (rc == 0) {
        CHECK_EQ(ioe_server_destroy(srv), 0);
        known[backend] = 1;
    } else if (rc == -ENOSYS || rc == -EPERM || rc == -EACCES || rc == -EOPNOTSUPP) {
        printf("SKIP net backend %u: not available here (%s)\n", backend, ioe_strerror(rc));
        known[backend] = 0;
    } else {
        fprintf(stderr, "ioe_server_create(backend %u): %s\n", backend, ioe_strerror(rc));
        exit(1);
    }
    return known[backend];
}

static inline int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Sends `out` and receives `in_len` bytes into `in` at the same time (the
 * echo of a message larger than the socket buffers needs both), with a hang
 * guard. Returns the bytes received (less only at end of file). */
static inline size_t exchange(int fd, const uint8_t *out, size_t out_len, uint8_t *in, size_t in_len) {
    size_t sent = 0, got = 0;
    time_t start = time(NULL);
    while (got < in_len || sent < out_len) {
        struct pollfd p = {.fd = fd, .events = (short)((got < in_len ? POLLIN : 0) | (sent < out_len ? POLLOUT : 0))};
        int n = poll(&p, 1, 1000);
        CHECK(n >= 0 || errno == EINTR);
        if (time(NULL) - start > 60) {
            fprintf(stderr, "hang: sent %zu of %zu, received %zu of %zu after 60 s\n", sent, out_len, got, in_len);
            exit(1);
        }
        if (n <= 0) continue;
        if ((p.revents & POLLOUT) && sent < out_len) {
            ssize_t w = send(fd, out + sent, out_len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) sent += (size_t)w;
            else CHECK(errno == EAGAIN || errno == EINTR);
        }
        if ((p.revents & (POLLIN | POLLHUP | POLLERR)) && got < in_len) {
            ssize_t r = recv(fd, in + got, in_len - got, MSG_DONTWAIT);
            if (r == 0) return got;
            if (r > 0) got += (size_t)r;
            else CHECK(errno == EAGAIN || errno == EINTR);
        }
    }
    return got;
}

/* Reads until end of file (with a hang guard); returns the bytes read. */
static inline size_t read_to_eof(int fd, uint8_t *buf, size_t cap) {
    size_t got = 0;
    time_t start = time(NULL);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, 1000);
        CHECK(time(NULL) - start <= 60);
        if (n <= 0) continue;
        uint8_t scratch[4096];
        uint8_t *dst = got < cap ? buf + got : scratch;
        size_t room = got < cap ? cap - got : sizeof scratch;
        ssize_t r = recv(fd, dst, room, 0);
        if (r == 0) return got;
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == ECONNRESET) return got;
            CHECK(r >= 0);
        }
        got += (size_t)r;
    }
}

/* Resident memory of this process in KiB. */
static inline long rss_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    CHECK(f != NULL);
    long pages = 0, resident = 0;
    CHECK(fscanf(f, "%ld %ld", &pages, &resident) == 2);
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

#endif
