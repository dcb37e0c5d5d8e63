/* LD_PRELOAD shim for the queue benchmark: each fsync/fdatasync takes $OOS_FSYNC_DELAY_US
 * microseconds longer than this disk's own, so one run can show how OOS and raw sqlite3 fare
 * on a disk whose flush is slower than this machine's (a network block volume, an SSD without
 * a power-loss-protected cache): what one fsync per task and group commit save grows with it.
 * Built by scripts/bench_queue.py; nothing else loads it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

static void wait_delay(void) {
    static long us = -1;
    if (us < 0) {
        const char *value = getenv("OOS_FSYNC_DELAY_US");
        us = value ? atol(value) : 0;
    }
    struct timespec left = {us / 1000000, (us % 1000000) * 1000};
    while (us > 0 && nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    wait_delay();
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    wait_delay();
    return rc;
}
