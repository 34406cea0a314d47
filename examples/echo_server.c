/* echo_server [PORT] [THREADS]: a TCP echo server on ioengine. Everything a
 * client sends comes back; SIGINT or SIGTERM stops it gracefully. Prints
 * "listening on port N (backend)" once it accepts connections. */
#define _POSIX_C_SOURCE 200809L
#include <ioengine.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

/* Runs on a loop thread: send the bytes back (copied) and consume them all. */
static size_t echo(struct ioe_conn *conn, const void *data, size_t len, void *user_data) {
    (void)user_data;
    if (ioe_conn_send(conn, data, len) < 0) ioe_conn_abort(conn);
    return len;
}

int main(int argc, char **argv) {
    struct ioe_server_options opts;
    ioe_server_options_init(&opts);
    opts.port = (uint16_t)(argc > 1 ? atoi(argv[1]) : 7777);
    if (argc > 2) opts.threads = (uint32_t)atoi(argv[2]);
    struct ioe_server_callbacks callbacks = {.on_data = echo};

    /* Block the stop signals before the loop threads start (they inherit
     * the mask), then wait for one here. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    struct ioe_server *server;
    int rc = ioe_server_create(&opts, &callbacks, &server);
    if (rc == 0) rc = ioe_server_start(server);
    if (rc < 0) return fprintf(stderr, "echo_server: %s\n", ioe_strerror(rc)), 1;
    printf("listening on port %d (%s)\n", ioe_server_port(server),
           ioe_server_backend(server) == IOE_NET_BACKEND_URING ? "io_uring" : "epoll");
    fflush(stdout);

    int sig;
    sigwait(&stop, &sig);
    struct ioe_net_stats stats;
    ioe_server_stats(server, &stats);
    ioe_server_destroy(server); /* closes every connection, joins the loops */
    printf("stopped: %llu connections served\n", (unsigned long long)stats.accepted);
    return 0;
}
