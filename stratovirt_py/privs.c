/* Capabilities, the bounding set and no_new_privs are per-thread attributes on Linux:
 * capset(2) on one thread leaves the others as they were.  Like glibc's setxid
 * broadcast, every thread is made to run the drop itself, from a signal handler that
 * only makes raw system calls (async-signal-safe). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

static uint64_t sv_keep;
static volatile int sv_acked_tid;   /* the last thread done, for the broadcaster */
static volatile int sv_acked_err;

static int sv_drop_here(void)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) != 0)
        return errno;
    /* The bounding set can only shrink with CAP_SETPCAP; without it (an unprivileged
     * VMM) no_new_privs is what stops an execve from gaining capabilities. */
    if (data[0].effective & (1u << CAP_SETPCAP)) {
        for (int cap = 0; cap < 64; cap++) {
            int in = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);
            if (in < 0)
                break;      /* past the kernel's last capability */
            if (in == 1 && !((sv_keep >> cap) & 1) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0)
                return errno;
        }
    }
    /* EINVAL: a kernel before ambient capabilities (4.3) has none to clear */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        return errno;
    for (int i = 0; i < 2; i++) {
        uint32_t keep = (uint32_t)(sv_keep >> (32 * i));
        data[i].effective &= keep;
        data[i].permitted &= keep;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &hdr, data) != 0)
        return errno;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return errno;
    return 0;
}

static void sv_on_signal(int signo)
{
    int saved = errno;
    int err = sv_drop_here();
    sv_acked_err = err;
    __atomic_store_n(&sv_acked_tid, (int)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    errno = saved;
}

static int sv_task_exists(pid_t pid, int tid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d", (int)pid, tid);
    return access(path, F_OK) == 0;
}

#define SV_PF_USER_WORKER 0x00004000   /* <linux/sched.h>, not exported to user space */

/* The kernel's own workers in the process (KVM's kvm-nx-lpage-recovery, vhost) block
 * every signal and never run user code: there is nothing there to drop. */
static int sv_is_kernel_worker(int tid)
{
    char path[64], buf[512];
    unsigned long flags = 0;
    ssize_t n;
    int fd;
    char *p;
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    p = strrchr(buf, ')');      /* the name may hold spaces and parentheses */
    if (p == NULL || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %lu", &flags) != 1)
        return 0;
    return (flags & SV_PF_USER_WORKER) != 0;
}

/* One thread: signal it, wait for its answer.  0, an errno, or -1 if it is gone. */
static int sv_drop_on(pid_t pid, int tid, int signo, int timeout_ms)
{
    struct timespec nap = {0, 50000};
    __atomic_store_n(&sv_acked_tid, 0, __ATOMIC_SEQ_CST);
    if (syscall(SYS_tgkill, pid, tid, signo) != 0)
        return errno == ESRCH ? -1 : errno;
    for (long waited = 0; waited < timeout_ms * 20L; waited++) {
        if (__atomic_load_n(&sv_acked_tid, __ATOMIC_SEQ_CST) == tid)
            return sv_acked_err;
        nanosleep(&nap, NULL);
    }
    return sv_task_exists(pid, tid) ? ETIMEDOUT : -1;
}

#define SV_MAX_THREADS 4096

static int sv_seen(const int *done, int n, int tid)
{
    for (int i = 0; i < n; i++)
        if (done[i] == tid)
            return 1;
    return 0;
}

/* Keep only the capabilities in ``keep`` (a bit per CAP_*), in the effective, permitted
 * and bounding sets, clear the inheritable and ambient ones and set no_new_privs, on
 * every thread.  0 or an errno. */
int sv_drop_privs_all(uint64_t keep, int signo, int timeout_ms)
{
    static int done[SV_MAX_THREADS];
    int ndone = 0, err, found_new = 1;
    pid_t pid = getpid();
    struct sigaction sa;

    sv_keep = keep;
    err = sv_drop_here();
    if (err)
        return err;
    done[ndone++] = (int)syscall(SYS_gettid);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = sv_on_signal;
    sa.sa_flags = SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(signo, &sa, NULL) != 0)
        return errno;
    /* A thread not yet done may start another before it is signalled: list the tasks
     * again until a listing shows only threads that are done (a thread started by a
     * done one inherits its state). */
    while (!err && found_new) {
        struct dirent *entry;
        DIR *dir = opendir("/proc/self/task");
        found_new = 0;
        if (dir == NULL) {
            err = errno;
            break;
        }
        while (!err && (entry = readdir(dir)) != NULL) {
            int tid = atoi(entry->d_name), r;
            if (tid <= 0 || sv_seen(done, ndone, tid))
                continue;
            if (sv_is_kernel_worker(tid)) {
                if (ndone < SV_MAX_THREADS)
                    done[ndone++] = tid;
                continue;
            }
            if (ndone == SV_MAX_THREADS) {
                err = EAGAIN;
                break;
            }
            r = sv_drop_on(pid, tid, signo, timeout_ms);
            if (r > 0)
                err = r;
            done[ndone++] = tid;
            found_new = 1;
        }
        closedir(dir);
    }
    /* Ignored, not the default action (which ends the process), should a late signal
     * still be pending on a thread that timed out. */
    signal(signo, SIG_IGN);
    return err;
}
