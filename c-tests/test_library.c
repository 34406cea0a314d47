/* Library calls: version, error text, backend names, aligned buffers. */
#include "test_util.h"

int main(void) {
    uint32_t v = ioe_version();
    CHECK_EQ(v, (IOE_VERSION_MAJOR << 16) | (IOE_VERSION_MINOR << 8) | IOE_VERSION_PATCH);
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.%d", IOE_VERSION_MAJOR, IOE_VERSION_MINOR, IOE_VERSION_PATCH);
    CHECK(strcmp(ioe_version_string(), expected) == 0);

    CHECK(strcmp(ioe_strerror(-EINVAL), strerror(EINVAL)) == 0);
    CHECK(strcmp(ioe_strerror(EBADF), strerror(EBADF)) == 0);
    CHECK(strcmp(ioe_strerror(0), "success") == 0);
    CHECK(ioe_strerror(-100000) != NULL);
    CHECK(ioe_strerror(INT32_MIN) != NULL);

    CHECK(strcmp(ioe_backend_name(IOE_BACKEND_AUTO), "auto") == 0);
    CHECK(strcmp(ioe_backend_name(IOE_BACKEND_URING), "io_uring") == 0);
    CHECK(strcmp(ioe_backend_name(IOE_BACKEND_AIO), "aio") == 0);
    CHECK(strcmp(ioe_backend_name(77), "unknown") == 0);

    void *buf = (void *)1;
    CHECK_EQ(ioe_buffer_alloc(8192, 0, &buf), 0);
    CHECK(buf != NULL && ((uintptr_t)buf % IOE_DEFAULT_ALIGN) == 0);
    for (size_t i = 0; i < 8192; i++) CHECK(((uint8_t *)buf)[i] == 0);
    ioe_buffer_free(buf);
    CHECK_EQ(ioe_buffer_alloc(100, 65536, &buf), 0);
    CHECK(((uintptr_t)buf % 65536) == 0);
    ioe_buffer_free(buf);
    ioe_buffer_free(NULL);

    buf = (void *)1;
    CHECK_EQ(ioe_buffer_alloc(0, 0, &buf), -EINVAL);
    CHECK(buf == NULL);
    CHECK_EQ(ioe_buffer_alloc(4096, 3000, &buf), -EINVAL);
    CHECK_EQ(ioe_buffer_alloc(4096, 2, &buf), -EINVAL);
    CHECK_EQ(ioe_buffer_alloc(4096, 0, NULL), -EINVAL);
    CHECK_EQ(ioe_buffer_alloc(SIZE_MAX / 2, 4096, &buf), -ENOMEM);
    CHECK(buf == NULL);
    printf("library: ok\n");
    return 0;
}
