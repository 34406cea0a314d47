/* ioe-nbd: a Network Block Device server on ioengine, written against the
 * public ioengine.h only. The network side is the proactor server (one
 * io_uring per loop thread, or epoll), the disk side a block-engine context:
 * a request parsed on a loop thread is submitted to the context, and its
 * completion callback (on the engine's poller thread) sends the reply.
 * Block status queries (lseek SEEK_DATA/SEEK_HOLE, which may wait for the
 * disk) run on a thread of their own, so no loop thread ever blocks. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <ioengine.h>

#include "nbd.h"
#include "options.h"
#include "session.h"

/* Writes of zeroes the kernel cannot do by fallocate go out in pieces of
 * this size from one shared zeroed buffer. */
#define ZERO_CHUNK (1u << 20)
/* Most extents one block status reply carries. */
#define MAX_EXTENTS 1024
/* Payload bytes one connection may have in flight (reads until their reply
 * is sent); more gets NBD_ENOMEM, so one client cannot exhaust memory. */
#define CONN_BUDGET (256ull << 20)
/* Replies queued for a client that does not read them: past this it is cut off. */
#define CONN_HIGH_WATER (320ull << 20)



struct conn;

struct server {
    struct options o;
    int fd;          /* the export, O_DIRECT with --cache=none */
    int fd_buffered; /* the same file without O_DIRECT, for unaligned requests */
    uint32_t dio_align;
    struct nbd_export_info exp;
    struct nbd_session_ops ops;
    struct ioe_context *ctx;
    struct ioe_server *net;
    /* Disk requests run on each connection's loop (ioe_conn_submit: its
     * ring on io_uring, its helper threads on epoll) rather than on the
     * block-engine context. */
    bool loop_io;
    void *zeroes;
    /* Open connections, for a graceful stop. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct conn *conns;
    long open_conns;
    atomic_long inflight;  /* requests handed to the disk side, not yet answered */
    atomic_bool stopping;  /* a stop began: sessions answer NBD_ESHUTDOWN */
    /* Block status queries, answered by `status_thread`. */
    pthread_t status_thread;
    struct nbd_request *status_head, *status_tail;
    bool status_stop;
    pthread_cond_t status_cv;
};

struct conn {
    struct server *srv;
    struct ioe_conn *ioc; /* referenced until the conn is freed */
    struct nbd_session *session;
    /* One for the open connection, one per request being answered. */
    atomic_long refs;
    atomic_long inflight;
    atomic_bool disconnect; /* NBD_CMD_DISC or end of input: close once idle */
    atomic_long held_bytes; /* request buffers this connection holds */
    struct conn *prev, *next;
};


/* ----------------------------------------------------------- connections */

static void conn_unref(struct conn *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    nbd_session_free(c->session);
    ioe_conn_unref(c->ioc);
    free(c);
}

static void close_if_idle(struct conn *c) {
    if (atomic_load(&c->disconnect) && atomic_load(&c->inflight) == 0) ioe_conn_close(c->ioc);
}

/* A request is answered (or dropped): release what it held. */
static void request_done(struct nbd_request *req) {
    struct conn *c = req->conn;
    struct server *srv = c->srv;
    if (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) atomic_fetch_sub(&c->held_bytes, (long)req->len);
    nbd_request_free(req);
    atomic_fetch_sub(&c->inflight, 1);
    close_if_idle(c);
    /* Only a stop waits for the count to reach zero. */
    if (atomic_fetch_sub(&srv->inflight, 1) == 1 && atomic_load(&srv->stopping)) {
        pthread_mutex_lock(&srv->mu);
        pthread_cond_broadcast(&srv->cv);
        pthread_mutex_unlock(&srv->mu);
    }
    conn_unref(c);
}

static void reply_ok(struct nbd_request *req) {
    uint8_t out[32];
    size_t n = nbd_reply_ok(out, req);
    ioe_conn_send(((struct conn *)req->conn)->ioc, out, n);
    request_done(req);
}

static void reply_error(struct nbd_request *req, int neg_errno, const char *what) {
    uint8_t out[128];
    char message[96];
    snprintf(message, sizeof message, "%s: %s", what, strerror(-neg_errno));
    size_t n = nbd_reply_error(out, req, nbd_errno_from(neg_errno), message);
    ioe_conn_send(((struct conn *)req->conn)->ioc, out, n);
    request_done(req);
}

/* ------------------------------------------------------------- buffers */

/* Request buffers (NBD_HDR_ROOM + payload, 4096-aligned for O_DIRECT) come
 * from free lists by power-of-two size, so a steady load allocates nothing:
 * large fresh allocations are mmaps that fault in and zero every page. The
 * size class sits in the first bytes of the header room, which replies
 * never reach. At most POOL_KEEP bytes wait in each list. */
#define POOL_MIN_SHIFT 13
#define POOL_MAX_SHIFT 21 /* 2 MiB; larger buffers are allocated to size and freed */
#define POOL_KEEP (16u << 20)

struct pool_list {
    pthread_mutex_t mu;
    void *head;
    size_t kept;
};
static struct pool_list pool[POOL_MAX_SHIFT + 1];

static void pool_init(void) {
    for (int i = 0; i <= POOL_MAX_SHIFT; i++) pthread_mutex_init(&pool[i].mu, NULL);
}

static void *pool_alloc(size_t len) {
    unsigned shift = POOL_MIN_SHIFT;
    while (((size_t)1 << shift) < len && shift <= POOL_MAX_SHIFT) shift++;
    if (shift > POOL_MAX_SHIFT) {
        void *big = NULL;
        if (posix_memalign(&big, 4096, len) != 0) return NULL;
        unsigned unpooled = 0;
        memcpy(big, &unpooled, sizeof unpooled);
        return big;
    }
    struct pool_list *l = &pool[shift];
    pthread_mutex_lock(&l->mu);
    void *p = l->head;
    if (p) {
        memcpy(&l->head, (uint8_t *)p + 8, sizeof(void *));
        l->kept -= (size_t)1 << shift;
    }
    pthread_mutex_unlock(&l->mu);
    if (!p && posix_memalign(&p, 4096, (size_t)1 << shift) != 0) return NULL;
    memcpy(p, &shift, sizeof shift);
    return p;
}

static void pool_free(void *p) {
    if (!p) return;
    unsigned shift;
    memcpy(&shift, p, sizeof shift);
    if (shift == 0) {
        free(p);
        return;
    }
    struct pool_list *l = &pool[shift];
    pthread_mutex_lock(&l->mu);
    if (l->kept + ((size_t)1 << shift) <= POOL_KEEP) {
        memcpy((uint8_t *)p + 8, &l->head, sizeof(void *));
        l->head = p;
        l->kept += (size_t)1 << shift;
        p = NULL;
    }
    pthread_mutex_unlock(&l->mu);
    free(p);
}

/* ------------------------------------------------------------ disk side */

/* The descriptor for a request: the O_DIRECT one only when the request is
 * aligned for it (clients may send any alignment). */
static int fd_for(const struct server *srv, uint64_t offset, uint64_t len) {
    if (srv->fd == srv->fd_buffered) return srv->fd;
    uint64_t mask = srv->dio_align - 1;
    return (offset & mask) == 0 && (len & mask) == 0 ? srv->fd : srv->fd_buffered;
}

/* Requests parsed in one on_data call go to the engine together: one
 * ioe_submit_batch, which enters the kernel on the loop thread itself when
 * no other thread is submitting (no wake-up of the engine's submitter). */
#define BATCH_MAX 64
#define BATCH_MAX_BYTES (256u << 10)
static __thread struct {
    bool open;
    uint32_t count;
    struct ioe_request reqs[BATCH_MAX];
} batch;

static void batch_flush(struct server *srv) {
    uint32_t done = 0, count = batch.count;
    bool was_open = batch.open;
    /* A refused request's callback may submit again: directly, not into
     * the batch being flushed. */
    batch.open = false;
    while (done < count) {
        int64_t rc = ioe_submit_batch(srv->ctx, batch.reqs + done, count - done);
        if (rc < 0) {
            /* The first one was refused: it completes with the error. */
            batch.reqs[done].callback(batch.reqs[done].user_data, rc);
            done++;
        } else {
            done += (uint32_t)rc;
        }
    }
    batch.count = 0;
    batch.open = was_open;
}

static int submit(struct server *srv, uint32_t op, int fd, void *buf, uint64_t len, uint64_t offset, int mode,
                  uint32_t rw_flags, ioe_callback cb, void *ud) {
    struct ioe_request r = {.op = op,
                            .channel = op == IOE_OP_READ ? IOE_CHANNEL_READ : IOE_CHANNEL_WRITE,
                            .fd = fd,
                            .fallocate_mode = mode,
                            .buf = buf,
                            .len = len,
                            .offset = offset,
                            .callback = cb,
                            .user_data = ud,
                            .rw_flags = rw_flags};
    /* A large transfer goes to the engine's own thread: a cached 32 MiB
     * read copied on the loop thread would hold up its other connections. */
    if (srv->loop_io) {
        /* On the connection's own loop: no thread hop either way. */
        struct nbd_request *req = ud;
        return ioe_conn_submit(((struct conn *)req->conn)->ioc, &r);
    }
    if (!batch.open || len > BATCH_MAX_BYTES) return ioe_submit(srv->ctx, &r);
    if (batch.count == BATCH_MAX) batch_flush(srv);
    batch.reqs[batch.count++] = r;
    return 0;
}

static void read_sent(void *ud, int64_t result) {
    (void)result;
    request_done(ud);
}

static void on_read(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    struct conn *c = req->conn;
    if (result != (int64_t)req->len) return reply_error(req, result < 0 ? (int)result : -EIO, "read");
    size_t h = nbd_reply_read_header(req->data, req, req->len);
    /* Header and data in one send, straight from the buffer. */
    if (ioe_conn_send_borrowed(c->ioc, req->data - h, h + req->len, read_sent, req) < 0) request_done(req);
}

/* FUA on a command other than WRITE: fdatasync after it, then reply. */
static void on_sync_then_reply(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    if (result < 0) return reply_error(req, (int)result, "fdatasync");
    reply_ok(req);
}

static void finish_with_fua(struct nbd_request *req) {
    struct server *srv = ((struct conn *)req->conn)->srv;
    if (!(req->flags & NBD_CMD_FLAG_FUA)) return reply_ok(req);
    int rc = submit(srv, IOE_OP_FDATASYNC, srv->fd, NULL, 0, 0, 0, 0, on_sync_then_reply, req);
    if (rc < 0) reply_error(req, rc, "fdatasync");
}

static void on_write(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    if (result != (int64_t)req->len) return reply_error(req, result < 0 ? (int)result : -EIO, "write");
    reply_ok(req);
}

static void on_flush(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    if (result < 0) return reply_error(req, (int)result, "flush");
    reply_ok(req);
}

static void on_trim(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    /* A trim is a hint: where holes cannot be punched, nothing is lost. */
    if (result < 0 && result != -EOPNOTSUPP) return reply_error(req, (int)result, "trim");
    finish_with_fua(req);
}

enum zero_stage { ZERO_PUNCH = 1, ZERO_RANGE, ZERO_WRITE };

static void zero_step(struct nbd_request *req);

static void on_zero(void *ud, int64_t result) {
    struct nbd_request *req = ud;
    if (req->stage == ZERO_WRITE) {
        if (result <= 0) return reply_error(req, result < 0 ? (int)result : -EIO, "write zeroes");
        req->progress += (uint64_t)result;
        return zero_step(req);
    }
    if (result >= 0) return finish_with_fua(req);
    if (result != -EOPNOTSUPP && result != -EINVAL) return reply_error(req, (int)result, "write zeroes");
    /* The file system cannot do it this way: try the next. */
    if (req->stage == ZERO_PUNCH) {
        req->stage = ZERO_RANGE;
    } else {
        if (req->flags & NBD_CMD_FLAG_FAST_ZERO) return reply_error(req, -EOPNOTSUPP, "fast zero");
        req->stage = ZERO_WRITE;
    }
    zero_step(req);
}

static void zero_step(struct nbd_request *req) {
    struct server *srv = ((struct conn *)req->conn)->srv;
    int rc;
    switch (req->stage) {
    case ZERO_PUNCH:
        rc = submit(srv, IOE_OP_FALLOCATE, srv->fd, NULL, req->len, req->offset,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, on_zero, req);
        break;
    case ZERO_RANGE:
        rc = submit(srv, IOE_OP_FALLOCATE, srv->fd, NULL, req->len, req->offset, FALLOC_FL_ZERO_RANGE, 0, on_zero,
                    req);
        break;
    default: {
        if (req->progress >= req->len) return finish_with_fua(req);
        uint64_t left = req->len - req->progress;
        uint64_t n = left < ZERO_CHUNK ? left : ZERO_CHUNK;
        uint64_t at = req->offset + req->progress;
        rc = submit(srv, IOE_OP_WRITE, fd_for(srv, at, n), srv->zeroes, n, at, 0, 0, on_zero, req);
        break;
    }
    }
    if (rc < 0) reply_error(req, rc, "write zeroes");
}

/* Block status for [offset, offset + len) from SEEK_DATA / SEEK_HOLE. */
static void answer_status(struct server *srv, struct nbd_request *req) {
    uint32_t max = req->flags & NBD_CMD_FLAG_REQ_ONE ? 1 : MAX_EXTENTS;
    uint8_t *out = malloc(24 + 8 * (size_t)max);
    if (!out) return reply_error(req, -ENOMEM, "block status");
    uint8_t *ext = out + 24;
    uint32_t n = 0;
    uint64_t pos = req->offset, end = req->offset + req->len;
    int fd = srv->fd_buffered;
    while (pos < end && n < max) {
        uint64_t next = end;
        uint32_t flags = 0;
        off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
        if (data < 0 && errno == ENXIO) {
            flags = NBD_STATE_HOLE | NBD_STATE_ZERO; /* a hole up to the end of the file */
        } else if (data < 0) {
            flags = 0; /* no hole information here (block device, old file system) */
        } else if ((uint64_t)data > pos) {
            flags = NBD_STATE_HOLE | NBD_STATE_ZERO;
            next = (uint64_t)data < end ? (uint64_t)data : end;
        } else {
            off_t hole = lseek(fd, (off_t)pos, SEEK_HOLE);
            if (hole > 0 && (uint64_t)hole < end) next = (uint64_t)hole;
        }
        /* Another client may punch or fill between the two seeks: an
         * extent is never empty (flags 0 is always a true answer). */
        if (next <= pos) {
            next = end;
            flags = 0;
        }
        put32(ext + 8 * n, (uint32_t)(next - pos));
        put32(ext + 8 * n + 4, flags);
        n++;
        pos = next;
    }
    size_t h = nbd_reply_status_header(out, req, n);
    ioe_conn_send(((struct conn *)req->conn)->ioc, out, h + 8 * (size_t)n);
    free(out);
    request_done(req);
}

static void *status_main(void *arg) {
    struct server *srv = arg;
    pthread_mutex_lock(&srv->mu);
    for (;;) {
        while (!srv->status_head && !srv->status_stop) pthread_cond_wait(&srv->status_cv, &srv->mu);
        struct nbd_request *req = srv->status_head;
        if (!req) break;
        srv->status_head = req->next;
        if (!srv->status_head) srv->status_tail = NULL;
        pthread_mutex_unlock(&srv->mu);
        answer_status(srv, req);
        pthread_mutex_lock(&srv->mu);
    }
    pthread_mutex_unlock(&srv->mu);
    return NULL;
}

/* A validated request from a connection's loop thread: start its I/O. */
static void on_request(void *io, struct nbd_request *req) {
    struct conn *c = io;
    struct server *srv = c->srv;
    atomic_fetch_add(&c->refs, 1);
    atomic_fetch_add(&c->inflight, 1);
    atomic_fetch_add(&srv->inflight, 1);
    int rc = 0;
    uint32_t fua = req->flags & NBD_CMD_FLAG_FUA ? IOE_RWF_DSYNC : 0;
    switch (req->type) {
    case NBD_CMD_READ: {
        req->mem = pool_alloc(NBD_HDR_ROOM + (size_t)req->len);
        if (!req->mem) return reply_error(req, -ENOMEM, "read");
        req->free_mem = pool_free;
        req->data = req->mem + NBD_HDR_ROOM;
        rc = submit(srv, IOE_OP_READ, fd_for(srv, req->offset, req->len), req->data, req->len, req->offset, 0, 0,
                    on_read, req);
        break;
    }
    case NBD_CMD_WRITE:
        /* FUA: durable before the reply, with no separate flush. */
        rc = submit(srv, IOE_OP_WRITE, fd_for(srv, req->offset, req->len), req->data, req->len, req->offset, 0, fua,
                    on_write, req);
        break;
    case NBD_CMD_FLUSH:
        rc = submit(srv, IOE_OP_FDATASYNC, srv->fd, NULL, 0, 0, 0, 0, on_flush, req);
        break;
    case NBD_CMD_TRIM:
        if (req->len == 0) return reply_ok(req);
        rc = submit(srv, IOE_OP_FALLOCATE, srv->fd, NULL, req->len, req->offset,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, on_trim, req);
        break;
    case NBD_CMD_WRITE_ZEROES:
        if (req->len == 0) return reply_ok(req);
        /* NO_HOLE: allocated zeroes; otherwise a hole reads as zeroes too. */
        req->stage = req->flags & NBD_CMD_FLAG_NO_HOLE ? ZERO_RANGE : ZERO_PUNCH;
        return zero_step(req);
    case NBD_CMD_BLOCK_STATUS:
        pthread_mutex_lock(&srv->mu);
        req->next = NULL;
        if (srv->status_tail) srv->status_tail->next = req;
        else srv->status_head = req;
        srv->status_tail = req;
        pthread_cond_signal(&srv->status_cv);
        pthread_mutex_unlock(&srv->mu);
        return;
    default:
        return reply_error(req, -EINVAL, "request");
    }
    if (rc < 0) reply_error(req, rc, "submit");
}

/* ------------------------------------------------------------- sessions */

static int session_send(void *io, const void *data, size_t len) {
    return ioe_conn_send(((struct conn *)io)->ioc, data, len);
}

static void session_close(void *io, int hard) {
    struct conn *c = io;
    if (hard) ioe_conn_abort(c->ioc);
    else ioe_conn_close(c->ioc);
}

/* Whether a request may go ahead within its connection's budget; 0, or the
 * NBD error it gets. Its bytes count until request_done. */
static uint32_t session_admit(void *io, const struct nbd_request *req) {
    struct conn *c = io;
    if (req->type != NBD_CMD_READ && req->type != NBD_CMD_WRITE) return 0;
    long before = atomic_fetch_add(&c->held_bytes, (long)req->len);
    if ((unsigned long long)before + req->len > CONN_BUDGET && before > 0) {
        atomic_fetch_sub(&c->held_bytes, (long)req->len);
        return NBD_ENOMEM;
    }
    return 0;
}

/* A write payload is in its buffer (or the connection ended first). */
static void payload_in(struct ioe_conn *ioc, void *buf, int64_t result, void *user_data) {
    (void)buf;
    (void)ioc;
    struct conn *c = user_data;
    struct server *srv = c->srv;
    batch.open = true;
    nbd_session_payload_in(c->session, result >= 0);
    batch.open = false;
    batch_flush(srv);
}

static int session_receive_into(void *io, uint8_t *dst, size_t len) {
    struct conn *c = io;
    return ioe_conn_recv_into(c->ioc, dst, len, payload_in, c);
}

static void on_high_water(struct ioe_conn *ioc, size_t queued, void *user_data) {
    (void)queued;
    (void)user_data;
    /* The client does not read its replies: it goes, the others stay. */
    ioe_conn_abort(ioc);
}

static void session_disconnect(void *io) {
    struct conn *c = io;
    atomic_store(&c->disconnect, true);
    close_if_idle(c);
}



static void on_connect(struct ioe_conn *ioc, void *user_data) {
    struct server *srv = user_data;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        ioe_conn_abort(ioc);
        return;
    }
    c->srv = srv;
    c->ioc = ioe_conn_ref(ioc);
    atomic_init(&c->refs, 1);
    c->session = nbd_session_new(&srv->exp, &srv->ops, c);
    if (!c->session) {
        ioe_conn_unref(c->ioc);
        free(c);
        ioe_conn_abort(ioc);
        return;
    }
    ioe_conn_set_context(ioc, c);
    pthread_mutex_lock(&srv->mu);
    /* Under the lock: either stop() sees this connection or this sees the stop. */
    if (atomic_load(&srv->stopping)) nbd_session_shutdown(c->session);
    c->next = srv->conns;
    if (srv->conns) srv->conns->prev = c;
    srv->conns = c;
    srv->open_conns++;
    pthread_mutex_unlock(&srv->mu);
    nbd_session_start(c->session);
}

static size_t on_data(struct ioe_conn *ioc, const void *data, size_t len, void *user_data) {
    struct server *srv = user_data;
    struct conn *c = ioe_conn_context(ioc);
    if (!c) return len;
    batch.open = true;
    size_t used = nbd_session_input(c->session, data, len);
    batch.open = false;
    batch_flush(srv);
    return used;
}

static void on_eof(struct ioe_conn *ioc, void *user_data) {
    (void)user_data;
    struct conn *c = ioe_conn_context(ioc);
    if (!c) {
        ioe_conn_close(ioc);
        return;
    }
    /* The client sends nothing more: answer what it asked, then close. */
    session_disconnect(c);
}

static void on_close(struct ioe_conn *ioc, int error, void *user_data) {
    (void)error;
    struct server *srv = user_data;
    struct conn *c = ioe_conn_context(ioc);
    if (!c) return;
    /* Requests still in flight finish; their replies find the connection closed. */
    nbd_session_shutdown(c->session);
    pthread_mutex_lock(&srv->mu);
    if (c->prev) c->prev->next = c->next;
    else srv->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    srv->open_conns--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    conn_unref(c);
}

/* ------------------------------------------------------------- start-up */

static int open_export(struct server *srv) {
    const struct options *o = &srv->o;
    int mode = o->read_only ? O_RDONLY : O_RDWR;
    srv->fd_buffered = open(o->file, mode | O_CLOEXEC);
    if (srv->fd_buffered < 0) return -errno;
    struct stat st;
    if (fstat(srv->fd_buffered, &st) < 0) return -errno;
    if (S_ISBLK(st.st_mode)) {
        uint64_t size = 0;
        if (ioctl(srv->fd_buffered, BLKGETSIZE64, &size) < 0) return -errno;
        srv->exp.size = size;
    } else if (S_ISREG(st.st_mode)) {
        srv->exp.size = (uint64_t)st.st_size;
    } else {
        return -EINVAL;
    }
    srv->fd = srv->fd_buffered;
    srv->dio_align = 1;
    if (o->direct) {
        srv->fd = open(o->file, mode | O_CLOEXEC | O_DIRECT);
        if (srv->fd < 0) return -errno;
        int lbs = 512;
        if (S_ISBLK(st.st_mode)) ioctl(srv->fd, BLKSSZGET, &lbs);
        /* 4096 covers every logical block size in use; smaller requests
         * take the buffered descriptor. */
        srv->dio_align = lbs > 4096 ? (uint32_t)lbs : 4096;
    }
    return 0;
}

/* Stops gracefully: new requests get NBD_ESHUTDOWN, those in flight are
 * answered, then connections close (their output sent), then the rest. */
static void stop(struct server *srv) {
    atomic_store(&srv->stopping, true);
    pthread_mutex_lock(&srv->mu);
    for (struct conn *c = srv->conns; c; c = c->next) nbd_session_shutdown(c->session);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 30;
    while (atomic_load(&srv->inflight) > 0 && pthread_cond_timedwait(&srv->cv, &srv->mu, &deadline) != ETIMEDOUT) {
    }
    for (struct conn *c = srv->conns; c; c = c->next) ioe_conn_close(c->ioc);
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 5;
    while (srv->open_conns > 0 && pthread_cond_timedwait(&srv->cv, &srv->mu, &deadline) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&srv->mu);
    ioe_server_destroy(srv->net);
    ioe_context_destroy(srv->ctx);
    pthread_mutex_lock(&srv->mu);
    srv->status_stop = true;
    pthread_cond_signal(&srv->status_cv);
    pthread_mutex_unlock(&srv->mu);
    pthread_join(srv->status_thread, NULL);
}

int main(int argc, char **argv) {
    struct server *srv = calloc(1, sizeof *srv);
    if (!srv) return 1;
    int parsed = nbd_parse_options(argc, argv, &srv->o);
    if (parsed == NBD_OPTIONS_HELP) {
        nbd_usage(stdout);
        return 0;
    }
    if (parsed == NBD_OPTIONS_VERSION) {
        printf("ioe-nbd %s\n", ioe_version_string());
        return 0;
    }
    if (parsed < 0) return 2;
    struct options *o = &srv->o;
    int rc = open_export(srv);
    if (rc < 0) {
        fprintf(stderr, "ioe-nbd: cannot serve %s: %s\n", o->file,
                rc == -EINVAL ? "not a regular file or block device" : strerror(-rc));
        return 1;
    }
    srv->exp.name = o->export_name;
    srv->exp.description = o->description;
    srv->exp.flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN;
    if (o->read_only) srv->exp.flags |= NBD_FLAG_READ_ONLY;
    else srv->exp.flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    srv->exp.min_block = 1;
    srv->exp.preferred_block = 4096;
    srv->exp.max_payload = NBD_MAX_PAYLOAD;
    srv->ops = (struct nbd_session_ops){.send = session_send, .close = session_close, .request = on_request,
                                        .admit = session_admit, .receive_into = session_receive_into,
                                        .disconnect = session_disconnect, .alloc = pool_alloc,
                                        .free = pool_free};
    if (ioe_buffer_alloc(ZERO_CHUNK, 4096, &srv->zeroes) < 0) return fprintf(stderr, "ioe-nbd: out of memory\n"), 1;
    pool_init();
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv, NULL);
    pthread_cond_init(&srv->status_cv, NULL);

    /* Every thread started from here on inherits the blocked stop signals;
     * this thread waits for them. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct ioe_context_options copts;
    ioe_context_options_init(&copts);
    copts.backend = o->backend;
    copts.depth = o->depth;
    /* A bound on queued disk requests across all clients (-EAGAIN beyond). */
    copts.max_queued = 65536;
    rc = ioe_context_create(&copts, &srv->ctx);
    if (rc < 0) {
        fprintf(stderr, "ioe-nbd: cannot start the disk engine: %s\n", ioe_strerror(rc));
        return 1;
    }
    if (pthread_create(&srv->status_thread, NULL, status_main, srv) != 0) {
        fprintf(stderr, "ioe-nbd: cannot start a thread\n");
        return 1;
    }

    struct ioe_server_options sopts;
    ioe_server_options_init(&sopts);
    char unix_spec[4096 + 8];
    if (o->unix_path) {
        snprintf(unix_spec, sizeof unix_spec, "unix:%s", o->unix_path);
        sopts.address = unix_spec;
    } else {
        sopts.address = o->bind;
        sopts.port = o->port;
    }
    if (o->loops_set) sopts.threads = o->loops;
    if (o->shared) sopts.max_connections = o->shared;
    sopts.high_water = CONN_HIGH_WATER;
    /* Write payloads arrive in large pieces: fewer, larger receive buffers
     * (8 MiB per loop) mean fewer completions and on_data calls per request. */
    sopts.recv_buffers = 128;
    sopts.recv_buffer_size = 64u << 10;
    struct ioe_server_callbacks cbs = {.on_connect = on_connect, .on_data = on_data, .on_eof = on_eof,
                                       .on_high_water = on_high_water, .on_close = on_close, .user_data = srv};
    rc = ioe_server_create(&sopts, &cbs, &srv->net);
    if (rc < 0) {
        if (o->unix_path) fprintf(stderr, "ioe-nbd: cannot listen on %s: %s\n", o->unix_path, ioe_strerror(rc));
        else fprintf(stderr, "ioe-nbd: cannot listen on %s port %u: %s\n", o->bind, o->port, ioe_strerror(rc));
        return 1;
    }
    bool net_uring = ioe_server_backend(srv->net) == IOE_NET_BACKEND_URING;
    /* auto: the loops where they have a ring; on epoll the engine (AIO, or
     * its helpers), whose batching the loops' helper threads lack. */
    srv->loop_io = o->disk_io == DISK_IO_LOOP || (o->disk_io == DISK_IO_AUTO && net_uring);
    rc = ioe_server_start(srv->net);
    if (rc < 0) {
        fprintf(stderr, "ioe-nbd: cannot start the server: %s\n", ioe_strerror(rc));
        return 1;
    }
    char where[4200];
    if (o->unix_path) snprintf(where, sizeof where, "unix socket %s", o->unix_path);
    else snprintf(where, sizeof where, "%s port %d", o->bind, ioe_server_port(srv->net));
    fprintf(stderr, "ioe-nbd: serving %s (%" PRIu64 " bytes%s%s) as '%s' on %s (disk: %s, network: %s)\n",
            o->file, srv->exp.size, o->read_only ? ", read-only" : "", o->direct ? ", O_DIRECT" : "",
            o->export_name, where,
            srv->loop_io ? (net_uring ? "the loops' io_uring" : "the loops' helper threads")
                         : ioe_backend_name((uint32_t)ioe_context_backend(srv->ctx)),
            ioe_server_backend(srv->net) == IOE_NET_BACKEND_URING ? "io_uring" : "epoll");
    fflush(stderr);

    int sig = 0;
    sigwait(&stop_signals, &sig);
    fprintf(stderr, "ioe-nbd: %s: stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    stop(srv);
    if (srv->fd != srv->fd_buffered) close(srv->fd);
    close(srv->fd_buffered);
    ioe_buffer_free(srv->zeroes);
    free(srv);
    return 0;
}
