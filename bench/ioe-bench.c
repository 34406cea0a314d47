/* ioe-bench: measures ioengine through its public C API only.
 *
 * Each job keeps --iodepth requests in flight: every completion callback
 * records the latency and submits the next request from the callback itself
 * (the natural asynchronous pattern), until the run time or I/O count is
 * reached. With --submit thread each job instead has a thread of its own that
 * submits every request: callbacks hand finished slots back to it (the
 * pattern of a database whose worker threads issue reads). --contexts spreads
 * the jobs over several contexts. With no arguments it runs a short, self-checking
 * read/write workload on a temporary file and prints a summary.
 *
 * Latency percentiles come from a log-linear histogram (32 sub-buckets per
 * power of two, so within about 3%), never from sorting samples. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#include <ioengine.h>

#include "bench_common.h"

/* ------------------------------------------------------------------ options */

enum pattern { PAT_RANDREAD, PAT_RANDWRITE, PAT_READ, PAT_WRITE, PAT_RANDRW };
static const char *const PATTERN_NAMES[] = {"randread", "randwrite", "read", "write", "randrw"};

struct options {
    uint32_t backend;
    enum pattern pattern;
    int read_pct;       /* randrw: share of reads */
    uint64_t bs;
    uint32_t iodepth;   /* per submitting thread */
    uint32_t threads;
    uint32_t contexts;  /* jobs are spread over this many contexts */
    bool submit_thread; /* each job's own thread submits, not the callbacks */
    const char *path;   /* NULL: temporary file */
    uint64_t size;
    bool direct;
    double runtime;     /* seconds; 0 = until io_count */
    uint64_t io_count;  /* total; 0 = until runtime */
    bool merge;
    uint64_t merge_limit;
    uint32_t workers;   /* callback threads; 0 = on the poller */
    bool sqpoll;
    uint32_t sqpoll_idle_ms;
    bool json;
    bool verify;
    bool prefill;
    bool idle_check;    /* show that an idle context uses no CPU */
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: ioe-bench [options]\n"
            "  --backend auto|uring|aio   engine backend (default auto)\n"
            "  --rw PATTERN               randread, randwrite, read, write, randrw (default randrw)\n"
            "  --rwmixread PCT            randrw: percentage of reads (default 50)\n"
            "  --bs SIZE                  block size, e.g. 4k (default 4k)\n"
            "  --iodepth N                I/Os in flight per submitting thread (default 32)\n"
            "  --threads N                jobs, each with --iodepth in flight (default 1)\n"
            "  --submit callback|thread   who submits the next I/O: the completion callback\n"
            "                             (default) or a thread per job that callbacks wake\n"
            "  --contexts N               spread the jobs over N contexts (default 1)\n"
            "  --filename PATH            file or block device (default: a temporary file)\n"
            "  --size SIZE                bytes of the file to use (default 64m; device: its size)\n"
            "  --direct 0|1               O_DIRECT (default 0)\n"
            "  --runtime SECONDS          run time (default 2; 0 with --number)\n"
            "  --number N                 total I/Os instead of a run time\n"
            "  --merge LIMIT              merge contiguous requests up to LIMIT bytes (e.g. 128k)\n"
            "  --workers N                callback threads (default 0: callbacks on the poller)\n"
            "  --sqpoll MS                io_uring SQPOLL with MS idle time\n"
            "  --verify 0|1               check every byte read (default 1 without options, else 0)\n"
            "  --prefill 0|1              write the whole file before reads (default 1)\n"
            "  --json                     print the result as JSON (progress goes to stderr)\n"
            "  -h, --help                 this text\n");
}

static int parse_u32(const char *s, uint32_t min, uint32_t max, uint32_t *out) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) return -1;
    *out = (uint32_t)v;
    return 0;
}

static int parse_bool(const char *s, bool *out) {
    if (!strcmp(s, "1") || !strcmp(s, "true") || !strcmp(s, "on")) return *out = true, 0;
    if (!strcmp(s, "0") || !strcmp(s, "false") || !strcmp(s, "off")) return *out = false, 0;
    return -1;
}

#define BAD(...) do { fprintf(stderr, "ioe-bench: " __VA_ARGS__); fputc('\n', stderr); return -1; } while (0)

static int parse_options(int argc, char **argv, struct options *o) {
    *o = (struct options){.backend = IOE_BACKEND_AUTO, .pattern = PAT_RANDRW, .read_pct = 50, .bs = 4096,
                          .iodepth = 32, .threads = 1, .contexts = 1, .size = 64ull << 20, .runtime = 2.0,
                          .merge_limit = 0, .verify = argc == 1, .prefill = true, .idle_check = argc == 1};
    static const struct option longopts[] = {
        {"backend", required_argument, 0, 'B'}, {"rw", required_argument, 0, 'r'},
        {"rwmixread", required_argument, 0, 'M'}, {"bs", required_argument, 0, 'b'},
        {"iodepth", required_argument, 0, 'q'}, {"threads", required_argument, 0, 't'},
        {"numjobs", required_argument, 0, 't'}, {"filename", required_argument, 0, 'f'},
        {"size", required_argument, 0, 's'}, {"direct", required_argument, 0, 'd'},
        {"runtime", required_argument, 0, 'T'}, {"number", required_argument, 0, 'n'},
        {"merge", required_argument, 0, 'm'}, {"workers", required_argument, 0, 'w'},
        {"sqpoll", required_argument, 0, 'S'}, {"verify", required_argument, 0, 'v'},
        {"prefill", required_argument, 0, 'p'}, {"json", no_argument, 0, 'j'},
        {"submit", required_argument, 0, 'U'}, {"contexts", required_argument, 0, 'C'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    bool runtime_set = false;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'B':
            if (!strcmp(optarg, "auto")) o->backend = IOE_BACKEND_AUTO;
            else if (!strcmp(optarg, "uring") || !strcmp(optarg, "io_uring")) o->backend = IOE_BACKEND_URING;
            else if (!strcmp(optarg, "aio") || !strcmp(optarg, "libaio")) o->backend = IOE_BACKEND_AIO;
            else BAD("--backend must be auto, uring or aio, not '%s'", optarg);
            break;
        case 'r': {
            int found = -1;
            for (int i = 0; i < 5; i++)
                if (!strcmp(optarg, PATTERN_NAMES[i])) found = i;
            if (found < 0) BAD("--rw must be randread, randwrite, read, write or randrw, not '%s'", optarg);
            o->pattern = (enum pattern)found;
            break;
        }
        case 'M': {
            uint32_t v;
            if (parse_u32(optarg, 0, 100, &v)) BAD("--rwmixread must be 0 to 100");
            o->read_pct = (int)v;
            break;
        }
        case 'b':
            if (parse_size(optarg, &o->bs) || o->bs == 0 || o->bs > (64u << 20)) BAD("--bs must be 1 byte to 64m");
            break;
        case 'q':
            if (parse_u32(optarg, 1, 4096, &o->iodepth)) BAD("--iodepth must be 1 to 4096");
            break;
        case 't':
            if (parse_u32(optarg, 1, 256, &o->threads)) BAD("--threads must be 1 to 256");
            break;
        case 'U':
            if (!strcmp(optarg, "thread")) o->submit_thread = true;
            else if (!strcmp(optarg, "callback")) o->submit_thread = false;
            else BAD("--submit must be callback or thread, not '%s'", optarg);
            break;
        case 'C':
            if (parse_u32(optarg, 1, 256, &o->contexts)) BAD("--contexts must be 1 to 256");
            break;
        case 'f': o->path = optarg; break;
        case 's':
            if (parse_size(optarg, &o->size) || o->size == 0) BAD("--size must be a positive size");
            break;
        case 'd':
            if (parse_bool(optarg, &o->direct)) BAD("--direct must be 0 or 1");
            break;
        case 'T': {
            char *end;
            o->runtime = strtod(optarg, &end);
            if (*end || o->runtime < 0 || o->runtime > 86400) BAD("--runtime must be 0 to 86400 seconds");
            runtime_set = true;
            break;
        }
        case 'n':
            if (parse_size(optarg, &o->io_count) || o->io_count == 0) BAD("--number must be a positive count");
            break;
        case 'm':
            if (parse_size(optarg, &o->merge_limit) || o->merge_limit == 0) BAD("--merge must be a positive size");
            o->merge = true;
            break;
        case 'w':
            if (parse_u32(optarg, 0, 1024, &o->workers)) BAD("--workers must be 0 to 1024");
            break;
        case 'S':
            if (parse_u32(optarg, 0, 60000, &o->sqpoll_idle_ms)) BAD("--sqpoll must be 0 to 60000 ms");
            o->sqpoll = true;
            break;
        case 'v':
            if (parse_bool(optarg, &o->verify)) BAD("--verify must be 0 or 1");
            break;
        case 'p':
            if (parse_bool(optarg, &o->prefill)) BAD("--prefill must be 0 or 1");
            break;
        case 'j': o->json = true; break;
        case 'h': usage(stdout); exit(0);
        default:
            if (optopt) BAD("option '-%c' needs a value or is unknown; see --help", optopt);
            BAD("unknown option '%s'; see --help", argv[optind - 1]);
        }
    }
    if (optind < argc) BAD("unexpected argument '%s'; see --help", argv[optind]);
    if (o->io_count && !runtime_set) o->runtime = 0;
    if (o->runtime == 0 && o->io_count == 0) BAD("give a --runtime or a --number of I/Os");
    if (o->merge && o->merge_limit < o->bs) BAD("--merge limit must be at least --bs");
    if (o->contexts > o->threads) BAD("--contexts must be at most --threads (each context serves whole jobs)");
    if (o->merge && o->submit_thread) BAD("--merge works with --submit callback only");
    if (o->size < o->bs * o->threads) BAD("--size must hold at least one block per thread");
    if ((uint64_t)o->iodepth * o->threads > IOE_MAX_DEPTH) BAD("--iodepth x --threads must be at most %u", IOE_MAX_DEPTH);
    return 0;
}

/* ---------------------------------------------------------------- histogram */

#define SUB_BITS 5
#define SUB (1u << SUB_BITS)
#define NBUCKETS ((64 - SUB_BITS + 1) * SUB)

struct histogram {
    _Atomic uint64_t counts[NBUCKETS];
    _Atomic uint64_t max;
};

static unsigned bucket_of(uint64_t v) {
    if (v < SUB) return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;
    return (shift + 1) * SUB + (unsigned)((v >> shift) & (SUB - 1));
}

/* Middle of the bucket's value range. */
static uint64_t bucket_value(unsigned b) {
    if (b < SUB) return b;
    unsigned shift = b / SUB - 1;
    uint64_t low = ((uint64_t)(SUB + b % SUB)) << shift;
    return low + ((1ull << shift) >> 1);
}

static void hist_add(struct histogram *h, uint64_t v) {
    atomic_fetch_add_explicit(&h->counts[bucket_of(v)], 1, memory_order_relaxed);
    uint64_t m = atomic_load_explicit(&h->max, memory_order_relaxed);
    while (v > m && !atomic_compare_exchange_weak_explicit(&h->max, &m, v, memory_order_relaxed, memory_order_relaxed)) {
    }
}

static uint64_t hist_percentile(const uint64_t *counts, uint64_t total, double p) {
    if (total == 0) return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)total + 0.5);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < NBUCKETS; b++) {
        seen += counts[b];
        if (seen >= rank) return bucket_value(b);
    }
    return 0;
}

/* -------------------------------------------------------------------- state */

struct job;

struct ioslot {
    struct job *job;
    uint8_t *buf;
    uint64_t offset;
    uint64_t start_ns;
    uint64_t rng;
    bool is_read;
};

struct bench;

struct job {
    struct bench *b;
    struct ioe_context *ctx;
    int index;
    /* --submit thread: slots the callbacks finished, for the job's thread. */
    pthread_t thread;
    pthread_mutex_t ready_mu;
    pthread_cond_t ready_cv;
    struct ioslot **ready;
    uint32_t ready_count;
    bool thread_waiting;
    uint64_t region_start; /* this thread's part of the file */
    uint64_t region_blocks;
    struct ioslot *slots;
    _Atomic uint64_t seq_cursor;
    _Atomic long active;      /* slots still cycling */
    struct ioe_merger *merger;
    pthread_mutex_t merge_mu; /* serialises merger add/flush decisions */
    long merge_in_flight;     /* requests submitted through the merger, not completed */
    struct histogram *hist;
    _Atomic uint64_t ios, bytes, errors, mismatches;
};

struct bench {
    struct options o;
    int fd;
    struct ioe_context **ctxs;
    struct ioe_workers *workers;
    struct job *jobs;
    _Atomic bool stop;
    _Atomic uint64_t issued;
    _Atomic int first_error;
    pthread_mutex_t done_mu;
    pthread_cond_t done_cv;
    long jobs_active;
};

/* The bytes a block at `offset` always holds: written by prefill and by every
 * write, so a read can check them whatever ran before. */
static void fill_block(uint8_t *buf, uint64_t len, uint64_t offset) {
    uint64_t x = offset * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    for (; i < len; i++) buf[i] = (uint8_t)(offset + i);
}

static bool check_block(const uint8_t *buf, uint64_t len, uint64_t offset) {
    uint8_t small[4096];
    uint8_t *expected = len <= sizeof small ? small : malloc(len);
    if (!expected) return false;
    fill_block(expected, len, offset);
    bool same = memcmp(expected, buf, len) == 0;
    if (expected != small) free(expected);
    return same;
}

static void report_error(struct bench *b, const char *what, int64_t result, uint64_t offset) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&b->first_error, &expected, 1))
        fprintf(stderr, "ioe-bench: %s at offset %" PRIu64 ": %s\n", what, offset,
                result < 0 ? ioe_strerror((int)result) : "short transfer");
}

static void on_complete(void *user_data, int64_t result);

/* Whether another I/O may start: not stopped, count not reached. */
static bool claim_io(struct bench *b) {
    if (atomic_load_explicit(&b->stop, memory_order_relaxed)) return false;
    if (b->o.io_count == 0) return true;
    return atomic_fetch_add_explicit(&b->issued, 1, memory_order_relaxed) < b->o.io_count;
}

static void retire_slot(struct job *j) {
    if (atomic_fetch_sub(&j->active, 1) == 1) {
        struct bench *b = j->b;
        pthread_mutex_lock(&b->done_mu);
        b->jobs_active--;
        pthread_cond_broadcast(&b->done_cv);
        pthread_mutex_unlock(&b->done_mu);
    }
}

/* Picks the slot's next operation and offset. */
static void next_io(struct ioslot *s) {
    struct job *j = s->job;
    struct bench *b = j->b;
    const struct options *o = &b->o;
    uint64_t block;
    switch (o->pattern) {
    case PAT_READ:
    case PAT_WRITE:
        block = atomic_fetch_add_explicit(&j->seq_cursor, 1, memory_order_relaxed) % j->region_blocks;
        s->is_read = o->pattern == PAT_READ;
        break;
    default:
        block = xorshift(&s->rng) % j->region_blocks;
        s->is_read = o->pattern == PAT_RANDREAD ||
                     (o->pattern == PAT_RANDRW && (int)(xorshift(&s->rng) % 100) < o->read_pct);
        break;
    }
    s->offset = j->region_start + block * o->bs;
    if (!s->is_read && o->verify) fill_block(s->buf, o->bs, s->offset);
    s->start_ns = now_ns();
}

/* Picks the slot's next operation and offset and submits it. */
static void issue(struct ioslot *s) {
    struct job *j = s->job;
    struct bench *b = j->b;
    const struct options *o = &b->o;
    next_io(s);
    int rc;
    if (j->merger) {
        /* Flush when the run is full (the merger does it) or when nothing else
         * of this thread is in flight, so a partial run never waits forever. */
        pthread_mutex_lock(&j->merge_mu);
        int held_before = ioe_merger_held(j->merger);
        rc = ioe_merger_add(j->merger, s->buf, o->bs, s->offset, on_complete, s);
        int held_after = ioe_merger_held(j->merger);
        /* Whatever left the merger during the add was submitted. */
        if (rc == 0) j->merge_in_flight += held_before + 1 - held_after;
        if (rc == 0 && j->merge_in_flight == 0 && held_after > 0) {
            ioe_merger_flush(j->merger);
            j->merge_in_flight += held_after;
        }
        pthread_mutex_unlock(&j->merge_mu);
    } else if (s->is_read) {
        rc = ioe_read(j->ctx, b->fd, s->buf, o->bs, s->offset, IOE_CHANNEL_READ, on_complete, s);
    } else {
        rc = ioe_write(j->ctx, b->fd, s->buf, o->bs, s->offset, IOE_CHANNEL_WRITE, on_complete, s);
    }
    if (rc < 0) {
        report_error(b, "submit", rc, s->offset);
        atomic_fetch_add(&j->errors, 1);
        retire_slot(j);
    }
}

static void on_complete(void *user_data, int64_t result) {
    struct ioslot *s = user_data;
    struct job *j = s->job;
    struct bench *b = j->b;
    hist_add(j->hist, now_ns() - s->start_ns);
    if (result != (int64_t)b->o.bs) {
        report_error(b, s->is_read ? "read" : "write", result, s->offset);
        atomic_fetch_add_explicit(&j->errors, 1, memory_order_relaxed);
    } else if (s->is_read && b->o.verify && !check_block(s->buf, b->o.bs, s->offset)) {
        report_error(b, "data mismatch", 0, s->offset);
        atomic_fetch_add_explicit(&j->mismatches, 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&j->ios, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&j->bytes, b->o.bs, memory_order_relaxed);
    if (j->merger) {
        pthread_mutex_lock(&j->merge_mu);
        j->merge_in_flight--;
        /* The last one in flight: push out whatever is held. */
        if (j->merge_in_flight == 0 && ioe_merger_held(j->merger) > 0) {
            j->merge_in_flight += ioe_merger_held(j->merger);
            ioe_merger_flush(j->merger);
        }
        pthread_mutex_unlock(&j->merge_mu);
    }
    if (b->o.submit_thread) {
        /* Hand the slot to the job's thread; wake it only if it sleeps. */
        pthread_mutex_lock(&j->ready_mu);
        j->ready[j->ready_count++] = s;
        bool wake = j->thread_waiting;
        j->thread_waiting = false;
        pthread_mutex_unlock(&j->ready_mu);
        if (wake) pthread_cond_signal(&j->ready_cv);
        return;
    }
    if (claim_io(b)) issue(s);
    else retire_slot(j);
}

/* --submit thread: the job's thread submits its first burst, then every slot
 * the callbacks hand back, until all of its slots have retired. */
static void *job_thread(void *arg) {
    struct job *j = arg;
    struct bench *b = j->b;
    uint32_t depth = b->o.iodepth;
    struct ioslot **batch = calloc(depth, sizeof *batch);
    struct ioe_request *reqs = calloc(depth, sizeof *reqs);
    if (!batch || !reqs) abort();
    for (uint32_t i = 0; i < depth; i++) {
        if (claim_io(b)) issue(&j->slots[i]);
        else retire_slot(j);
    }
    while (atomic_load(&j->active) > 0) {
        pthread_mutex_lock(&j->ready_mu);
        while (j->ready_count == 0) {
            j->thread_waiting = true;
            pthread_cond_wait(&j->ready_cv, &j->ready_mu);
        }
        uint32_t n = j->ready_count;
        memcpy(batch, j->ready, n * sizeof *batch);
        j->ready_count = 0;
        pthread_mutex_unlock(&j->ready_mu);
        /* The slots handed back go in as one batch, as a liburing user
         * prepares several entries and submits them with one call. */
        uint32_t queued = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct ioslot *s = batch[i];
            if (!claim_io(b)) {
                retire_slot(j);
                continue;
            }
            next_io(s);
            reqs[queued++] = (struct ioe_request){
                .op = s->is_read ? IOE_OP_READ : IOE_OP_WRITE,
                .channel = s->is_read ? IOE_CHANNEL_READ : IOE_CHANNEL_WRITE,
                .fd = b->fd, .buf = s->buf, .len = b->o.bs, .offset = s->offset,
                .callback = on_complete, .user_data = s};
        }
        for (uint32_t done = 0; done < queued;) {
            int64_t rc = ioe_submit_batch(j->ctx, reqs + done, queued - done);
            if (rc < 0) {
                /* The first one was refused: count it and go on with the rest. */
                struct ioslot *s = reqs[done].user_data;
                report_error(b, "submit", rc, s->offset);
                atomic_fetch_add(&j->errors, 1);
                retire_slot(j);
                done++;
            } else {
                done += (uint32_t)rc;
            }
        }
    }
    free(batch);
    free(reqs);
    return NULL;
}

/* -------------------------------------------------------------- file set-up */

static int open_target(struct bench *b, char *tmp_path, size_t tmp_len, bool *is_temp) {
    struct options *o = &b->o;
    int flags = O_RDWR | (o->direct ? O_DIRECT : 0);
    *is_temp = false;
    if (!o->path) {
        const char *dir = getenv("TMPDIR");
        snprintf(tmp_path, tmp_len, "%s/ioe-bench-XXXXXX", dir && *dir ? dir : "/tmp");
        int fd = mkstemp(tmp_path);
        if (fd < 0) return -errno;
        close(fd);
        *is_temp = true;
        o->path = tmp_path;
    }
    int fd = open(o->path, flags | O_CREAT, 0644);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    if (S_ISBLK(st.st_mode)) {
        uint64_t dev_size = 0;
        if (ioctl(fd, BLKGETSIZE64, &dev_size) < 0) return -errno;
        if (o->size > dev_size) o->size = dev_size;
        /* Never overwrite a whole device just to prepare; without a known
         * pattern on it, reads cannot be verified. */
        o->prefill = false;
        if (o->verify) {
            close(fd);
            return -EINVAL;
        }
    }
    return fd;
}

/* Writes the whole region with the block pattern through the engine (1 MiB
 * requests), so reads hit real blocks and can be verified. */
/* Without verification a regular file already as large as the region is used
 * as it is (its blocks are real; their contents do not matter). */
static bool prefill_needed(const struct bench *b) {
    struct stat st;
    if (!b->o.prefill) return false;
    return b->o.verify || fstat(b->fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < b->o.size;
}

static int prefill(struct bench *b) {
    const struct options *o = &b->o;
    const uint64_t chunk = 1u << 20;
    struct stat st;
    if (fstat(b->fd, &st) < 0) return -errno;
    if (S_ISREG(st.st_mode) && ftruncate(b->fd, (off_t)o->size) < 0) return -errno;
    uint8_t *buf = NULL;
    if (ioe_buffer_alloc(chunk, 0, (void **)&buf) != 0) return -ENOMEM;
    int rc = 0;
    for (uint64_t off = 0; off < o->size && rc == 0; off += chunk) {
        uint64_t len = o->size - off < chunk ? o->size - off : chunk;
        /* Block-wise pattern, so any bs reads the same bytes back. */
        for (uint64_t p = 0; p < len; p += o->bs) {
            uint64_t n = len - p < o->bs ? len - p : o->bs;
            fill_block(buf + p, n, off + p);
        }
        ssize_t w = pwrite(b->fd, buf, len, (off_t)off);
        if (w != (ssize_t)len) rc = w < 0 ? -errno : -EIO;
    }
    if (rc == 0 && fsync(b->fd) < 0) rc = -errno;
    ioe_buffer_free(buf);
    return rc;
}

/* ------------------------------------------------------------------- output */

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int64_t running(struct bench *b) {
    int64_t n = 0;
    for (uint32_t c = 0; c < b->o.contexts; c++) n += ioe_context_running(b->ctxs[c]);
    return n;
}

static uint64_t total_ios(struct bench *b) {
    uint64_t n = 0;
    for (uint32_t t = 0; t < b->o.threads; t++) n += atomic_load(&b->jobs[t].ios);
    return n;
}

/* ---------------------------------------------------------------------- main */

int main(int argc, char **argv) {
    struct bench *b = calloc(1, sizeof *b);
    if (!b || parse_options(argc, argv, &b->o) != 0) return 2;
    struct options *o = &b->o;
    FILE *info = o->json ? stderr : stdout;
    pthread_mutex_init(&b->done_mu, NULL);
    pthread_cond_init(&b->done_cv, NULL);

    char tmp_path[512];
    bool is_temp;
    b->fd = open_target(b, tmp_path, sizeof tmp_path, &is_temp);
    if (b->fd < 0) {
        fprintf(stderr, "ioe-bench: cannot use %s: %s%s\n", o->path ? o->path : "a temporary file", ioe_strerror(b->fd),
                b->fd == -EINVAL ? " (on a block device use --verify 0: it is never prefilled)" : "");
        return 1;
    }
    o->size -= o->size % o->bs;
    if (prefill_needed(b)) {
        fprintf(info, "ioe-bench: writing %" PRIu64 " MiB of %s%s\n", o->size >> 20, o->path,
                is_temp ? " (temporary)" : "");
        int rc = prefill(b);
        if (rc < 0) {
            fprintf(stderr, "ioe-bench: prefill failed: %s\n", ioe_strerror(rc));
            return 1;
        }
    }

    struct ioe_context_options copts;
    ioe_context_options_init(&copts);
    copts.backend = o->backend;
    /* Each context holds the slots of the jobs it serves (job t uses context
     * t % contexts). */
    copts.depth = o->iodepth * ((o->threads + o->contexts - 1) / o->contexts);
    if (o->sqpoll) {
        copts.flags |= IOE_SETUP_SQPOLL;
        copts.sqpoll_idle_ms = o->sqpoll_idle_ms;
    }
    if (o->workers) {
        int rc = ioe_workers_create(o->workers, &b->workers);
        if (rc < 0) return fprintf(stderr, "ioe-bench: workers: %s\n", ioe_strerror(rc)), 1;
        copts.workers = b->workers;
    }
    b->ctxs = calloc(o->contexts, sizeof *b->ctxs);
    if (!b->ctxs) return 1;
    int rc = 0;
    for (uint32_t c = 0; c < o->contexts && rc == 0; c++) rc = ioe_context_create(&copts, &b->ctxs[c]);
    if (rc < 0) {
        fprintf(stderr, "ioe-bench: cannot start the %s backend: %s\n", ioe_backend_name(o->backend), ioe_strerror(rc));
        if (is_temp) unlink(tmp_path);
        /* 77: the backend is not available on this machine (not an error of
         * ioe-bench; the test suite reports it as skipped). */
        return rc == -ENOSYS || rc == -EPERM || rc == -EACCES || rc == -EOPNOTSUPP ? 77 : 1;
    }
    uint32_t backend = (uint32_t)ioe_context_backend(b->ctxs[0]);

    /* Jobs, slots and buffers. */
    b->jobs = calloc(o->threads, sizeof *b->jobs);
    if (!b->jobs) return 1;
    uint64_t blocks_per_job = o->size / o->bs / o->threads;
    for (uint32_t t = 0; t < o->threads; t++) {
        struct job *j = &b->jobs[t];
        j->b = b;
        j->ctx = b->ctxs[t % o->contexts];
        j->index = (int)t;
        pthread_mutex_init(&j->ready_mu, NULL);
        pthread_cond_init(&j->ready_cv, NULL);
        j->ready = calloc(o->iodepth, sizeof *j->ready);
        if (!j->ready) return 1;
        j->region_start = (uint64_t)t * blocks_per_job * o->bs;
        j->region_blocks = blocks_per_job;
        j->slots = calloc(o->iodepth, sizeof *j->slots);
        j->hist = calloc(1, sizeof *j->hist);
        if (!j->slots || !j->hist) return 1;
        pthread_mutex_init(&j->merge_mu, NULL);
        for (uint32_t i = 0; i < o->iodepth; i++) {
            struct ioslot *s = &j->slots[i];
            s->job = j;
            s->rng = 0x2545f4914f6cdd1dull ^ ((uint64_t)t << 32) ^ (i * 0x9e3779b97f4a7c15ull + 1);
            if (ioe_buffer_alloc(o->bs, 0, (void **)&s->buf) != 0) return fprintf(stderr, "ioe-bench: out of memory\n"), 1;
            if (!o->verify) fill_block(s->buf, o->bs, 0);
        }
        if (o->merge) {
            uint32_t op = (o->pattern == PAT_READ || o->pattern == PAT_RANDREAD) ? IOE_OP_READ : IOE_OP_WRITE;
            if (o->pattern == PAT_RANDRW) return fprintf(stderr, "ioe-bench: --merge needs a read-only or write-only pattern\n"), 2;
            rc = ioe_merger_create(j->ctx, b->fd, op, op == IOE_OP_READ ? IOE_CHANNEL_READ : IOE_CHANNEL_WRITE,
                                   o->merge_limit, &j->merger);
            if (rc < 0) return fprintf(stderr, "ioe-bench: merger: %s\n", ioe_strerror(rc)), 1;
        }
    }

    fprintf(info, "ioe-bench: %s bs=%" PRIu64 " iodepth=%u threads=%u contexts=%u submit=%s backend=%s direct=%d merge=%s workers=%u%s %s=%g\n",
            PATTERN_NAMES[o->pattern], o->bs, o->iodepth, o->threads, o->contexts,
            o->submit_thread ? "thread" : "callback", ioe_backend_name(backend), o->direct,
            o->merge ? "on" : "off", o->workers, o->sqpoll ? " sqpoll" : "", o->io_count ? "ios" : "runtime",
            o->io_count ? (double)o->io_count : o->runtime);

    long rss_start = rss_kib();
    double cpu_start = cpu_seconds();
    uint64_t t_start = now_ns();
    b->jobs_active = o->threads;
    /* The submitting threads' whole job is the first burst: after that the
     * callbacks keep every slot busy. Each thread starts its own slots. */
    for (uint32_t t = 0; t < o->threads; t++) atomic_store(&b->jobs[t].active, (long)o->iodepth);
    for (uint32_t t = 0; t < o->threads; t++) {
        struct job *j = &b->jobs[t];
        if (o->submit_thread) {
            if (pthread_create(&j->thread, NULL, job_thread, j) != 0)
                return fprintf(stderr, "ioe-bench: cannot start a submitting thread\n"), 1;
            continue;
        }
        for (uint32_t i = 0; i < o->iodepth; i++) {
            if (claim_io(b)) issue(&j->slots[i]);
            else retire_slot(j);
        }
    }

    /* Progress once a second until the run time is over or every slot retired. */
    uint64_t deadline = o->runtime > 0 ? t_start + (uint64_t)(o->runtime * 1e9) : UINT64_MAX;
    uint64_t last_ios = 0, last_t = t_start;
    pthread_mutex_lock(&b->done_mu);
    while (b->jobs_active > 0) {
        uint64_t now = now_ns();
        if (now >= deadline && !atomic_load(&b->stop)) atomic_store(&b->stop, true);
        uint64_t wake = last_t + 1000000000ull;
        if (!atomic_load(&b->stop) && deadline < wake) wake = deadline;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t wait_ns = wake > now ? wake - now : 0;
        ts.tv_sec += (time_t)(wait_ns / 1000000000ull);
        ts.tv_nsec += (long)(wait_ns % 1000000000ull);
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&b->done_cv, &b->done_mu, &ts);
        now = now_ns();
        if (now - last_t >= 1000000000ull && b->jobs_active > 0) {
            uint64_t ios = total_ios(b);
            double secs = (double)(now - last_t) / 1e9;
            fprintf(stderr, "[%5.1fs] %10.0f IOPS %9.1f MiB/s  in flight %" PRId64 "  RSS %ld KiB\n",
                    (double)(now - t_start) / 1e9, (double)(ios - last_ios) / secs,
                    (double)(ios - last_ios) * (double)o->bs / secs / 1048576.0, running(b), rss_kib());
            last_ios = ios;
            last_t = now;
        }
    }
    pthread_mutex_unlock(&b->done_mu);
    uint64_t t_end = now_ns();
    double cpu = cpu_seconds() - cpu_start;
    if (o->submit_thread)
        for (uint32_t t = 0; t < o->threads; t++) pthread_join(b->jobs[t].thread, NULL);

    for (uint32_t t = 0; t < o->threads; t++)
        if (b->jobs[t].merger) ioe_merger_destroy(b->jobs[t].merger);
    double idle_cpu_ms = -1;
    if (o->idle_check) {
        /* Nothing in flight: the engine's threads must sleep in the kernel. */
        double before = cpu_seconds();
        struct timespec half = {0, 500000000L};
        nanosleep(&half, NULL);
        idle_cpu_ms = (cpu_seconds() - before) * 1000.0;
    }
    struct ioe_stats stats = {0};
    for (uint32_t c = 0; c < o->contexts; c++) {
        struct ioe_stats one;
        ioe_context_stats(b->ctxs[c], &one);
        stats.memory_bytes += one.memory_bytes;
        stats.memory_per_slot = one.memory_per_slot;
        stats.merged += one.merged;
        ioe_context_destroy(b->ctxs[c]);
    }
    free(b->ctxs);
    if (b->workers) ioe_workers_destroy(b->workers);
    long rss_end = rss_kib();

    /* Aggregate. */
    static uint64_t counts[NBUCKETS];
    uint64_t ios = 0, bytes = 0, errors = 0, mismatches = 0, max_ns = 0, hist_total = 0;
    for (uint32_t t = 0; t < o->threads; t++) {
        struct job *j = &b->jobs[t];
        ios += atomic_load(&j->ios);
        bytes += atomic_load(&j->bytes);
        errors += atomic_load(&j->errors);
        mismatches += atomic_load(&j->mismatches);
        uint64_t m = atomic_load(&j->hist->max);
        if (m > max_ns) max_ns = m;
        for (unsigned k = 0; k < NBUCKETS; k++) {
            uint64_t c = atomic_load(&j->hist->counts[k]);
            counts[k] += c;
            hist_total += c;
        }
    }
    double secs = (double)(t_end - t_start) / 1e9;
    double iops = (double)ios / secs;
    double mibs = (double)bytes / secs / 1048576.0;
    double cpu_per_io_us = ios ? cpu / (double)ios * 1e6 : 0;
    double p50 = (double)hist_percentile(counts, hist_total, 50) / 1000.0;
    double p99 = (double)hist_percentile(counts, hist_total, 99) / 1000.0;
    double p999 = (double)hist_percentile(counts, hist_total, 99.9) / 1000.0;
    double pmax = (double)max_ns / 1000.0;

    if (o->json) {
        printf("{\"tool\":\"ioe-bench\",\"version\":\"%s\",\"backend\":\"%s\",\"pattern\":\"%s\",\"bs\":%" PRIu64
               ",\"iodepth\":%u,\"threads\":%u,\"contexts\":%u,\"submit\":\"%s\",\"direct\":%d,\"merge\":%" PRIu64 ",\"workers\":%u,\"sqpoll\":%d,"
               "\"seconds\":%.6f,\"ios\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"iops\":%.1f,\"mib_s\":%.3f,"
               "\"cpu_seconds\":%.6f,\"cpu_us_per_io\":%.4f,\"lat_us\":{\"p50\":%.3f,\"p99\":%.3f,\"p99_9\":%.3f,"
               "\"max\":%.3f},\"errors\":%" PRIu64 ",\"verify_mismatches\":%" PRIu64 ",\"verified\":%s,"
               "\"engine_memory_bytes\":%" PRIu64 ",\"engine_bytes_per_slot\":%" PRIu64 ",\"merged\":%" PRIu64
               ",\"rss_kib_start\":%ld,\"rss_kib_end\":%ld}\n",
               ioe_version_string(), ioe_backend_name(backend), PATTERN_NAMES[o->pattern], o->bs, o->iodepth,
               o->threads, o->contexts, o->submit_thread ? "thread" : "callback", o->direct, o->merge ? o->merge_limit : 0, o->workers, o->sqpoll, secs, ios, bytes, iops,
               mibs, cpu, cpu_per_io_us, p50, p99, p999, pmax, errors, mismatches, o->verify ? "true" : "false",
               stats.memory_bytes, stats.memory_per_slot, stats.merged, rss_start, rss_end);
    } else {
        printf("\n%s %s bs=%" PRIu64 " iodepth=%u threads=%u: %" PRIu64 " I/Os in %.2f s\n",
               ioe_backend_name(backend), PATTERN_NAMES[o->pattern], o->bs, o->iodepth, o->threads, ios, secs);
        printf("  IOPS        %12.0f\n  bandwidth   %12.1f MiB/s\n  CPU per I/O %12.2f us (%.2f s CPU)\n", iops,
               mibs, cpu_per_io_us, cpu);
        printf("  latency     p50 %.1f us  p99 %.1f us  p99.9 %.1f us  max %.1f us\n", p50, p99, p999, pmax);
        printf("  engine      %" PRIu64 " bytes (%" PRIu64 " per in-flight slot), %" PRIu64
               " requests merged\n  RSS         %ld KiB at start, %ld KiB at end\n",
               stats.memory_bytes, stats.memory_per_slot, stats.merged, rss_start, rss_end);
        if (idle_cpu_ms >= 0) printf("  idle        %.1f ms CPU used by the whole process over 0.5 s idle\n", idle_cpu_ms);
        printf("  errors      %" PRIu64 "%s\n", errors + mismatches,
               o->verify ? (mismatches ? "  (DATA MISMATCH)" : "  (every byte read was verified)") : "");
    }

    for (uint32_t t = 0; t < o->threads; t++) {
        for (uint32_t i = 0; i < o->iodepth; i++) ioe_buffer_free(b->jobs[t].slots[i].buf);
        free(b->jobs[t].slots);
        free(b->jobs[t].ready);
        free(b->jobs[t].hist);
    }
    free(b->jobs);
    close(b->fd);
    if (is_temp) unlink(tmp_path);
    int failed = errors != 0 || mismatches != 0 || ios == 0;
    free(b);
    return failed;
}
