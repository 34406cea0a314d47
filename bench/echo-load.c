/* echo-load: a TCP echo load generator (plain sockets and epoll, not built
 * on ioengine). Opens N connections to an echo server and either keeps D
 * messages in flight on each (closed loop) or sends at a fixed total rate
 * (open loop; latency counts from the time each message was due, so a
 * server that falls behind shows it). Every echoed byte is checked.
 * Prints messages/s, latency percentiles and its own CPU time, as JSON
 * with --json. With --idle it opens the connections, reports, and holds
 * them until stdin closes (for measuring a server's memory per idle
 * connection). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

/* Messages a connection may have due or in flight at once. */
#define DUE_CAP 1024

struct opts {
    const char *host;
    int port, connections, depth, cpu, json, idle;
    size_t size;
    double duration, rate;
};

/* Most bytes one send or recv moves. */
#define IO_CHUNK (256 << 10)

struct conn {
    int fd;
    uint64_t scheduled; /* messages due so far (their due times are in `due`) */
    uint64_t sent_msgs, recv_msgs;
    uint8_t *out;           /* messages built and not yet fully sent */
    size_t out_len, out_off;
    uint8_t *in;            /* a message received in part */
    size_t in_off;
    int writable_wait;      /* EPOLLOUT requested */
    int listed;             /* on the send list */
    uint64_t due[DUE_CAP];  /* when message n was due (ring) */
};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/* Message m of connection c: 8 bytes of tag (connection, sequence), then
 * bytes derived from it, 8 at a time (cheap enough for 64 KiB messages). */
static void make_message(uint8_t *buf, size_t len, uint64_t c, uint64_t m) {
    uint64_t tag = (c << 40) ^ m;
    uint64_t x = tag * 0x9e3779b97f4a7c15ull | 1;
    memcpy(buf, &tag, 8);
    size_t i = 8;
    for (; i + 8 <= len; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    memcpy(buf + i, &x, len - i);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void usage(void) {
    fprintf(stderr,
            "usage: echo-load --port P [--host 127.0.0.1] [--connections N] [--depth D] [--size BYTES]\n"
            "                 [--duration SECONDS] [--rate MSGS_PER_S] [--cpu N] [--json] [--idle]\n");
    exit(2);
}

int main(int argc, char **argv) {
    struct opts o = {.host = "127.0.0.1", .connections = 1, .depth = 1, .size = 64, .duration = 2, .cpu = -1};
    static const struct option longs[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"connections", 1, 0, 'c'}, {"depth", 1, 0, 'd'},
        {"size", 1, 0, 's'}, {"duration", 1, 0, 't'}, {"rate", 1, 0, 'r'}, {"cpu", 1, 0, 'C'},
        {"json", 0, 0, 'j'}, {"idle", 0, 0, 'i'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (ch) {
        case 'h': o.host = optarg; break;
        case 'p': o.port = atoi(optarg); break;
        case 'c': o.connections = atoi(optarg); break;
        case 'd': o.depth = atoi(optarg); break;
        case 's': o.size = (size_t)atol(optarg); break;
        case 't': o.duration = atof(optarg); break;
        case 'r': o.rate = atof(optarg); break;
        case 'C': o.cpu = atoi(optarg); break;
        case 'j': o.json = 1; break;
        case 'i': o.idle = 1; break;
        default: usage();
        }
    }
    if (o.port <= 0 || o.connections <= 0 || o.depth <= 0 || o.size < 8 || o.duration <= 0) usage();
    if (o.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(o.cpu, &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    if (lim.rlim_cur < (rlim_t)o.connections + 64) {
        lim.rlim_cur = lim.rlim_max = (rlim_t)o.connections + 64;
        if (setrlimit(RLIMIT_NOFILE, &lim) != 0) perror("echo-load: raising RLIMIT_NOFILE");
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o.port)};
    inet_pton(AF_INET, o.host, &addr.sin_addr);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)o.connections, sizeof *conns);
    for (int i = 0; i < o.connections; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            fprintf(stderr, "echo-load: connection %d: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        if (o.idle) continue;
        c->out = malloc(o.size > IO_CHUNK ? o.size : IO_CHUNK / o.size * o.size);
        c->in = malloc(o.size);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    if (o.idle) {
        printf("{\"idle_connections\": %d}\n", o.connections);
        fflush(stdout);
        char b;
        while (read(0, &b, 1) > 0) {}
        return 0;
    }

    size_t max_samples = 20 * 1000 * 1000;
    uint64_t *lat = malloc(max_samples * sizeof *lat);
    uint8_t *expected = malloc(o.size);
    uint8_t *rbuf = malloc(IO_CHUNK);
    size_t out_cap = o.size > IO_CHUNK ? o.size : IO_CHUNK / o.size * o.size;
    int *list = malloc((size_t)o.connections * sizeof *list);
    size_t listed = 0;
    size_t samples = 0;
    uint64_t errors = 0, completed = 0, missed = 0;
    int open_loop = o.rate > 0;
    double cpu0 = cpu_seconds();
    uint64_t start = now_ns(), end = start + (uint64_t)(o.duration * 1e9);
    uint64_t interval = open_loop ? (uint64_t)(1e9 / o.rate) : 0, next_due = start;
    uint64_t rr = 0; /* open loop: the next connection in turn */
#define SCHEDULE(index, when)                                        \
    do {                                                             \
        int i_ = (index);                                            \
        struct conn *c_ = &conns[i_];                                \
        if (c_->scheduled - c_->recv_msgs >= DUE_CAP) { missed++; break; } \
        c_->due[c_->scheduled++ % DUE_CAP] = (when);                 \
        if (!c_->listed) { c_->listed = 1; list[listed++] = i_; }    \
    } while (0)
    if (!open_loop)
        for (int i = 0; i < o.connections; i++)
            for (int d = 0; d < o.depth; d++) SCHEDULE(i, start);
    struct epoll_event events[256];
    uint64_t t = now_ns();
    while (t < end) {
        if (open_loop) {
            while (next_due <= t) {
                SCHEDULE((int)(rr++ % (uint64_t)o.connections), next_due);
                next_due += interval;
            }
        }
        /* Send what is due on the listed connections: every due message of a
         * connection in one send (up to IO_CHUNK bytes). */
        size_t keep = 0;
        for (size_t k = 0; k < listed; k++) {
            int i = list[k];
            struct conn *c = &conns[i];
            for (;;) {
                if (c->out_off == c->out_len) {
                    c->out_off = c->out_len = 0;
                    uint64_t now = open_loop ? 0 : now_ns();
                    while (c->sent_msgs < c->scheduled && c->out_len + o.size <= out_cap) {
                        make_message(c->out + c->out_len, o.size, (uint64_t)i, c->sent_msgs);
                        if (!open_loop) c->due[c->sent_msgs % DUE_CAP] = now;
                        c->out_len += o.size;
                        c->sent_msgs++;
                    }
                    if (c->out_len == 0) break;
                }
                ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno != EAGAIN) { perror("echo-load: send"); return 1; }
                    if (!c->writable_wait) {
                        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
                        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                        c->writable_wait = 1;
                    }
                    break;
                }
                c->out_off += (size_t)w;
            }
            if ((c->sent_msgs < c->scheduled || c->out_off < c->out_len) && !c->writable_wait) list[keep++] = i;
            else c->listed = c->writable_wait; /* EPOLLOUT puts it back */
        }
        listed = keep;
        int timeout = listed ? 0 : 10;
        if (open_loop && !listed) {
            uint64_t now = now_ns();
            timeout = next_due > now ? (int)((next_due - now) / 1000000) : 0;
        }
        int n = epoll_wait(ep, events, 256, timeout);
        t = now_ns();
        for (int k = 0; k < n; k++) {
            int i = (int)events[k].data.u32;
            struct conn *c = &conns[i];
            if ((events[k].events & EPOLLOUT) && c->writable_wait) {
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->writable_wait = 0;
                c->listed = 1;
                list[listed++] = i;
            }
            if (!(events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                ssize_t r = recv(c->fd, rbuf, IO_CHUNK, 0);
                if (r == 0) { fprintf(stderr, "echo-load: the server closed a connection\n"); return 1; }
                if (r < 0) {
                    if (errno == EAGAIN) break;
                    perror("echo-load: recv");
                    return 1;
                }
                size_t off = 0, got = (size_t)r;
                while (off < got) {
                    /* Complete the message in progress (or take a whole one in place). */
                    const uint8_t *msg;
                    if (c->in_off == 0 && got - off >= o.size) {
                        msg = rbuf + off;
                        off += o.size;
                    } else {
                        size_t take = o.size - c->in_off < got - off ? o.size - c->in_off : got - off;
                        memcpy(c->in + c->in_off, rbuf + off, take);
                        c->in_off += take;
                        off += take;
                        if (c->in_off < o.size) break;
                        c->in_off = 0;
                        msg = c->in;
                    }
                    /* The message with this sequence number, byte for byte. */
                    make_message(expected, o.size, (uint64_t)i, c->recv_msgs);
                    if (memcmp(expected, msg, o.size) != 0) errors++;
                    if (samples < max_samples) lat[samples++] = t - c->due[c->recv_msgs % DUE_CAP];
                    c->recv_msgs++;
                    completed++;
                    if (!open_loop) SCHEDULE(i, t);
                }
                if ((size_t)r < IO_CHUNK) break;
            }
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    double cpu = cpu_seconds() - cpu0;
    qsort(lat, samples, sizeof *lat, cmp_u64);
#define PCT(p) (samples ? (double)lat[(size_t)((double)(samples - 1) * (p))] / 1000.0 : 0.0)
    double rate = (double)completed / elapsed;
    if (o.json) {
        printf("{\"connections\": %d, \"depth\": %d, \"size\": %zu, \"offered_rate\": %.0f, \"messages\": %llu, "
               "\"msgs_per_s\": %.1f, \"mib_per_s\": %.2f, \"errors\": %llu, \"p50_us\": %.1f, \"p90_us\": %.1f, "
               "\"p99_us\": %.1f, \"p999_us\": %.1f, \"client_cpu_s\": %.3f, \"elapsed_s\": %.3f, \"missed\": %llu}\n",
               o.connections, o.depth, o.size, o.rate, (unsigned long long)completed, rate,
               rate * (double)o.size / (1 << 20), (unsigned long long)errors, PCT(0.5), PCT(0.9), PCT(0.99),
               PCT(0.999), cpu, elapsed, (unsigned long long)missed);
    } else {
        printf("%llu messages in %.2f s: %.0f msgs/s, %.1f MiB/s, %llu errors; latency p50 %.1f p99 %.1f "
               "p99.9 %.1f us; client CPU %.2f s\n",
               (unsigned long long)completed, elapsed, rate, rate * (double)o.size / (1 << 20),
               (unsigned long long)errors, PCT(0.5), PCT(0.99), PCT(0.999), cpu);
    }
    return errors ? 1 : 0;
}
