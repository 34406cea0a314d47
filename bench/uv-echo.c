/* uv-echo PORT: a TCP echo server on libuv (one loop), a peer of the
 * ioengine server in bench/vs_echo.py: read callbacks with buffers from an
 * allocation callback, a copying uv_write per read. Prints "listening on
 * port N" and runs until SIGINT or SIGTERM. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

struct write_req {
    uv_write_t req;
    uv_buf_t buf;
};

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = suggested;
}

static void on_closed(uv_handle_t *h) { free(h); }

static void on_written(uv_write_t *req, int status) {
    struct write_req *w = (struct write_req *)req;
    (void)status;
    free(w->buf.base);
    free(w);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    if (n > 0) {
        struct write_req *w = malloc(sizeof *w);
        w->buf = uv_buf_init(buf->base, (unsigned)n); /* the read buffer is the copy */
        uv_write(&w->req, s, &w->buf, 1, on_written);
        return;
    }
    free(buf->base);
    if (n < 0) uv_close((uv_handle_t *)s, on_closed);
}

static void on_connection(uv_stream_t *server, int status) {
    if (status < 0) return;
    uv_tcp_t *client = malloc(sizeof *client);
    uv_tcp_init(server->loop, client);
    if (uv_accept(server, (uv_stream_t *)client) == 0) {
        uv_tcp_nodelay(client, 1);
        uv_read_start((uv_stream_t *)client, on_alloc, on_read);
    } else {
        uv_close((uv_handle_t *)client, on_closed);
    }
}

static void on_signal(uv_signal_t *sig, int signum) {
    (void)signum;
    uv_stop(sig->loop);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7777;
    uv_loop_t *loop = uv_default_loop();
    uv_tcp_t server;
    uv_tcp_init(loop, &server);
    struct sockaddr_in addr;
    uv_ip4_addr("0.0.0.0", port, &addr);
    if (uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&server, 1024, on_connection) != 0) {
        fprintf(stderr, "uv-echo: cannot listen on %d\n", port);
        return 1;
    }
    uv_signal_t sigint, sigterm;
    uv_signal_init(loop, &sigint);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_signal_init(loop, &sigterm);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    printf("listening on port %d\n", port);
    fflush(stdout);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}
