/* The public header compiles as strict C11 (-Wall -Wextra -Werror -pedantic)
 * and its version macros agree with the library. */
#include <ioengine.h>
#include <ioengine.h> /* include guard */
#include <stdio.h>

int main(void) {
    ioe_callback cb = NULL;
    struct ioe_request req = {0};
    ioe_context_options opts;
    (void)cb;
    (void)req;
    if (ioe_context_options_init(&opts) != 0) return 1;
    if (ioe_version() != ((IOE_VERSION_MAJOR << 16) | (IOE_VERSION_MINOR << 8) | IOE_VERSION_PATCH)) {
        fprintf(stderr, "header and library versions differ\n");
        return 1;
    }
    printf("header C11: ok (%s)\n", ioe_version_string());
    return 0;
}
