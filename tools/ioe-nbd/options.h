/* ioe-nbd's command line: the options and their parser, apart from the
 * server so that a fuzzer can drive the parser alone. */
#ifndef IOE_NBD_OPTIONS_H
#define IOE_NBD_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define DEFAULT_PORT 10809

struct options {
    const char *file;
    const char *bind;
    const char *unix_path;
    const char *export_name;
    const char *description;
    uint16_t port;
    bool read_only;
    bool direct;
    uint32_t backend;
    uint32_t loops;
    bool loops_set;
    uint32_t shared;
    uint32_t depth;
    int disk_io; /* DISK_IO_* */
};

enum { DISK_IO_AUTO, DISK_IO_LOOP, DISK_IO_ENGINE };

/* What nbd_parse_options found besides options to serve with. */
#define NBD_OPTIONS_HELP 1
#define NBD_OPTIONS_VERSION 2

/* Parses argv (getopt_long; qemu-nbd's spellings). Returns 0 with `o`
 * filled (strings point into argv), NBD_OPTIONS_HELP or
 * NBD_OPTIONS_VERSION when asked for those, or -1 after printing what was
 * wrong to stderr. */
int nbd_parse_options(int argc, char **argv, struct options *o);
/* The man-page-style --help text. */
void nbd_usage(FILE *out);

#endif
