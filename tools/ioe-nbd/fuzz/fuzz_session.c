/* Fuzz target for the NBD protocol state machine (session.c): the
 * handshake, option haggling and request parsing, fed the way the server's
 * network layer feeds it (in pieces, unconsumed bytes offered again, large
 * write payloads taken through receive_into), with the replies built by
 * the real reply builders. Checked on every input, besides what the
 * sanitizers catch:
 *   - every message the session sends is whole and well framed (greeting,
 *     option replies with their length, the EXPORT_NAME answer,
 *     simple/structured replies with their length);
 *   - every request handed over is valid: a known command, in range, with
 *     a payload buffer of its length for writes, and none once the session
 *     ended or after NBD_CMD_DISC;
 *   - every request and buffer is freed (LeakSanitizer).
 *
 * The first input byte chooses the set-up: bits 0-1 a handshake prefix
 * (none, GO with structured replies and base:allocation, EXPORT_NAME),
 * bit 2 whether receive_into is offered, bit 3 a shutdown halfway, bit 4 a
 * read-only export, bit 5 a long name and description (replies over 256
 * bytes); the second seeds the piece sizes. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "../nbd.h"
#include "../session.h"

#define EXPORT_SIZE (1u << 20)
#define MAX_PAYLOAD (64u << 10)

struct harness {
    struct nbd_session *session;
    const struct nbd_export_info *exp;
    bool greeted, ended, disconnected, exported;
    bool structured_seen; /* a structured reply went out */
    /* A payload being received into its buffer. */
    uint8_t *into;
    size_t into_len, into_filled;
    bool offer_into;
    unsigned long requests, sends;
    uint8_t payload_sum;
};

/* Checks that `data` is one whole, well-framed server message. */
static int check_send(void *io, const void *data, size_t len) {
    struct harness *h = io;
    const uint8_t *p = data;
    FUZZ_ASSERT(len > 0);
    h->sends++;
    if (!h->greeted) {
        FUZZ_ASSERT(len == 18 && get64(p) == NBD_MAGIC && get64(p + 8) == NBD_IHAVEOPT);
        h->greeted = true;
        return 0;
    }
    if (len >= 20 && get64(p) == NBD_OPT_REPLY_MAGIC) {
        FUZZ_ASSERT(!h->exported);
        FUZZ_ASSERT(get32(p + 16) == len - 20);
        return 0;
    }
    if (len >= 4 && get32(p) == NBD_SIMPLE_REPLY_MAGIC) {
        /* A simple reply: 16 bytes, or a read reply's header then data. */
        FUZZ_ASSERT(len >= NBD_SIMPLE_REPLY_SIZE);
        return 0;
    }
    if (len >= 4 && get32(p) == NBD_STRUCTURED_REPLY_MAGIC) {
        FUZZ_ASSERT(len >= NBD_STRUCTURED_REPLY_SIZE);
        FUZZ_ASSERT(get32(p + 16) == len - NBD_STRUCTURED_REPLY_SIZE);
        h->structured_seen = true;
        return 0;
    }
    /* The EXPORT_NAME answer: size, flags, perhaps 124 zeroes. */
    FUZZ_ASSERT(!h->exported && (len == 10 || len == 134));
    FUZZ_ASSERT(get64(p) == h->exp->size);
    h->exported = true;
    return 0;
}

static void on_close(void *io, int hard) {
    (void)hard;
    struct harness *h = io;
    h->ended = true;
}

static uint32_t admit(void *io, const struct nbd_request *req) {
    (void)io;
    /* Some refusals, as a connection over its budget gets. */
    return (req->cookie & 0xff) == 0xee ? NBD_ENOMEM : 0;
}

/* Answers a request at once, through the reply builders. */
static void on_request(void *io, struct nbd_request *req) {
    struct harness *h = io;
    const struct nbd_export_info *e = h->exp;
    FUZZ_ASSERT(!h->ended && !h->disconnected);
    FUZZ_ASSERT(req->conn == io);
    h->requests++;
    bool in_range = req->offset <= e->size && req->len <= e->size - req->offset;
    uint8_t out[128];
    size_t n;
    switch (req->type) {
    case NBD_CMD_READ: {
        FUZZ_ASSERT(req->len > 0 && req->len <= e->max_payload && in_range);
        uint8_t *mem = malloc(NBD_HDR_ROOM + (size_t)req->len);
        FUZZ_ASSERT(mem != NULL);
        memset(mem + NBD_HDR_ROOM, 0x5a, req->len);
        size_t head = nbd_reply_read_header(mem + NBD_HDR_ROOM, req, req->len);
        check_send(io, mem + NBD_HDR_ROOM - head, head + req->len);
        free(mem);
        break;
    }
    case NBD_CMD_WRITE: {
        FUZZ_ASSERT(!(e->flags & NBD_FLAG_READ_ONLY));
        FUZZ_ASSERT(req->len > 0 && req->len <= e->max_payload && in_range);
        FUZZ_ASSERT(req->data != NULL && req->data == req->mem + NBD_HDR_ROOM);
        /* Every payload byte readable (the sanitizer checks the bounds). */
        for (uint32_t i = 0; i < req->len; i++) h->payload_sum ^= req->data[i];
        n = nbd_reply_ok(out, req);
        check_send(io, out, n);
        break;
    }
    case NBD_CMD_FLUSH:
        n = nbd_reply_ok(out, req);
        check_send(io, out, n);
        break;
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES: {
        FUZZ_ASSERT(!(e->flags & NBD_FLAG_READ_ONLY) && in_range);
        /* Each errno the server maps, by cookie. */
        static const int errnos[] = {EIO,    EPERM, EROFS, EACCES,    ENOMEM,     EINVAL,
                                     ENOSPC, EDQUOT, EFBIG, EOVERFLOW, EOPNOTSUPP, ESHUTDOWN};
        int err = errnos[req->cookie % (sizeof errnos / sizeof errnos[0])];
        n = nbd_reply_error(out, req, nbd_errno_from(-err), "an error with a message");
        check_send(io, out, n);
        break;
    }
    case NBD_CMD_BLOCK_STATUS: {
        FUZZ_ASSERT(req->structured && req->len > 0 && in_range);
        uint8_t reply[24 + 8];
        size_t head = nbd_reply_status_header(reply, req, 1);
        put32(reply + head, req->len);
        put32(reply + head + 4, 0);
        check_send(io, reply, head + 8);
        break;
    }
    default:
        FUZZ_ASSERT(!"a request of an unknown type was handed over");
    }
    nbd_request_free(req);
}

static void on_disconnect(void *io) {
    struct harness *h = io;
    h->disconnected = true;
}

static int receive_into(void *io, uint8_t *dst, size_t len) {
    struct harness *h = io;
    if (!h->offer_into) return -1;
    FUZZ_ASSERT(h->into == NULL && len >= NBD_RECEIVE_INTO_MIN);
    h->into = dst;
    h->into_len = len;
    h->into_filled = 0;
    return 0;
}

/* Fails now and then (payload lengths ending in 0x123), as when out of memory. */
static void *alloc(size_t len) { return ((len - NBD_HDR_ROOM) & 0xfff) == 0x123 ? NULL : malloc(len); }

/* The handshake prefixes bits 0-1 of the first byte choose. */
static size_t put_option(uint8_t *out, uint32_t option, const void *data, uint32_t len) {
    put64(out, NBD_IHAVEOPT);
    put32(out + 8, option);
    put32(out + 12, len);
    if (len) memcpy(out + 16, data, len);
    return 16 + (size_t)len;
}

static size_t prefix(int kind, uint8_t *out) {
    size_t n = 0;
    if (kind == 0 || kind == 3) return 0;
    put32(out, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    n = 4;
    if (kind == 1) {
        n += put_option(out + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
        uint8_t meta[4 + 4 + 4 + 4 + 15];
        put32(meta, 4);
        memcpy(meta + 4, "disk", 4);
        put32(meta + 8, 1);
        put32(meta + 12, 15);
        memcpy(meta + 16, "base:allocation", 15);
        n += put_option(out + n, NBD_OPT_SET_META_CONTEXT, meta, sizeof meta);
        uint8_t go[4 + 4 + 2];
        put32(go, 4);
        memcpy(go + 4, "disk", 4);
        put16(go + 8, 0);
        n += put_option(out + n, NBD_OPT_GO, go, sizeof go);
    } else {
        n += put_option(out + n, NBD_OPT_EXPORT_NAME, "disk", 4);
    }
    return n;
}

/* Feeds `data` to the session as the network layer does. */
static void feed(struct harness *h, uint8_t **kept, size_t *kept_len, const uint8_t *data, size_t len) {
    while (len > 0) {
        if (h->into) {
            /* The payload goes into its buffer, not to the session. */
            size_t n = h->into_len - h->into_filled;
            if (n > len) n = len;
            memcpy(h->into + h->into_filled, data, n);
            h->into_filled += n;
            data += n;
            len -= n;
            if (h->into_filled == h->into_len) {
                h->into = NULL;
                nbd_session_payload_in(h->session, true);
            }
            continue;
        }
        /* Unconsumed bytes are offered again in front of the new ones. */
        uint8_t *buf = realloc(*kept, *kept_len + len);
        FUZZ_ASSERT(buf != NULL);
        memcpy(buf + *kept_len, data, len);
        size_t total = *kept_len + len;
        size_t used = nbd_session_input(h->session, buf, total);
        FUZZ_ASSERT(used <= total);
        if (h->into) {
            /* What followed the consumed bytes goes into the buffer first. */
            size_t rest = total - used;
            *kept = NULL;
            *kept_len = 0;
            uint8_t *tail = malloc(rest ? rest : 1);
            FUZZ_ASSERT(tail != NULL);
            memcpy(tail, buf + used, rest);
            free(buf);
            feed(h, kept, kept_len, tail, rest);
            free(tail);
            return;
        }
        memmove(buf, buf + used, total - used);
        *kept = buf;
        *kept_len = total - used;
        return;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    uint8_t mode = data[0];
    bool whole = data[1] == 1;
    uint32_t seed = data[1] | 1u;
    data += 2;
    size -= 2;
    struct nbd_export_info exp = {.name = "disk",
                                  .description = "fuzzed",
                                  .size = EXPORT_SIZE,
                                  .flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                                           NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
                                           NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_FAST_ZERO,
                                  .min_block = 1,
                                  .preferred_block = 4096,
                                  .max_payload = MAX_PAYLOAD};
    if (mode & 16) exp.flags |= NBD_FLAG_READ_ONLY;
    char long_text[400];
    if (mode & 32) {
        memset(long_text, 'd', sizeof long_text - 1);
        long_text[sizeof long_text - 1] = 0;
        exp.description = long_text;
    }
    struct harness h = {.exp = &exp, .offer_into = mode & 4};
    struct nbd_session_ops ops = {.send = check_send,
                                  .close = on_close,
                                  .admit = admit,
                                  .request = on_request,
                                  .disconnect = on_disconnect,
                                  .receive_into = receive_into,
                                  .alloc = alloc,
                                  .free = free};
    h.session = nbd_session_new(&exp, &ops, &h);
    FUZZ_ASSERT(h.session != NULL);
    nbd_session_start(h.session);
    uint8_t *kept = NULL;
    size_t kept_len = 0;
    uint8_t head[256];
    size_t head_len = prefix(mode & 3, head);
    feed(&h, &kept, &kept_len, head, head_len);
    if ((mode & 3) == 1 || (mode & 3) == 2) FUZZ_ASSERT(nbd_session_transmitting(h.session));
    /* The input in pieces of 1 to 64 bytes (or all at once for seed 1). */
    size_t at = 0;
    while (at < size) {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        size_t piece = whole ? size : 1 + seed % 64;
        if (piece > size - at) piece = size - at;
        if ((mode & 8) && at >= size / 2 && at < size / 2 + piece) nbd_session_shutdown(h.session);
        feed(&h, &kept, &kept_len, data + at, piece);
        at += piece;
    }
    /* The connection ends: a payload still arriving never will. */
    if (h.into) {
        h.into = NULL;
        nbd_session_payload_in(h.session, false);
    }
    free(kept);
    nbd_session_free(h.session);
    return 0;
}
