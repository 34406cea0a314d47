/* A minimal program built against an installed ioengine: writes a block,
 * reads it back, compares. */
#define _GNU_SOURCE
#include <errno.h>
#include <ioengine.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_long done;
static atomic_long failed;

static void on_done(void *user_data, int64_t result) {
    if (result != (int64_t)(size_t)user_data) atomic_fetch_add(&failed, 1);
    atomic_fetch_add(&done, 1);
}

int main(void) {
    char path[] = "/tmp/ioe-consumer-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) return 1;
    unlink(path);

    static char out[4096], in[4096];
    memset(out, 'x', sizeof out);
    /* Destroy drains, so it doubles as "wait for everything submitted". */
    for (int step = 0; step < 2; step++) {
        struct ioe_context *ctx = NULL;
        int rc = ioe_context_create(NULL, &ctx);
        if (rc != 0) {
            fprintf(stderr, "ioe_context_create: %s\n", ioe_strerror(rc));
            return 1;
        }
        rc = step == 0 ? ioe_write(ctx, fd, out, sizeof out, 0, IOE_CHANNEL_WRITE, on_done, (void *)sizeof out)
                       : ioe_read(ctx, fd, in, sizeof in, 0, IOE_CHANNEL_READ, on_done, (void *)sizeof in);
        if (rc != 0 || ioe_context_destroy(ctx) != 0) return 1;
    }
    if (atomic_load(&done) != 2 || atomic_load(&failed) != 0 || memcmp(in, out, sizeof in) != 0) {
        fprintf(stderr, "consumer: data mismatch\n");
        return 1;
    }
    printf("consumer: ok with ioengine %s\n", ioe_version_string());
    close(fd);
    return 0;
}
