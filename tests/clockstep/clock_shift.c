/* A wall-clock step, on demand, for the processes this is preloaded into: CLOCK_REALTIME (and
 * time(), gettimeofday()) read the real clock plus the number of seconds written in the file
 * $OOS_CLOCK_SHIFT_FILE (re-read at most every 50 ms; missing or empty: 0). CLOCK_MONOTONIC is
 * left alone, as an NTP step leaves it. Built by tests/test_liveness.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static double shift;
static struct timespec last_read;

static double current_shift(void) {
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    double since = (now.tv_sec - last_read.tv_sec) + (now.tv_nsec - last_read.tv_nsec) / 1e9;
    if (last_read.tv_sec == 0 || since > 0.05) {
        last_read = now;
        const char *path = getenv("OOS_CLOCK_SHIFT_FILE");
        FILE *f = path ? fopen(path, "r") : NULL;
        double value = 0;
        if (f) {
            if (fscanf(f, "%lf", &value) != 1) value = 0;
            fclose(f);
        }
        shift = value;
    }
    return shift;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        double s = current_shift();
        long long whole = (long long)s;
        long long nanos = ts->tv_nsec + (long long)((s - whole) * 1e9);
        ts->tv_sec += whole + nanos / 1000000000LL;
        ts->tv_nsec = nanos % 1000000000LL;
        if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000LL; ts->tv_sec -= 1; }
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    clock_gettime(CLOCK_REALTIME, &ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
