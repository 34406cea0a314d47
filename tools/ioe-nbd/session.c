/* The NBD protocol state machine of one connection (see session.h). */
#include "session.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "nbd.h"

enum phase {
    PHASE_CLIENT_FLAGS, /* greeting sent, waiting for the client's flags */
    PHASE_OPTIONS,      /* option haggling */
    PHASE_TRANSMISSION,
    PHASE_DONE,         /* closing: input is ignored */
};

/* The context id of base:allocation (ids are the server's choice). */
#define META_BASE_ALLOCATION 1
#define META_NAME "base:allocation"

struct nbd_session {
    const struct nbd_export_info *exp;
    const struct nbd_session_ops *ops;
    void *io;
    enum phase phase;
    bool no_zeroes;
    bool structured;
    bool meta_selected;
    atomic_bool shutting_down; /* set from any thread */
    /* Bytes of the input to drop (an oversized option, a refused write's payload). */
    uint64_t skip;
    /* A write whose payload is arriving. */
    struct nbd_request *filling;
    uint32_t filled;
    /* The rest of `filling` is being received straight into it. */
    bool receiving;
};

struct nbd_session *nbd_session_new(const struct nbd_export_info *exp, const struct nbd_session_ops *ops, void *io) {
    struct nbd_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->exp = exp;
    s->ops = ops;
    s->io = io;
    s->phase = PHASE_CLIENT_FLAGS;
    return s;
}

void nbd_session_free(struct nbd_session *s) {
    if (!s) return;
    if (s->filling) nbd_request_free(s->filling);
    free(s);
}

void nbd_session_payload_in(struct nbd_session *s, bool ok) {
    struct nbd_request *req = s->filling;
    if (!s->receiving || !req) return;
    s->receiving = false;
    s->filling = NULL;
    if (ok) s->ops->request(s->io, req);
    else nbd_request_free(req);
}

void nbd_session_shutdown(struct nbd_session *s) { atomic_store(&s->shutting_down, true); }

bool nbd_session_transmitting(const struct nbd_session *s) { return s->phase == PHASE_TRANSMISSION; }

void nbd_session_start(struct nbd_session *s) {
    uint8_t hello[18];
    put64(hello, NBD_MAGIC);
    put64(hello + 8, NBD_IHAVEOPT);
    put16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    s->ops->send(s->io, hello, sizeof hello);
}

void nbd_request_free(struct nbd_request *req) {
    if (!req) return;
    if (req->mem && req->free_mem) req->free_mem(req->mem);
    free(req);
}

static void end(struct nbd_session *s, int hard) {
    s->phase = PHASE_DONE;
    s->ops->close(s->io, hard);
}

/* ------------------------------------------------------------ options */

static void option_reply(struct nbd_session *s, uint32_t option, uint32_t type, const void *data, uint32_t len) {
    uint8_t head[20];
    put64(head, NBD_OPT_REPLY_MAGIC);
    put32(head + 8, option);
    put32(head + 12, type);
    put32(head + 16, len);
    /* One send per reply keeps it whole even if another thread sends. */
    uint8_t small[20 + 256];
    if (len <= 256) {
        memcpy(small, head, 20);
        if (len) memcpy(small + 20, data, len);
        s->ops->send(s->io, small, 20 + len);
        return;
    }
    uint8_t *buf = malloc(20 + (size_t)len);
    if (!buf) {
        end(s, 1);
        return;
    }
    memcpy(buf, head, 20);
    memcpy(buf + 20, data, len);
    s->ops->send(s->io, buf, 20 + (size_t)len);
    free(buf);
}

static void option_error(struct nbd_session *s, uint32_t option, uint32_t type, const char *message) {
    option_reply(s, option, type, message, (uint32_t)strlen(message));
}

static bool name_matches(const struct nbd_session *s, const uint8_t *name, uint32_t len) {
    return len == 0 || (strlen(s->exp->name) == len && memcmp(s->exp->name, name, len) == 0);
}

static uint16_t transmission_flags(const struct nbd_session *s) {
    uint16_t flags = s->exp->flags;
    /* One content chunk per read is all this server ever sends. */
    if (s->structured) flags |= NBD_FLAG_SEND_DF;
    return flags;
}

static void enter_transmission(struct nbd_session *s) {
    /* A reply that failed on the way ended the session: it stays ended. */
    if (s->phase != PHASE_DONE) s->phase = PHASE_TRANSMISSION;
}

/* An NBD_REP_INFO carrying a string whole (names are at most 4096 bytes). */
static void info_string(struct nbd_session *s, uint32_t option, uint16_t type, const char *text) {
    size_t n = strlen(text);
    uint8_t *buf = malloc(2 + n);
    if (!buf) return end(s, 1);
    put16(buf, type);
    memcpy(buf + 2, text, n);
    option_reply(s, option, NBD_REP_INFO, buf, (uint32_t)(2 + n));
    free(buf);
}

/* NBD_OPT_INFO and NBD_OPT_GO. */
static void option_info(struct nbd_session *s, uint32_t option, const uint8_t *data, uint32_t len) {
    if (len < 6) return option_error(s, option, NBD_REP_ERR_INVALID, "option too short");
    uint32_t name_len = get32(data);
    if (name_len > len - 6) return option_error(s, option, NBD_REP_ERR_INVALID, "name length beyond the option");
    uint16_t count = get16(data + 4 + name_len);
    if (6 + name_len + 2u * count != len) return option_error(s, option, NBD_REP_ERR_INVALID, "bad request list");
    if (!name_matches(s, data + 4, name_len)) return option_error(s, option, NBD_REP_ERR_UNKNOWN, "no such export");
    bool want_name = false, want_description = false;
    for (uint16_t i = 0; i < count; i++) {
        uint16_t what = get16(data + 6 + name_len + 2u * i);
        if (what == NBD_INFO_NAME) want_name = true;
        if (what == NBD_INFO_DESCRIPTION) want_description = true;
    }
    uint8_t info[14];
    put16(info, NBD_INFO_EXPORT);
    put64(info + 2, s->exp->size);
    put16(info + 10, transmission_flags(s));
    option_reply(s, option, NBD_REP_INFO, info, 12);
    /* Sizes always: the defaults with one exception (the largest payload),
     * which a client that did not ask may ignore. */
    put16(info, NBD_INFO_BLOCK_SIZE);
    put32(info + 2, s->exp->min_block);
    put32(info + 6, s->exp->preferred_block);
    put32(info + 10, s->exp->max_payload);
    option_reply(s, option, NBD_REP_INFO, info, 14);
    if (want_name) info_string(s, option, NBD_INFO_NAME, s->exp->name);
    if (want_description && s->exp->description) info_string(s, option, NBD_INFO_DESCRIPTION, s->exp->description);
    option_reply(s, option, NBD_REP_ACK, NULL, 0);
    if (option == NBD_OPT_GO) enter_transmission(s);
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
static void option_meta(struct nbd_session *s, uint32_t option, const uint8_t *data, uint32_t len) {
    bool set = option == NBD_OPT_SET_META_CONTEXT;
    if (set) s->meta_selected = false; /* replaced even when the request fails */
    if (set && !s->structured)
        return option_error(s, option, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
    if (len < 8) return option_error(s, option, NBD_REP_ERR_INVALID, "option too short");
    uint32_t name_len = get32(data);
    if (name_len > len - 8) return option_error(s, option, NBD_REP_ERR_INVALID, "name length beyond the option");
    const uint8_t *name = data + 4;
    uint32_t at = 4 + name_len;
    uint32_t queries = get32(data + at);
    at += 4;
    /* Check the whole list before answering anything. */
    bool match = !set && queries == 0;
    uint32_t pos = at;
    for (uint32_t i = 0; i < queries; i++) {
        if (len - pos < 4) return option_error(s, option, NBD_REP_ERR_INVALID, "query beyond the option");
        uint32_t qlen = get32(data + pos);
        if (qlen > len - pos - 4) return option_error(s, option, NBD_REP_ERR_INVALID, "query beyond the option");
        const char *q = (const char *)data + pos + 4;
        if (qlen == strlen(META_NAME) && memcmp(q, META_NAME, qlen) == 0) match = true;
        if (!set && qlen == 5 && memcmp(q, "base:", 5) == 0) match = true;
        pos += 4 + qlen;
    }
    if (pos != len) return option_error(s, option, NBD_REP_ERR_INVALID, "bytes after the queries");
    if (!name_matches(s, name, name_len)) return option_error(s, option, NBD_REP_ERR_UNKNOWN, "no such export");
    if (match) {
        uint8_t reply[4 + sizeof META_NAME - 1];
        put32(reply, set ? META_BASE_ALLOCATION : 0);
        memcpy(reply + 4, META_NAME, sizeof META_NAME - 1);
        option_reply(s, option, NBD_REP_META_CONTEXT, reply, sizeof reply);
        if (set) s->meta_selected = true;
    }
    option_reply(s, option, NBD_REP_ACK, NULL, 0);
}

static void handle_option(struct nbd_session *s, uint32_t option, const uint8_t *data, uint32_t len) {
    if (atomic_load(&s->shutting_down) && option != NBD_OPT_ABORT) {
        if (option == NBD_OPT_EXPORT_NAME) return end(s, 1);
        return option_error(s, option, NBD_REP_ERR_SHUTDOWN, "the server is shutting down");
    }
    switch (option) {
    case NBD_OPT_EXPORT_NAME: {
        /* No way to report an error: an unknown name ends the session. */
        if (!name_matches(s, data, len)) return end(s, 1);
        uint8_t reply[8 + 2 + 124] = {0};
        put64(reply, s->exp->size);
        put16(reply + 8, transmission_flags(s));
        s->ops->send(s->io, reply, s->no_zeroes ? 10 : sizeof reply);
        enter_transmission(s);
        return;
    }
    case NBD_OPT_ABORT:
        option_reply(s, option, NBD_REP_ACK, NULL, 0);
        return end(s, 0);
    case NBD_OPT_LIST: {
        if (len) return option_error(s, option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        size_t n = strlen(s->exp->name);
        uint8_t *reply = malloc(4 + n);
        if (!reply) return end(s, 1);
        put32(reply, (uint32_t)n);
        memcpy(reply + 4, s->exp->name, n);
        option_reply(s, option, NBD_REP_SERVER, reply, (uint32_t)(4 + n));
        free(reply);
        return option_reply(s, option, NBD_REP_ACK, NULL, 0);
    }
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        return option_info(s, option, data, len);
    case NBD_OPT_STRUCTURED_REPLY:
        if (len) return option_error(s, option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        s->structured = true;
        return option_reply(s, option, NBD_REP_ACK, NULL, 0);
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        return option_meta(s, option, data, len);
    default:
        /* STARTTLS, EXTENDED_HEADERS and anything unknown. */
        return option_error(s, option, NBD_REP_ERR_UNSUP, "option not supported");
    }
}

/* Consumes option messages; returns bytes used. */
static size_t options_input(struct nbd_session *s, const uint8_t *data, size_t len) {
    if (len < 16) return 0;
    if (get64(data) != NBD_IHAVEOPT) {
        end(s, 1);
        return len;
    }
    uint32_t option = get32(data + 8);
    uint32_t opt_len = get32(data + 12);
    if (opt_len > NBD_MAX_OPTION) {
        if (option == NBD_OPT_EXPORT_NAME) {
            end(s, 1);
            return len;
        }
        /* Too large to hold: drop its data and say so. */
        option_error(s, option, NBD_REP_ERR_TOO_BIG, "option too large");
        s->skip = opt_len;
        return 16;
    }
    if (len - 16 < opt_len) return 0; /* wait for the whole option */
    handle_option(s, option, data + 16, opt_len);
    return 16 + (size_t)opt_len;
}

/* ------------------------------------------------------------ requests */

uint32_t nbd_errno_from(int neg_errno) {
    switch (-neg_errno) {
    case EPERM:
    case EROFS:
    case EACCES: return NBD_EPERM;
    case ENOMEM: return NBD_ENOMEM;
    case EINVAL: return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case EOPNOTSUPP: return NBD_ENOTSUP;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
    }
}

size_t nbd_reply_ok(uint8_t out[32], const struct nbd_request *req) {
    if (!req->structured) {
        put32(out, NBD_SIMPLE_REPLY_MAGIC);
        put32(out + 4, 0);
        put64(out + 8, req->cookie);
        return NBD_SIMPLE_REPLY_SIZE;
    }
    put32(out, NBD_STRUCTURED_REPLY_MAGIC);
    put16(out + 4, NBD_REPLY_FLAG_DONE);
    put16(out + 6, NBD_REPLY_TYPE_NONE);
    put64(out + 8, req->cookie);
    put32(out + 16, 0);
    return NBD_STRUCTURED_REPLY_SIZE;
}

size_t nbd_reply_error(uint8_t out[128], const struct nbd_request *req, uint32_t nbd_errno, const char *message) {
    if (!req->structured) {
        put32(out, NBD_SIMPLE_REPLY_MAGIC);
        put32(out + 4, nbd_errno);
        put64(out + 8, req->cookie);
        return NBD_SIMPLE_REPLY_SIZE;
    }
    size_t n = message ? strlen(message) : 0;
    if (n > 128 - 26) n = 128 - 26;
    put32(out, NBD_STRUCTURED_REPLY_MAGIC);
    put16(out + 4, NBD_REPLY_FLAG_DONE);
    put16(out + 6, NBD_REPLY_TYPE_ERROR);
    put64(out + 8, req->cookie);
    put32(out + 16, (uint32_t)(6 + n));
    put32(out + 20, nbd_errno);
    put16(out + 24, (uint16_t)n);
    if (n) memcpy(out + 26, message, n);
    return 26 + n;
}

size_t nbd_reply_read_header(uint8_t *data, const struct nbd_request *req, uint32_t len) {
    if (!req->structured) {
        uint8_t *h = data - NBD_SIMPLE_REPLY_SIZE;
        put32(h, NBD_SIMPLE_REPLY_MAGIC);
        put32(h + 4, 0);
        put64(h + 8, req->cookie);
        return NBD_SIMPLE_REPLY_SIZE;
    }
    /* One OFFSET_DATA chunk, the last: the data is all read before it goes. */
    uint8_t *h = data - (NBD_STRUCTURED_REPLY_SIZE + 8);
    put32(h, NBD_STRUCTURED_REPLY_MAGIC);
    put16(h + 4, NBD_REPLY_FLAG_DONE);
    put16(h + 6, NBD_REPLY_TYPE_OFFSET_DATA);
    put64(h + 8, req->cookie);
    put32(h + 16, len + 8);
    put64(h + 20, req->offset);
    return NBD_STRUCTURED_REPLY_SIZE + 8;
}

size_t nbd_reply_status_header(uint8_t out[24], const struct nbd_request *req, uint32_t extents) {
    put32(out, NBD_STRUCTURED_REPLY_MAGIC);
    put16(out + 4, NBD_REPLY_FLAG_DONE);
    put16(out + 6, NBD_REPLY_TYPE_BLOCK_STATUS);
    put64(out + 8, req->cookie);
    put32(out + 16, 4 + 8 * extents);
    put32(out + 20, req->meta_id);
    return 24;
}

static void reply_error_now(struct nbd_session *s, const struct nbd_request *req, uint32_t nbd_errno,
                            const char *message) {
    uint8_t out[128];
    size_t n = nbd_reply_error(out, req, nbd_errno, message);
    s->ops->send(s->io, out, n);
}

/* Which command flags each command accepts. */
static uint16_t allowed_flags(uint16_t type) {
    switch (type) {
    case NBD_CMD_READ: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF;
    case NBD_CMD_WRITE_ZEROES: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS: return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
    default: return NBD_CMD_FLAG_FUA;
    }
}

/* The error a request gets before any I/O, or 0 when it may go ahead. */
static uint32_t check_request(const struct nbd_session *s, const struct nbd_request *r, const char **why) {
    const struct nbd_export_info *e = s->exp;
    bool read_only = e->flags & NBD_FLAG_READ_ONLY;
    bool beyond = r->offset > e->size || r->len > e->size - r->offset;
    if (atomic_load(&s->shutting_down)) return *why = "the server is shutting down", NBD_ESHUTDOWN;
    if (r->flags & ~allowed_flags(r->type)) return *why = "flag not valid for this command", NBD_EINVAL;
    switch (r->type) {
    case NBD_CMD_READ:
        if (r->len == 0 || r->len > e->max_payload) return *why = "bad read length", NBD_EINVAL;
        if (beyond) return *why = "read beyond the end of the export", NBD_EINVAL;
        return 0;
    case NBD_CMD_WRITE:
        if (read_only) return *why = "read-only export", NBD_EPERM;
        if (r->len == 0 || r->len > e->max_payload) return *why = "bad write length", NBD_EINVAL;
        if (beyond) return *why = "write beyond the end of the export", NBD_ENOSPC;
        return 0;
    case NBD_CMD_FLUSH:
        return 0;
    case NBD_CMD_TRIM:
        if (read_only) return *why = "read-only export", NBD_EPERM;
        if (beyond) return *why = "trim beyond the end of the export", NBD_EINVAL;
        return 0;
    case NBD_CMD_WRITE_ZEROES:
        if (read_only) return *why = "read-only export", NBD_EPERM;
        if (beyond) return *why = "write beyond the end of the export", NBD_ENOSPC;
        return 0;
    case NBD_CMD_BLOCK_STATUS:
        if (!s->meta_selected) return *why = "no metadata context negotiated", NBD_EINVAL;
        if (r->len == 0 || beyond) return *why = "bad block status range", NBD_EINVAL;
        return 0;
    default:
        return *why = "command not supported", NBD_EINVAL;
    }
}

/* A complete request header at `h`; returns bytes used (28). */
static size_t request_input(struct nbd_session *s, const uint8_t *h) {
    if (get32(h) != NBD_REQUEST_MAGIC) {
        end(s, 1);
        return NBD_REQUEST_SIZE;
    }
    struct nbd_request tmp = {.flags = get16(h + 4), .type = get16(h + 6), .cookie = get64(h + 8),
                              .offset = get64(h + 16), .len = get32(h + 24), .structured = s->structured};
    if (tmp.type == NBD_CMD_DISC) {
        s->phase = PHASE_DONE;
        s->ops->disconnect(s->io);
        return NBD_REQUEST_SIZE;
    }
    const char *why = NULL;
    uint32_t err = check_request(s, &tmp, &why);
    if (!err && s->ops->admit && (err = s->ops->admit(s->io, &tmp)) != 0) why = "too much in flight on this connection";
    if (err) {
        reply_error_now(s, &tmp, err, why);
        /* A refused write's payload still follows: drop it. */
        if (tmp.type == NBD_CMD_WRITE) s->skip = tmp.len;
        return NBD_REQUEST_SIZE;
    }
    struct nbd_request *req = calloc(1, sizeof *req);
    if (!req) {
        reply_error_now(s, &tmp, NBD_ENOMEM, "out of memory");
        if (tmp.type == NBD_CMD_WRITE) s->skip = tmp.len;
        return NBD_REQUEST_SIZE;
    }
    *req = tmp;
    req->conn = s->io;
    req->meta_id = META_BASE_ALLOCATION;
    if (tmp.type == NBD_CMD_WRITE) {
        req->mem = s->ops->alloc(NBD_HDR_ROOM + (size_t)tmp.len);
        if (!req->mem) {
            reply_error_now(s, &tmp, NBD_ENOMEM, "out of memory");
            free(req);
            s->skip = tmp.len;
            return NBD_REQUEST_SIZE;
        }
        req->free_mem = s->ops->free;
        req->data = req->mem + NBD_HDR_ROOM;
        s->filling = req;
        s->filled = 0;
        return NBD_REQUEST_SIZE;
    }
    s->ops->request(s->io, req);
    return NBD_REQUEST_SIZE;
}

size_t nbd_session_input(struct nbd_session *s, const uint8_t *data, size_t len) {
    size_t used = 0;
    while (used < len) {
        const uint8_t *p = data + used;
        size_t avail = len - used;
        if (s->phase == PHASE_DONE) return len; /* nothing more is read */
        if (s->skip) {
            size_t n = avail < s->skip ? avail : (size_t)s->skip;
            s->skip -= n;
            used += n;
            continue;
        }
        if (s->filling) {
            struct nbd_request *req = s->filling;
            size_t n = req->len - s->filled;
            if (s->receiving) return used; /* the engine does not feed us then */
            /* Most of a large payload still to come: into its buffer
             * directly, without a copy through the engine's. */
            if (s->ops->receive_into && n > avail && n - avail >= NBD_RECEIVE_INTO_MIN &&
                s->ops->receive_into(s->io, req->data + s->filled, n) == 0) {
                s->receiving = true;
                return used;
            }
            if (n > avail) n = avail;
            memcpy(req->data + s->filled, p, n);
            s->filled += (uint32_t)n;
            used += n;
            if (s->filled == req->len) {
                s->filling = NULL;
                s->ops->request(s->io, req);
            }
            continue;
        }
        size_t n;
        switch (s->phase) {
        case PHASE_CLIENT_FLAGS: {
            if (avail < 4) return used;
            uint32_t flags = get32(p);
            if (flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
                end(s, 1); /* unknown client flags: the protocol says close */
                return len;
            }
            s->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
            s->phase = PHASE_OPTIONS;
            n = 4;
            break;
        }
        case PHASE_OPTIONS:
            n = options_input(s, p, avail);
            break;
        case PHASE_TRANSMISSION:
            if (avail < NBD_REQUEST_SIZE) return used;
            n = request_input(s, p);
            break;
        default:
            return len;
        }
        if (n == 0) return used;
        used += n;
    }
    return used;
}
