/*
 * stratovirt: the native front end of stratovirt-py.
 *
 * A warm start must not pay for an interpreter twice.  This program hands the
 * request (command line, environment, file descriptors and the identity of this
 * process: namespaces, root, cwd, umask, rlimits, groups, CPU affinity, nice) to a
 * running stratovirt-pool, which forks the VM from a warm interpreter and makes it
 * live where this process lives.  This process then stands in for the VM: signals
 * are forwarded, the VM's exit status becomes ours, and when we die (SIGKILL, as
 * Kata stops StratoVirt) the pool child sees the connection close and ends the VM.
 *
 * When no pool answers (STRATOVIRT_POOL, else the default socket), or for
 * -daemonize, -help and -version, the Python VMM is exec'd in this process with
 * the cheapest interpreter start there is (-I -S, paths set by _start.py).
 *
 * Wire format (native byte order; the pool is on the same host):
 *   header  "SVPOOL1\n", u32 payload length, u32 number of descriptors
 *   payload records: u32 tag, u32 length, bytes (see stratovirt_py/pool/request.py)
 *   the descriptors ride as SCM_RIGHTS on the first sendmsg
 *   replies: "PID\0" u32 pid, later "EXIT" i32 status
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SV_START_PY
#define SV_START_PY ""
#endif
#ifndef SV_PYTHON
#define SV_PYTHON "/usr/bin/python3"
#endif

#define DEFAULT_POOL "/run/stratovirt/pool.sock"
#define MAX_FDS 250             /* SCM_MAX_FD is 253 */
#define REPLY_TIMEOUT_MS 10000

enum {
    T_ARG = 1, T_ENV, T_FD, T_CWD, T_ROOT, T_NS, T_UMASK, T_RLIMIT, T_GROUPS,
    T_AFFINITY, T_NICE,
};

struct buf { char *p; size_t len, cap; };

static void put(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            fputs("stratovirt: out of memory\n", stderr);
            exit(1);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void record(struct buf *b, uint32_t tag, const void *data, uint32_t n)
{
    put(b, &tag, 4);
    put(b, &n, 4);
    put(b, data, n);
}

static void record_u32(struct buf *b, uint32_t tag, uint32_t v) { record(b, tag, &v, 4); }

static int fds[MAX_FDS + 8];
static int nfds;

static void add_fd(struct buf *b, uint32_t tag, int fd, const char *name)
{
    if (fd < 0 || nfds >= (int)(sizeof(fds) / sizeof(fds[0])))
        return;
    char rec[64];
    uint32_t index = (uint32_t)nfds;
    fds[nfds++] = fd;
    memcpy(rec, &index, 4);
    size_t n = 4;
    if (tag == T_FD) {
        uint32_t target = (uint32_t)fd;     /* its number here, and so in the VM */
        memcpy(rec + 4, &target, 4);
        n = 8;
    } else if (name) {
        n += strlen(name);
        memcpy(rec + 4, name, n - 4);
    }
    record(b, tag, rec, (uint32_t)n);
}

static void add_inherited_fds(struct buf *b, int exclude)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        for (int fd = 0; fd < 3; fd++)
            if (fcntl(fd, F_GETFD) >= 0)
                add_fd(b, T_FD, fd, NULL);
        return;
    }
    int self = dirfd(d);
    int list[MAX_FDS], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAX_FDS) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        int fd = atoi(e->d_name);
        if (fd != self && fd != exclude)
            list[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++)
        add_fd(b, T_FD, list[i], NULL);
}

static void add_identity(struct buf *b)
{
    static const char *const ns[] = { "net", "ipc", "uts", "cgroup", "mnt" };
    char path[64];
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
        snprintf(path, sizeof(path), "/proc/self/ns/%s", ns[i]);
        add_fd(b, T_NS, open(path, O_RDONLY | O_CLOEXEC), ns[i]);
    }
    add_fd(b, T_ROOT, open("/", O_PATH | O_DIRECTORY | O_CLOEXEC), NULL);
    add_fd(b, T_CWD, open(".", O_PATH | O_DIRECTORY | O_CLOEXEC), NULL);

    mode_t mask = umask(0);
    umask(mask);
    record_u32(b, T_UMASK, (uint32_t)mask);
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit rl;
        if (getrlimit(r, &rl) == 0) {
            uint64_t rec[3] = { (uint64_t)r, rl.rlim_cur, rl.rlim_max };
            record(b, T_RLIMIT, rec, sizeof(rec));
        }
    }
    gid_t groups[NGROUPS_MAX];
    int ng = getgroups(NGROUPS_MAX, groups);
    if (ng >= 0) {
        uint32_t g32[NGROUPS_MAX];
        for (int i = 0; i < ng; i++)
            g32[i] = groups[i];
        record(b, T_GROUPS, g32, (uint32_t)ng * 4);
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        record(b, T_AFFINITY, &set, sizeof(set));
    errno = 0;
    int32_t nice = getpriority(PRIO_PROCESS, 0);
    if (errno == 0)
        record(b, T_NICE, &nice, 4);
}

static int send_request(int sock, struct buf *payload)
{
    char head[16];
    uint32_t len = (uint32_t)payload->len, n = (uint32_t)nfds;
    memcpy(head, "SVPOOL1\n", 8);
    memcpy(head + 8, &len, 4);
    memcpy(head + 12, &n, 4);

    struct iovec iov[2] = { { head, sizeof(head) }, { payload->p, payload->len } };
    union { char buf[CMSG_SPACE(sizeof(fds))]; struct cmsghdr align; } ctl;
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = 2 };
    if (nfds) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    size_t total = sizeof(head) + payload->len, sent = 0;
    while (sent < total) {
        ssize_t r = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        sent += (size_t)r;
        /* the rest goes without descriptors */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        while (r > 0 && msg.msg_iovlen) {
            if ((size_t)r >= msg.msg_iov->iov_len) {
                r -= (ssize_t)msg.msg_iov->iov_len;
                msg.msg_iov++;
                msg.msg_iovlen--;
            } else {
                msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + r;
                msg.msg_iov->iov_len -= (size_t)r;
                r = 0;
            }
        }
    }
    return 0;
}

/* 0: got 8 bytes; 1: EOF before any byte; -1: error, timeout or short reply */
static int read_reply(int sock, char out[8], int timeout_ms)
{
    size_t got = 0;
    while (got < 8) {
        if (timeout_ms >= 0) {
            struct pollfd p = { sock, POLLIN, 0 };
            int r = poll(&p, 1, timeout_ms);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return -1;
        }
        ssize_t r = read(sock, out + got, 8 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            return got ? -1 : 1;
        got += (size_t)r;
    }
    return 0;
}

static volatile pid_t vm_pid;

static void forward(int sig)
{
    if (vm_pid > 0)
        kill(vm_pid, sig);
}

/* Run the VM through the pool; returns its exit status, or -1 to run it here. */
static int via_pool(const char *path, int argc, char **argv, char **envp)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(addr.sun_path))
        return -1;
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        if (sock >= 0)
            close(sock);
        return -1;
    }
    struct buf b = { 0 };
    add_inherited_fds(&b, sock);
    for (int i = 1; i < argc; i++)
        record(&b, T_ARG, argv[i], (uint32_t)strlen(argv[i]));
    for (char **e = envp; *e; e++)
        record(&b, T_ENV, *e, (uint32_t)strlen(*e));
    int first_special = nfds;
    add_identity(&b);

    int failed = send_request(sock, &b);
    for (int i = first_special; i < nfds; i++)
        close(fds[i]);
    free(b.p);
    char reply[8];
    int r = failed ? -1 : read_reply(sock, reply, REPLY_TIMEOUT_MS);
    if (r == 1) {
        close(sock);
        return -1;              /* the pool went away before forking: run here */
    }
    if (r != 0 || memcmp(reply, "PID", 4) != 0) {
        fprintf(stderr, "stratovirt: %s did not answer as a stratovirt-pool; "
                "running the VM in this process\n", path);
        close(sock);
        return -1;
    }
    uint32_t pid;
    memcpy(&pid, reply + 4, 4);
    vm_pid = (pid_t)pid;

    struct sigaction sa = { .sa_handler = forward, .sa_flags = SA_RESTART };
    sigemptyset(&sa.sa_mask);
    const int sigs[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 };
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        sigaction(sigs[i], &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    r = read_reply(sock, reply, -1);
    if (r != 0 || memcmp(reply, "EXIT", 4) != 0)
        return 1;               /* the VM died without a word (killed) */
    int32_t code;
    memcpy(&code, reply + 4, 4);
    return code & 0xff;
}

static int exists(const char *p) { return access(p, R_OK) == 0; }

/* Exec the Python VMM in this process, at the interpreter's cheapest start. */
static void run_here(int argc, char **argv)
{
    char self[PATH_MAX], python[PATH_MAX + 16], start[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    self[n > 0 ? n : 0] = 0;
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = 0;
    snprintf(python, sizeof(python), "%s/python3", self);
    if (!slash || access(python, X_OK) != 0)
        snprintf(python, sizeof(python), "%s", SV_PYTHON);

    start[0] = 0;
    if (SV_START_PY[0] && exists(SV_START_PY))
        snprintf(start, sizeof(start), "%s", SV_START_PY);
    else if (slash) {
        char pattern[PATH_MAX + 64];
        glob_t g;
        snprintf(pattern, sizeof(pattern),
                 "%s/../lib/python3*/site-packages/stratovirt_py/_start.py", self);
        if (glob(pattern, 0, NULL, &g) == 0 && g.gl_pathc)
            snprintf(start, sizeof(start), "%s", g.gl_pathv[0]);
        globfree(&g);
    }
    char **args = calloc((size_t)argc + 8, sizeof(char *));
    int k = 0;
    args[k++] = python;
    if (start[0]) {
        args[k++] = "-I";
        args[k++] = "-S";
        args[k++] = start;
    } else {                    /* an install we cannot see into: the interpreter finds it */
        args[k++] = "-I";
        args[k++] = "-m";
        args[k++] = "stratovirt_py";
    }
    for (int i = 1; i < argc; i++)
        args[k++] = argv[i];
    execv(python, args);
    fprintf(stderr, "stratovirt: cannot run %s: %s\n", python, strerror(errno));
    exit(1);
}

int main(int argc, char **argv, char **envp)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-daemonize") || !strcmp(a, "--daemonize") || !strcmp(a, "-h") ||
            !strcmp(a, "-help") || !strcmp(a, "--help") || !strcmp(a, "-version") ||
            !strcmp(a, "--version"))
            run_here(argc, argv);
    }
    const char *pool = getenv("STRATOVIRT_POOL");
    if (!pool)
        pool = DEFAULT_POOL;
    if (*pool && strcmp(pool, "off") != 0) {
        int code = via_pool(pool, argc, argv, envp);
        if (code >= 0)
            return code;
    }
    run_here(argc, argv);
    return 1;
}
