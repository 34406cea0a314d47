/* ioe-nbd's command line (see options.h). */
#include "options.h"

#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include <ioengine.h>

void nbd_usage(FILE *out) {
    fprintf(out,
            "Usage: ioe-nbd [OPTIONS] FILE\n"
            "Serve FILE (a regular file or a block device) over the Network Block Device\n"
            "protocol (fixed newstyle; structured replies; base:allocation block status).\n"
            "Option spellings follow qemu-nbd where the two overlap.\n"
            "\n"
            "  -p, --port=PORT          TCP port to listen on (default 10809; 0 picks a free\n"
            "                           one, printed at start)\n"
            "  -b, --bind=ADDR          numeric IPv4 or IPv6 address to listen on\n"
            "                           (default 0.0.0.0)\n"
            "  -k, --socket=PATH        listen on a Unix socket at PATH instead of TCP (a\n"
            "                           stale socket file there is replaced; removed at exit)\n"
            "  -x, --export-name=NAME   the export's name (default \"\"; clients asking for\n"
            "                           the default export get it as well)\n"
            "  -D, --description=TEXT   a description clients may ask for\n"
            "  -r, --read-only          refuse writes, trims and zeroing (NBD_EPERM)\n"
            "  -n, --nocache            the same as --cache=none\n"
            "      --cache=MODE         none (O_DIRECT: the page cache is bypassed; requests\n"
            "                           not aligned to the device go through the cache) or\n"
            "                           writeback (default)\n"
            "      --aio=MODE           disk engine backend: io_uring, native (Linux AIO) or\n"
            "                           auto (default: io_uring where the kernel allows it)\n"
            "  -e, --shared=N           serve at most N clients at once (default: no limit)\n"
            "  -t, --persistent         accepted for qemu-nbd compatibility: ioe-nbd always\n"
            "                           keeps serving after a client leaves\n"
            "  -f, --format=raw         only raw images are served\n"
            "      --loops=N            network event loops besides the accepting one\n"
            "                           (default: one per CPU)\n"
            "      --queue-depth=N      disk I/Os in flight at once (default 256)\n"
            "      --disk-io=MODE       where disk requests run: loop (on the connection's own\n"
            "                           network loop: with io_uring, receive, read and reply on\n"
            "                           one thread; on epoll, the loop's helper threads), engine\n"
            "                           (a block-engine context with its own threads) or auto\n"
            "                           (default: loop where the network runs on io_uring,\n"
            "                           else engine)\n"
            "  -h, --help               this text\n"
            "  -V, --version            the version\n"
            "\n"
            "Commands served: READ, WRITE (FUA: written with RWF_DSYNC), FLUSH (fdatasync),\n"
            "TRIM (punch hole), WRITE_ZEROES (punch hole, or zero range with NO_HOLE; FAST_ZERO\n"
            "fails when neither works), BLOCK_STATUS (SEEK_DATA/SEEK_HOLE) and DISC. Many\n"
            "clients at once and many requests per client, answered out of order; all\n"
            "connections share one file, so CAN_MULTI_CONN is advertised.\n"
            "\n"
            "SIGTERM or SIGINT stops the server: new requests get NBD_ESHUTDOWN, requests in\n"
            "flight are answered, then every connection is closed.\n"
            "\n"
            "Exit status: 0 after a signal, 1 when the export or the socket cannot be set up,\n"
            "2 for bad options.\n");
}

static int parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) return -1;
    *out = (uint32_t)v;
    return 0;
}

#define BAD(...) do { fprintf(stderr, "ioe-nbd: " __VA_ARGS__); fprintf(stderr, "\nTry 'ioe-nbd --help'.\n"); return -1; } while (0)

int nbd_parse_options(int argc, char **argv, struct options *o) {
    *o = (struct options){.bind = "0.0.0.0", .export_name = "", .port = DEFAULT_PORT,
                          .backend = IOE_BACKEND_AUTO, .depth = 256};
    enum { OPT_CACHE = 256, OPT_AIO, OPT_LOOPS, OPT_DEPTH, OPT_DISK_IO };
    static const struct option longopts[] = {
        {"port", required_argument, 0, 'p'},       {"bind", required_argument, 0, 'b'},
        {"socket", required_argument, 0, 'k'},     {"export-name", required_argument, 0, 'x'},
        {"description", required_argument, 0, 'D'}, {"read-only", no_argument, 0, 'r'},
        {"nocache", no_argument, 0, 'n'},          {"cache", required_argument, 0, OPT_CACHE},
        {"aio", required_argument, 0, OPT_AIO},    {"shared", required_argument, 0, 'e'},
        {"persistent", no_argument, 0, 't'},       {"format", required_argument, 0, 'f'},
        {"loops", required_argument, 0, OPT_LOOPS}, {"queue-depth", required_argument, 0, OPT_DEPTH},
        {"disk-io", required_argument, 0, OPT_DISK_IO},
        {"help", no_argument, 0, 'h'},             {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0}};
    int c;
    opterr = 0;
    optind = 0; /* a full reset, so parsing may run more than once (glibc) */
    while ((c = getopt_long(argc, argv, ":p:b:k:x:D:rne:tf:hV", longopts, NULL)) != -1) {
        uint32_t v;
        switch (c) {
        case 'p':
            if (parse_u32(optarg, 0, 65535, &v)) BAD("--port must be 0 to 65535, not '%s'", optarg);
            o->port = (uint16_t)v;
            break;
        case 'b': o->bind = optarg; break;
        case 'k': o->unix_path = optarg; break;
        case 'x':
            if (strlen(optarg) > 4096) BAD("--export-name is longer than 4096 bytes");
            o->export_name = optarg;
            break;
        case 'D': o->description = optarg; break;
        case 'r': o->read_only = true; break;
        case 'n': o->direct = true; break;
        case OPT_CACHE:
            if (!strcmp(optarg, "none") || !strcmp(optarg, "directsync")) o->direct = true;
            else if (!strcmp(optarg, "writeback")) o->direct = false;
            else BAD("--cache must be none or writeback, not '%s'", optarg);
            break;
        case OPT_AIO:
            if (!strcmp(optarg, "io_uring")) o->backend = IOE_BACKEND_URING;
            else if (!strcmp(optarg, "native")) o->backend = IOE_BACKEND_AIO;
            else if (!strcmp(optarg, "auto") || !strcmp(optarg, "threads")) o->backend = IOE_BACKEND_AUTO;
            else BAD("--aio must be io_uring, native or auto, not '%s'", optarg);
            break;
        case 'e':
            if (parse_u32(optarg, 1, 1u << 20, &v)) BAD("--shared must be a positive count, not '%s'", optarg);
            o->shared = v;
            break;
        case 't': break;
        case 'f':
            if (strcmp(optarg, "raw")) BAD("only --format=raw is served, not '%s'", optarg);
            break;
        case OPT_LOOPS:
            if (parse_u32(optarg, 0, 1024, &o->loops)) BAD("--loops must be 0 to 1024, not '%s'", optarg);
            o->loops_set = true;
            break;
        case OPT_DEPTH:
            if (parse_u32(optarg, 1, IOE_MAX_DEPTH, &o->depth)) BAD("--queue-depth must be 1 to %u", IOE_MAX_DEPTH);
            break;
        case OPT_DISK_IO:
            if (!strcmp(optarg, "loop")) o->disk_io = DISK_IO_LOOP;
            else if (!strcmp(optarg, "engine")) o->disk_io = DISK_IO_ENGINE;
            else if (!strcmp(optarg, "auto")) o->disk_io = DISK_IO_AUTO;
            else BAD("--disk-io must be loop, engine or auto, not '%s'", optarg);
            break;
        case 'h': return NBD_OPTIONS_HELP;
        case 'V': return NBD_OPTIONS_VERSION;
        case ':': BAD("option '%s' needs a value", argv[optind - 1]);
        default: BAD("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc) BAD("no FILE to serve");
    if (optind + 1 < argc) BAD("unexpected argument '%s' after FILE", argv[optind + 1]);
    o->file = argv[optind];
    return 0;
}
