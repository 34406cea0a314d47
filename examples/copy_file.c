/* copy_file SRC DST: copies a file with ioengine, keeping up to 32 chunks in
 * flight. Each read's callback submits the write of the same chunk, showing
 * that callbacks may submit; destroy waits for the last write. */
#include <ioengine.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define IN_FLIGHT 32

struct chunk {
    struct ioe_context *ctx;
    int dst;
    char *buf;
    uint64_t offset;
};

static atomic_int errors;

static void written(void *arg, int64_t result) {
    struct chunk *c = arg;
    if (result < 0) {
        fprintf(stderr, "write at %llu: %s\n", (unsigned long long)c->offset, ioe_strerror((int)result));
        atomic_fetch_add(&errors, 1);
    }
}

static void was_read(void *arg, int64_t result) {
    struct chunk *c = arg;
    if (result < 0) {
        fprintf(stderr, "read at %llu: %s\n", (unsigned long long)c->offset, ioe_strerror((int)result));
        atomic_fetch_add(&errors, 1);
        return;
    }
    /* A short read only happens at end of file: write what was read. */
    if (result > 0 && ioe_write(c->ctx, c->dst, c->buf, (uint64_t)result, c->offset, IOE_CHANNEL_WRITE, written, c) < 0)
        atomic_fetch_add(&errors, 1);
}

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: %s SRC DST\n", argv[0]), 2;
    int src = open(argv[1], O_RDONLY);
    int dst = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    struct stat st;
    if (src < 0 || dst < 0 || fstat(src, &st) < 0) return perror("open"), 1;

    struct ioe_context_options opts;
    ioe_context_options_init(&opts);
    opts.depth = IN_FLIGHT;
    struct ioe_context *ctx;
    int rc = ioe_context_create(&opts, &ctx);
    if (rc < 0) return fprintf(stderr, "ioe_context_create: %s\n", ioe_strerror(rc)), 1;

    size_t nchunks = ((size_t)st.st_size + CHUNK - 1) / CHUNK;
    struct chunk *chunks = calloc(nchunks ? nchunks : 1, sizeof *chunks);
    char *mem = malloc(nchunks ? nchunks * CHUNK : 1); /* one buffer per chunk: simple, not frugal */
    if (!chunks || !mem) return fprintf(stderr, "out of memory\n"), 1;
    for (size_t i = 0; i < nchunks; i++) {
        chunks[i] = (struct chunk){ctx, dst, mem + i * CHUNK, (uint64_t)i * CHUNK};
        rc = ioe_read(ctx, src, chunks[i].buf, CHUNK, chunks[i].offset, IOE_CHANNEL_READ, was_read, &chunks[i]);
        if (rc < 0) return fprintf(stderr, "ioe_read: %s\n", ioe_strerror(rc)), 1;
    }
    int backend = ioe_context_backend(ctx);
    ioe_context_destroy(ctx); /* every read, and every write its callback queued, completes */
    printf("copied %lld bytes in %zu chunks with %s, %d errors\n", (long long)st.st_size, nchunks,
           ioe_backend_name((uint32_t)backend), atomic_load(&errors));
    free(chunks);
    free(mem);
    close(src);
    close(dst);
    return atomic_load(&errors) != 0;
}
