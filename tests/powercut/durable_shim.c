/* LD_PRELOAD shim for the power-cut test: at every fsync/fdatasync of a file under
 * $OOS_POWERCUT_DIR, copy the file as it now is to "<file>.durable". After the test kills
 * every process at once, replacing each file by its .durable copy gives exactly what a power
 * cut would leave if the disk kept nothing that was not fsynced (the pessimistic case). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static void snapshot(int fd) {
    const char *dir = getenv("OOS_POWERCUT_DIR");
    char link[64], path[PATH_MAX], tmp[PATH_MAX + 32], done[PATH_MAX + 16];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (!dir || n <= 0) return;
    path[n] = 0;
    if (strncmp(path, dir, strlen(dir)) != 0 || strstr(path, ".durable") || strstr(path, "-shm") || strstr(path, ".lock")) return;
    snprintf(tmp, sizeof tmp, "%s.durable.%d", path, getpid());
    snprintf(done, sizeof done, "%s.durable", path);
    /* One snapshot at a time, so a slower, older copy never lands over a newer one. */
    char lockpath[PATH_MAX + 16];
    snprintf(lockpath, sizeof lockpath, "%s.durable-lock", path);
    int lock = open(lockpath, O_WRONLY | O_CREAT, 0600);
    if (lock < 0) return;
    flock(lock, LOCK_EX);
    int in = open(path, O_RDONLY), out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in < 0 || out < 0) {
        if (in >= 0) close(in);
        if (out >= 0) close(out);
        close(lock);
        return;
    }
    char buf[65536];
    ssize_t got;
    off_t at = 0;
    while ((got = pread(in, buf, sizeof buf, at)) > 0) { if (write(out, buf, got) != got) break; at += got; }
    close(in);
    close(out);
    rename(tmp, done);  /* atomic: a reader sees a whole copy */
    close(lock);        /* drops the flock */
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    if (rc == 0) snapshot(fd);
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    if (rc == 0) snapshot(fd);
    return rc;
}
