// The public header compiles as strict C++17 (-Wall -Wextra -Werror -pedantic)
// and links with C linkage.
#include <ioengine.h>

#include <cstdio>
#include <cstring>

static void callback(void *user_data, int64_t result) {
    *static_cast<int64_t *>(user_data) = result;
}

int main() {
    ioe_context_options opts{};
    if (ioe_context_options_init(&opts) != 0) return 1;
    ioe_request req{};
    req.callback = callback;
    ioe_context *ctx = nullptr;
    if (ioe_context_create(&opts, &ctx) != 0) return 1;
    if (ioe_submit(ctx, &req) != -22) return 1; // no buffer: refused with -EINVAL
    if (ioe_context_destroy(ctx) != 0) return 1;
    if (std::strcmp(ioe_version_string(), "") == 0) return 1;
    std::printf("header C++17: ok\n");
    return 0;
}
