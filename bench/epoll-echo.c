/* epoll-echo PORT [THREADS]: a TCP echo server written the usual way, the
 * peer the ioengine server is measured against: per thread an epoll set
 * and its own SO_REUSEPORT listener, level-triggered, one read per
 * readable connection and then a send of what was read; output the socket
 * does not take waits for EPOLLOUT (reading pauses meanwhile). Prints
 * "listening on port N" and runs until SIGINT or SIGTERM. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn {
    int fd;
    char *pending; /* bytes read and not yet sent */
    size_t len, off;
};

static int port;

static int listener(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 1024) != 0) {
        perror("epoll-echo: bind/listen");
        exit(1);
    }
    /* Port 0: the first listener's port is the one the others share. */
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    port = ntohs(addr.sin_port);
    return fd;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

static void *serve(void *arg) {
    int lfd = *(int *)arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    static __thread char buf[64 << 10];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (events[i].events & EPOLLOUT) {
                ssize_t w = send(c->fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) { drop(ep, c); continue; }
                if (w > 0) c->off += (size_t)w;
                if (c->off == c->len) {
                    c->off = c->len = 0;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
                continue;
            }
            ssize_t r = read(c->fd, buf, sizeof buf);
            if (r == 0 || (r < 0 && errno != EAGAIN)) { drop(ep, c); continue; }
            if (r < 0) continue;
            ssize_t w = send(c->fd, buf, (size_t)r, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN) { drop(ep, c); continue; }
            if (w < 0) w = 0;
            if (w < r) {
                /* Keep the rest and wait until the socket takes it. */
                c->pending = realloc(c->pending, (size_t)(r - w));
                memcpy(c->pending, buf + w, (size_t)(r - w));
                c->len = (size_t)(r - w);
                c->off = 0;
                struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    port = argc > 1 ? atoi(argv[1]) : 7777;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    int *fds = calloc((size_t)threads, sizeof *fds);
    for (int t = 0; t < threads; t++) {
        fds[t] = listener();
        pthread_t th;
        pthread_create(&th, NULL, serve, &fds[t]);
    }
    printf("listening on port %d\n", port);
    fflush(stdout);
    int sig;
    sigwait(&stop, &sig);
    return 0;
}
