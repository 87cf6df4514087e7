/* LD_PRELOAD fault layer for the fault tier (tests/test_faults.py): a top image whose device
 * returns EIO. Writes (pwrite, pwritev) and flushes (fdatasync, fsync) of the one file named by
 * FUSESTREAM_FAULT_PATH fail with EIO, without doing anything, while the file named by
 * FUSESTREAM_FAULT_CONTROL contains "write" or "sync" respectively. Everything else passes
 * through. Used because device-mapper's error/flakey targets are not available everywhere the
 * tests run (no dm_mod in this kernel). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* Whether calls of kind `what` ("write" or "sync") on `fd` are to fail now. */
static int failing(int fd, const char *what)
{
    const char *target = getenv("FUSESTREAM_FAULT_PATH");
    const char *control = getenv("FUSESTREAM_FAULT_CONTROL");
    char link[64], path[PATH_MAX], modes[64];
    if (!target || !control)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = '\0';
    if (strcmp(path, target) != 0)
        return 0;
    int c = open(control, O_RDONLY | O_CLOEXEC);
    if (c < 0)
        return 0;
    n = read(c, modes, sizeof modes - 1);
    close(c);
    if (n <= 0)
        return 0;
    modes[n] = '\0';
    return strstr(modes, what) != NULL;
}

#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))
#define FAIL_IF(fd, what) do { if (failing(fd, what)) { errno = EIO; return -1; } } while (0)

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    FAIL_IF(fd, "write");
    return NEXT(pwrite)(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset)
{
    FAIL_IF(fd, "write");
    return NEXT(pwrite64)(fd, buf, count, offset);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
    FAIL_IF(fd, "write");
    return NEXT(pwritev)(fd, iov, iovcnt, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
    FAIL_IF(fd, "write");
    return NEXT(pwritev64)(fd, iov, iovcnt, offset);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    FAIL_IF(fd, "write");
    return NEXT(pwritev2)(fd, iov, iovcnt, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    FAIL_IF(fd, "write");
    return NEXT(pwritev64v2)(fd, iov, iovcnt, offset, flags);
}

int fdatasync(int fd)
{
    FAIL_IF(fd, "sync");
    return NEXT(fdatasync)(fd);
}

int fsync(int fd)
{
    FAIL_IF(fd, "sync");
    return NEXT(fsync)(fd);
}
