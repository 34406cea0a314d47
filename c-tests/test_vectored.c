/* Vectored reads and writes (IOE_OP_READV / IOE_OP_WRITEV) on both
 * backends, inline and pool callbacks: scattered writes of odd-sized
 * pieces read back through a differently split iovec array and with
 * pread(2); O_DIRECT with aligned pieces; end of file; streams; the
 * iovec array is copied at submission; bad arrays are refused. */
#include "test_util.h"

#include <sys/socket.h>
#include <sys/uio.h>

#define REGION 65536
#define WRITES 8

static struct ioe_request vreq(uint32_t op, int fd, struct iovec *iov, int count, uint64_t offset, struct slot *s) {
    return (struct ioe_request){.op = op, .channel = op == IOE_OP_READV ? IOE_CHANNEL_READ : IOE_CHANNEL_WRITE,
                                .fd = fd, .buf = iov, .len = (uint64_t)count, .offset = offset,
                                .callback = on_complete, .user_data = s};
}

/* Splits `len` bytes at `base` into pieces of pseudo-random sizes (zero-length
 * ones included) and returns how many iovecs it wrote. */
static int split(uint8_t *base, size_t len, struct iovec *iov, int max, uint64_t seed) {
    int n = 0;
    size_t at = 0;
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 7;
    while (at < len && n < max - 1) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t piece = x % 5000;
        if (piece > len - at) piece = len - at;
        iov[n].iov_base = base + at;
        iov[n].iov_len = piece;
        at += piece;
        n++;
    }
    iov[n].iov_base = base + at;
    iov[n].iov_len = len - at;
    return n + 1;
}

static void scattered(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(0, 0);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    struct waiter w;
    waiter_init(&w);
    uint8_t *data = malloc((size_t)WRITES * REGION);
    CHECK(data != NULL);
    struct iovec iov[WRITES][64];
    struct slot *writes = slots_new(WRITES, &w);
    struct ioe_request reqs[WRITES];
    for (int i = 0; i < WRITES; i++) {
        uint8_t *region = data + (size_t)i * REGION;
        fill_pattern(region, REGION, (uint64_t)i + 100);
        int n = split(region, REGION, iov[i], 64, (uint64_t)i);
        reqs[i] = vreq(IOE_OP_WRITEV, fd, iov[i], n, (uint64_t)i * REGION, &writes[i]);
    }
    /* Half one by one, half in a batch; the arrays are copied at
     * submission, so scribbling over them afterwards changes nothing. */
    for (int i = 0; i < WRITES / 2; i++) CHECK_EQ(ioe_submit(ctx, &reqs[i]), 0);
    CHECK_EQ(ioe_submit_batch(ctx, reqs + WRITES / 2, WRITES / 2), WRITES / 2);
    memset(iov, 0xff, sizeof iov);
    waiter_wait(&w, WRITES);
    slots_check_once(writes, WRITES);
    for (int i = 0; i < WRITES; i++) CHECK_EQ(writes[i].result, REGION);

    uint8_t *check = malloc(REGION);
    CHECK(check != NULL);
    for (int i = 0; i < WRITES; i++) {
        CHECK_EQ(pread(fd, check, REGION, (off_t)i * REGION), REGION);
        CHECK(matches_pattern(check, REGION, (uint64_t)i + 100));
    }

    /* Read back split another way. */
    uint8_t *back = calloc(WRITES, REGION);
    CHECK(back != NULL);
    struct slot *reads = slots_new(WRITES, &w);
    for (int i = 0; i < WRITES; i++) {
        int n = split(back + (size_t)i * REGION, REGION, iov[i], 64, (uint64_t)i + 1000);
        reqs[i] = vreq(IOE_OP_READV, fd, iov[i], n, (uint64_t)i * REGION, &reads[i]);
        CHECK_EQ(ioe_submit(ctx, &reqs[i]), 0);
    }
    waiter_wait(&w, 2 * WRITES);
    slots_check_once(reads, WRITES);
    for (int i = 0; i < WRITES; i++) {
        CHECK_EQ(reads[i].result, REGION);
        CHECK(matches_pattern(back + (size_t)i * REGION, REGION, (uint64_t)i + 100));
    }

    /* At end of file: the bytes that exist, spread over the pieces. */
    CHECK(ftruncate(fd, (off_t)WRITES * REGION - 1000) == 0);
    memset(back, 0, REGION);
    struct iovec tail[3] = {{back, 600}, {back + 600, 0}, {back + 600, 3000}};
    struct slot *eof = slots_new(1, &w);
    struct ioe_request r = vreq(IOE_OP_READV, fd, tail, 3, (uint64_t)WRITES * REGION - 1500, eof);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 2 * WRITES + 1);
    CHECK_EQ(eof[0].result, 500);
    CHECK(memcmp(back, data + (size_t)WRITES * REGION - 1500, 500) == 0);

    struct ioe_stats stats;
    CHECK_EQ(ioe_context_stats(ctx, &stats), 0);
    CHECK_EQ(stats.completed, 2 * WRITES + 1);
    CHECK_EQ(stats.failed, 0);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(writes);
    free(reads);
    free(eof);
    free(back);
    free(check);
    free(data);
    close(fd);
}

/* O_DIRECT: aligned pieces, written and read back from the device. */
static void direct(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(1 << 20, O_DIRECT);
    struct ioe_context *ctx = open_context(backend, 8, workers);
    struct waiter w;
    waiter_init(&w);
    enum { PIECES = 4, PIECE = 4096 };
    void *mem[PIECES], *in[PIECES];
    struct iovec out_iov[PIECES], in_iov[PIECES];
    for (int i = 0; i < PIECES; i++) {
        CHECK_EQ(ioe_buffer_alloc(PIECE, 4096, &mem[i]), 0);
        CHECK_EQ(ioe_buffer_alloc(PIECE, 4096, &in[i]), 0);
        fill_pattern(mem[i], PIECE, (uint64_t)i + 7);
        out_iov[i] = (struct iovec){mem[i], PIECE};
        in_iov[PIECES - 1 - i] = (struct iovec){in[i], PIECE};
    }
    struct slot *s = slots_new(2, &w);
    struct ioe_request r = vreq(IOE_OP_WRITEV, fd, out_iov, PIECES, 65536, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 1);
    CHECK_EQ(s[0].result, PIECES * PIECE);
    r = vreq(IOE_OP_READV, fd, in_iov, PIECES, 65536, &s[1]);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 2);
    CHECK_EQ(s[1].result, PIECES * PIECE);
    /* in_iov took the pieces in reverse buffer order. */
    for (int i = 0; i < PIECES; i++) CHECK(matches_pattern(in[PIECES - 1 - i], PIECE, (uint64_t)i + 7));
    slots_check_once(s, 2);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    for (int i = 0; i < PIECES; i++) {
        ioe_buffer_free(mem[i]);
        ioe_buffer_free(in[i]);
    }
    free(s);
    close(fd);
}

/* A socket: writev sends every piece, readv gets what arrived. */
static void streams(uint32_t backend, struct ioe_workers *workers) {
    struct ioe_context *ctx = open_context(backend, 4, workers);
    struct waiter w;
    waiter_init(&w);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    char a[] = "vector", b[] = "ed io";
    struct iovec out[2] = {{a, 6}, {b, 5}};
    struct slot *s = slots_new(2, &w);
    struct ioe_request r = vreq(IOE_OP_WRITEV, sv[0], out, 2, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 1);
    CHECK_EQ(s[0].result, 11);
    char x[4] = {0}, y[64] = {0};
    struct iovec in[2] = {{x, 4}, {y, 64}};
    r = vreq(IOE_OP_READV, sv[1], in, 2, 0, &s[1]);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 2);
    CHECK_EQ(s[1].result, 11);
    CHECK(memcmp(x, "vect", 4) == 0);
    CHECK(memcmp(y, "ored io", 7) == 0);
    slots_check_once(s, 2);
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(sv[0]);
    close(sv[1]);
}

/* Bad arrays are refused at once, with no callback; the context goes on. */
static void refusals(uint32_t backend, struct ioe_workers *workers) {
    int fd = temp_file(1 << 16, 0);
    struct ioe_context *ctx = open_context(backend, 4, workers);
    struct waiter w;
    waiter_init(&w);
    struct slot *s = slots_new(1, &w);
    static struct iovec many[IOE_MAX_IOVECS + 1];
    static uint8_t bytes[(IOE_MAX_IOVECS + 1) * 16];
    for (int i = 0; i <= (int)IOE_MAX_IOVECS; i++) many[i] = (struct iovec){bytes + i * 16, 16};
    struct ioe_request r = vreq(IOE_OP_WRITEV, fd, many, IOE_MAX_IOVECS + 1, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = vreq(IOE_OP_WRITEV, fd, many, 0, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    r = vreq(IOE_OP_READV, fd, NULL, 1, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    struct iovec empty[2] = {{bytes, 0}, {NULL, 0}};
    r = vreq(IOE_OP_READV, fd, empty, 2, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    struct iovec null_base[1] = {{NULL, 16}};
    r = vreq(IOE_OP_READV, fd, null_base, 1, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    struct iovec past[1] = {{bytes, 16}};
    r = vreq(IOE_OP_READV, fd, past, 1, (uint64_t)INT64_MAX - 8, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), -EINVAL);
    CHECK_EQ(atomic_load(&s[0].calls), 0);

    /* The most iovecs allowed, then the context still works. */
    for (int i = 0; i < (int)IOE_MAX_IOVECS; i++) fill_pattern(bytes + i * 16, 16, (uint64_t)i);
    r = vreq(IOE_OP_WRITEV, fd, many, IOE_MAX_IOVECS, 0, &s[0]);
    CHECK_EQ(ioe_submit(ctx, &r), 0);
    waiter_wait(&w, 1);
    CHECK_EQ(s[0].result, IOE_MAX_IOVECS * 16);
    uint8_t check[16];
    for (int i = 0; i < (int)IOE_MAX_IOVECS; i += 97) {
        CHECK_EQ(pread(fd, check, 16, (off_t)i * 16), 16);
        CHECK(matches_pattern(check, 16, (uint64_t)i));
    }
    CHECK_EQ(ioe_context_destroy(ctx), 0);
    free(s);
    close(fd);
}

static void run(uint32_t backend, struct ioe_workers *workers) {
    scattered(backend, workers);
    direct(backend, workers);
    streams(backend, workers);
    refusals(backend, workers);
}

int main(void) {
    run_matrix(run, 2);
    printf("vectored: ok\n");
    return 0;
}
