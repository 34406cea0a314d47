/* Quick start: write a block to a file and read it back with ioengine. */
#include <ioengine.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void done(void *what, int64_t result) {
    /* Runs on an engine thread; result is bytes or -errno. */
    printf("%s: %s\n", (const char *)what, result < 0 ? ioe_strerror((int)result) : "ok");
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "quickstart.dat";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    struct ioe_context *ctx;
    int rc = ioe_context_create(NULL, &ctx);        /* defaults: auto backend, depth 128 */
    if (fd < 0 || rc < 0) return fprintf(stderr, "setup failed: %s\n", ioe_strerror(rc)), 1;
    printf("backend: %s\n", ioe_backend_name((uint32_t)ioe_context_backend(ctx)));

    static char out[4096] = "hello, ioengine", in[4096];
    ioe_write(ctx, fd, out, sizeof out, 0, IOE_CHANNEL_WRITE, done, "write");
    /* Requests run concurrently; IOE_REQ_DRAIN makes the fsync wait for the
     * write (and anything accepted before it), so it covers the write. */
    struct ioe_request sync = {.op = IOE_OP_FSYNC, .channel = IOE_CHANNEL_WRITE, .fd = fd,
                               .callback = done, .user_data = "fsync", .flags = IOE_REQ_DRAIN};
    ioe_submit(ctx, &sync);
    ioe_context_destroy(ctx);                        /* drains: waits for both callbacks */

    ioe_context_create(NULL, &ctx);
    ioe_read(ctx, fd, in, sizeof in, 0, IOE_CHANNEL_READ, done, "read");
    ioe_context_destroy(ctx);
    printf("read back: \"%s\" (%s)\n", in, memcmp(in, out, sizeof in) ? "MISMATCH" : "identical");
    close(fd);
    return memcmp(in, out, sizeof in) != 0;
}
