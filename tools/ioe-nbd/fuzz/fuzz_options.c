/* Fuzz target for ioe-nbd's command line (options.c): the input, split at
 * NUL bytes, is the argument list after the program name. Checked besides
 * what the sanitizers catch: a successful parse leaves every value in its
 * documented range and FILE pointing at one of the arguments. Run with
 * -close_fd_mask=2: the parser explains each refusal on stderr. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ioengine.h>

#include "fuzz.h"
#include "../options.h"

#define MAX_ARGS 32

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* One copy, NUL-terminated, cut into arguments at each NUL. */
    char *text = malloc(size + 1);
    FUZZ_ASSERT(text != NULL);
    memcpy(text, data, size);
    text[size] = 0;
    char *argv[MAX_ARGS + 2];
    int argc = 0;
    argv[argc++] = "ioe-nbd";
    for (size_t at = 0; at <= size && argc <= MAX_ARGS;) {
        argv[argc++] = text + at;
        at += strlen(text + at) + 1;
    }
    argv[argc] = NULL;
    struct options o;
    int rc = nbd_parse_options(argc, argv, &o);
    FUZZ_ASSERT(rc == 0 || rc == -1 || rc == NBD_OPTIONS_HELP || rc == NBD_OPTIONS_VERSION);
    if (rc == 0) {
        int found = 0;
        for (int i = 1; i < argc; i++) found |= o.file == argv[i];
        FUZZ_ASSERT(found);
        FUZZ_ASSERT(o.bind != NULL && o.export_name != NULL && strlen(o.export_name) <= 4096);
        FUZZ_ASSERT(o.depth >= 1 && o.depth <= IOE_MAX_DEPTH);
        FUZZ_ASSERT(o.loops <= 1024 && o.shared <= (1u << 20));
        FUZZ_ASSERT(o.disk_io == DISK_IO_AUTO || o.disk_io == DISK_IO_LOOP || o.disk_io == DISK_IO_ENGINE);
        FUZZ_ASSERT(o.backend == IOE_BACKEND_AUTO || o.backend == IOE_BACKEND_URING || o.backend == IOE_BACKEND_AIO);
    }
    free(text);
    return 0;
}
