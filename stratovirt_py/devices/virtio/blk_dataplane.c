/* virtio-blk fast path in C: plain reads and writes straight from the split ring.
 *
 * Called by blk_native.py on the I/O thread, under the transport's lock, with the GIL
 * released.  It takes only requests of the common shape - a 16-byte header descriptor,
 * data descriptors, a 1-byte status descriptor (in the ring, or all in one indirect
 * table), every buffer inside one RAM region, an in-range IN or OUT of whole sectors -
 * and stops, without taking it, at the first chain that is anything else (or
 * malformed): Python then handles that chain exactly as it always has, so errors,
 * NEEDS_RESET and every other request type keep their one implementation.  A transfer
 * that fails is likewise given back untaken, for Python to run and report alone.
 *
 * Adjacent requests of the same direction become one preadv/pwritev, as blk_batch.py
 * does.  Used entries are published in ring order, each used->idx store after its
 * element (x86 keeps stores in order; the compiler is held by release stores).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "blk_dataplane.h"
#include "vring_chain.h"

#define DESC_F_NEXT VRING_DESC_F_NEXT
#define DESC_F_WRITE VRING_DESC_F_WRITE
#define T_IN 0
#define T_OUT 1
#define SECTOR 512
#define MAX_IOV 1024
#define MAX_SEGS 256          /* per request; longer chains go to Python */
#define MAX_GROUP 256         /* requests merged into one system call */

struct req {
    uint16_t head;
    int write;
    uint64_t offset, nbytes;
    uint8_t *status;
    int iov0, niov;
};

static uint8_t *host_of(const void *p, uint64_t gpa, uint64_t len)
{
    const struct blk_dp *dp = p;
    for (int i = 0; i < dp->nregions; i++) {
        if (gpa >= dp->gpa[i] && gpa - dp->gpa[i] < dp->size[i] &&
            len <= dp->size[i] - (gpa - dp->gpa[i]))
            return dp->host[i] + (gpa - dp->gpa[i]);
    }
    return NULL;
}

static uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* Parse the chain at head into r and iov[*n...]; 0 if it is not a plain request. */
static int parse(const struct blk_dp *dp, uint16_t head, struct req *r,
                 struct iovec *iov, int *n)
{
    struct vring_walk w;
    struct vring_desc d;
    uint32_t nsteps = 0;
    int segs = 0;
    uint64_t total = 0;
    r->head = head;
    r->nbytes = 0;
    r->iov0 = *n;
    r->niov = 0;
    vring_walk_start(&w, dp->desc, dp->qsize, head);
    for (;;) {
        if (!vring_walk_next(&w, dp->indirect, host_of, dp, &d))
            return 0;
        uint64_t addr = d.addr;
        uint32_t len = d.len;
        uint16_t flags = d.flags;
        if (len == 0)
            return 0;
        uint8_t *h = host_of(dp, addr, len);
        if (!h)
            return 0;
        nsteps++;
        total += len;
        if (total >= (1ULL << 32))
            return 0;
        int last = !(flags & DESC_F_NEXT);
        if (nsteps == 1) {                      /* the header */
            if (flags & DESC_F_WRITE || len != 16 || last)
                return 0;
            uint32_t type;
            uint64_t sector;
            memcpy(&type, h, 4);
            memcpy(&sector, h + 8, 8);
            if (type != T_IN && type != T_OUT)
                return 0;
            if (sector > dp->capacity / SECTOR)
                return 0;
            r->write = type == T_OUT;
            r->offset = sector * SECTOR;
        } else if (last) {                      /* the status byte */
            if (!(flags & DESC_F_WRITE) || len != 1 || r->niov == 0)
                return 0;
            r->status = h;
            break;
        } else {                                /* data */
            int writable = !!(flags & DESC_F_WRITE);
            if (writable == r->write || ++segs > MAX_SEGS || *n >= MAX_IOV)
                return 0;
            if ((addr | len) & (dp->align - 1))
                return 0;
            iov[*n].iov_base = h;
            iov[*n].iov_len = len;
            (*n)++;
            r->niov++;
            r->nbytes += len;
        }
    }
    if (r->nbytes % SECTOR || r->nbytes > dp->capacity - r->offset)
        return 0;
    if (r->write && dp->readonly)
        return 0;
    return 1;
}

/* The whole transfer, or -1 with errno.  Reads past the end of the file give zeros. */
static int transfer(int fd, int write, struct iovec *iov, int n, uint64_t offset)
{
    while (n > 0) {
        ssize_t got = write ? pwritev(fd, iov, n, (off_t)offset) : preadv(fd, iov, n, (off_t)offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0) {
            if (write) {
                errno = EIO;
                return -1;
            }
            for (int i = 0; i < n; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        offset += (uint64_t)got;
        while (n > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

static void complete(struct blk_dp *dp, const struct req *r)
{
    *r->status = 0;
    uint8_t *e = dp->used + 4 + 8 * (uint64_t)(dp->next_used % dp->qsize);
    uint32_t id = r->head, len = (r->write ? 0 : (uint32_t)r->nbytes) + 1;
    memcpy(e, &id, 4);
    memcpy(e + 4, &len, 4);
    dp->next_used = (dp->next_used + 1) & 0xFFFF;
    __atomic_store_n((uint16_t *)(dp->used + 2), (uint16_t)dp->next_used, __ATOMIC_RELEASE);
}

/* Run plain requests from the avail ring; returns how many were completed.  Stops at
 * an empty ring, a chain that is not plain, or a failed transfer (given back). */
int blk_dp_run(struct blk_dp *dp)
{
    static __thread struct iovec iov[MAX_IOV];
    static __thread struct req reqs[MAX_GROUP];
    int done = 0;
    for (;;) {
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(dp->avail + 2), __ATOMIC_ACQUIRE);
        uint32_t pending = (uint16_t)(avail_idx - dp->next_avail);
        if (pending == 0 || pending > dp->qsize)
            return done;                        /* empty, or Python reports the error */
        /* Gather a group: consecutive plain requests, same direction, adjacent. */
        int nreq = 0, niov = 0;
        uint32_t at = dp->next_avail;
        while (nreq < (int)pending && nreq < MAX_GROUP) {
            uint16_t head = ld16(dp->avail + 4 + 2 * (uint64_t)(at % dp->qsize));
            struct req *r = &reqs[nreq];
            int mark = niov;
            if (!parse(dp, head, r, iov, &niov)) {
                niov = mark;
                break;
            }
            if (nreq > 0 && (r->write != reqs[0].write ||
                             r->offset != reqs[nreq - 1].offset + reqs[nreq - 1].nbytes)) {
                niov = mark;
                break;
            }
            nreq++;
            at = (at + 1) & 0xFFFF;
        }
        if (nreq == 0)
            return done;
        if (transfer(dp->fd, reqs[0].write, iov, niov, reqs[0].offset) < 0)
            return done;                        /* Python runs these alone, with errors */
        for (int i = 0; i < nreq; i++)
            complete(dp, &reqs[i]);
        dp->next_avail = at;
        done += nreq;
    }
}
