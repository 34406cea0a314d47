/* One NBD connection's protocol state: the fixed newstyle handshake and
 * option haggling, then request parsing and validation. It does no I/O of
 * its own: bytes go out through `ops->send`, validated requests go to
 * `ops->request`, so it can be driven by a test or a fuzzer as well as by
 * the server. Everything here runs on the one thread that feeds the
 * connection's input; the reply builders may run anywhere. */
#ifndef IOE_NBD_SESSION_H
#define IOE_NBD_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Room kept in front of every data buffer for a reply header, so a read
 * reply goes out as one contiguous send and the data stays aligned for
 * O_DIRECT (4096 is a multiple of every logical block size). */
#define NBD_HDR_ROOM 4096

/* The largest READ or WRITE payload accepted (32 MiB, the protocol's
 * recommended limit), and the largest option a client may send. */
#define NBD_MAX_PAYLOAD (32u << 20)
#define NBD_MAX_OPTION (64u << 10)

/* A write payload with at least this much still to arrive is received
 * straight into its buffer (ops->receive_into), when offered. */
#define NBD_RECEIVE_INTO_MIN (32u << 10)

/* The one export a server offers. */
struct nbd_export_info {
    const char *name;        /* matched by name; the empty name means it too */
    const char *description; /* may be NULL */
    uint64_t size;
    uint16_t flags;          /* NBD_FLAG_* transmission flags */
    uint32_t min_block, preferred_block, max_payload;
};

struct nbd_session;

/* A validated transmission request. The export answers it (with the
 * builders below) and frees it with nbd_request_free. */
struct nbd_request {
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
    uint16_t type;
    uint16_t flags;
    bool structured;     /* structured replies were negotiated */
    uint32_t meta_id;    /* BLOCK_STATUS: the base:allocation context id */
    uint8_t *mem;        /* NBD_HDR_ROOM + payload bytes (WRITE), or NULL */
    uint8_t *data;       /* mem + NBD_HDR_ROOM */
    void *conn;          /* the `io` of the session that made it */
    void (*free_mem)(void *mem);
    /* For the export side. */
    uint64_t progress;
    int stage;
    struct nbd_request *next;
};

struct nbd_session_ops {
    /* Queues a copy of the bytes for the peer; 0 or a negative errno. */
    int (*send)(void *io, const void *data, size_t len);
    /* Ends the connection: once queued output is sent (hard = 0), or at
     * once (hard = 1, for protocol violations). */
    void (*close)(void *io, int hard);
    /* Whether a valid request may go ahead (resource limits): 0, or the
     * NBD error to answer it with. May be NULL. */
    uint32_t (*admit)(void *io, const struct nbd_request *req);
    /* A request to carry out; ownership passes to the callee. */
    void (*request)(void *io, struct nbd_request *req);
    /* NBD_CMD_DISC: close once every request handed over is answered. */
    void (*disconnect)(void *io);
    /* Optional: takes the rest of a write payload, `len` bytes, straight
     * into `dst` (ioe_conn_recv_into). 0: the bytes after those consumed so
     * far go there, no more input is fed until nbd_session_payload_in; else
     * the session copies them as they arrive. Asked only for large ones. */
    int (*receive_into)(void *io, uint8_t *dst, size_t len);
    /* Buffers for write payloads (aligned for O_DIRECT); NULL on failure. */
    void *(*alloc)(size_t len);
    void (*free)(void *mem);
};

/* NULL only when out of memory. */
struct nbd_session *nbd_session_new(const struct nbd_export_info *exp, const struct nbd_session_ops *ops, void *io);
void nbd_session_free(struct nbd_session *s);
/* Sends the server's greeting; call once, first. */
void nbd_session_start(struct nbd_session *s);
/* Feeds bytes from the peer; returns how many were consumed (the rest is
 * offered again with the next bytes, so a message may arrive in pieces). */
size_t nbd_session_input(struct nbd_session *s, const uint8_t *data, size_t len);
/* The payload receive_into took is in (ok) or never will be (the
 * connection ended): the write goes ahead, or is dropped. */
void nbd_session_payload_in(struct nbd_session *s, bool ok);
/* From now on requests are answered with NBD_ESHUTDOWN and options with
 * NBD_REP_ERR_SHUTDOWN. Any thread. */
void nbd_session_shutdown(struct nbd_session *s);
/* Whether the handshake is over (transmission phase). */
bool nbd_session_transmitting(const struct nbd_session *s);

void nbd_request_free(struct nbd_request *req);

/* Reply builders. Each writes a complete reply message and returns its
 * length. */
/* Success without data (every command but READ and BLOCK_STATUS). */
size_t nbd_reply_ok(uint8_t out[32], const struct nbd_request *req);
/* An error (nbd_errno from NBD_E*), with a short message when structured. */
size_t nbd_reply_error(uint8_t out[128], const struct nbd_request *req, uint32_t nbd_errno, const char *message);
/* The header of a successful READ reply, written so that it ends at
 * `data` (at most 28 bytes before it); returns its length. */
size_t nbd_reply_read_header(uint8_t *data, const struct nbd_request *req, uint32_t len);
/* The header of a BLOCK_STATUS reply with `extents` descriptors, which the
 * caller writes right after it (8 bytes each: length, flags); returns the
 * header length (24). */
size_t nbd_reply_status_header(uint8_t out[24], const struct nbd_request *req, uint32_t extents);
/* The NBD error for a negative errno. */
uint32_t nbd_errno_from(int neg_errno);

#endif
