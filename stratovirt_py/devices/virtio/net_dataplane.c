/* virtio-net fast path in C: frames between the tap and the split rings.
 *
 * Called by net_native.py on the I/O thread, under the transport's lock, with the GIL
 * released.  It takes only chains of the common shape - every descriptor readable
 * (transmit) or writable (receive), none empty, each inside one RAM region, at most
 * MAX_SEGS of them, in the ring or all in one indirect table, and for receive the whole
 * header in the first buffer - and stops, without taking it, at the first chain that is
 * anything else: net_rx.py / net_tx.py then handle that chain exactly as they always
 * have, so errors, NEEDS_RESET, dropped frames and back-pressure keep one definition.
 * A failed read or write is likewise handed back untaken, for Python to redo and report.
 *
 * Used elements are written here; net_native.py publishes them (used->idx) once per
 * call, after counting the frames, so that whoever sees the index sees the counters.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "net_dataplane.h"
#include "vring_chain.h"

#define HDR_LEN 12                /* virtio_net_hdr_v1 */
#define MAX_SEGS 64               /* per chain; longer chains go to Python */

static uint8_t *guest_ptr(const void *p, uint64_t gpa, uint64_t len)
{
    const struct net_dp *dp = p;
    for (int i = 0; i < dp->nregions; i++) {
        uint64_t off = gpa - dp->gpa[i];
        if (gpa >= dp->gpa[i] && off < dp->size[i] && len <= dp->size[i] - off)
            return dp->host[i] + off;
    }
    return NULL;
}

/* The buffers of the chain at head, in iov; their count, or 0 if the chain is not plain.
 * writable: the direction every buffer must have. */
static int gather(const struct net_dp *dp, uint16_t head, int writable,
                  struct iovec *iov, uint64_t *total)
{
    struct vring_walk w;
    struct vring_desc d;
    int n = 0;
    *total = 0;
    vring_walk_start(&w, dp->desc, dp->qsize, head);
    for (;;) {
        if (!vring_walk_next(&w, dp->indirect, guest_ptr, dp, &d))
            return 0;
        if (d.len == 0 || !!(d.flags & VRING_DESC_F_WRITE) != writable || n >= MAX_SEGS)
            return 0;
        uint8_t *h = guest_ptr(dp, d.addr, d.len);
        if (!h)
            return 0;
        *total += d.len;
        if (*total >= (1ULL << 32))
            return 0;
        iov[n].iov_base = h;
        iov[n].iov_len = d.len;
        n++;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return n;
    }
}

static uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* The head of the next available chain; -1 when the ring is empty (or the index is
 * bad, which Python then reports). */
static int next_head(const struct net_dp *dp)
{
    uint16_t avail_idx = __atomic_load_n((uint16_t *)(dp->avail + 2), __ATOMIC_ACQUIRE);
    uint32_t pending = (uint16_t)(avail_idx - dp->next_avail);
    if (pending == 0 || pending > dp->qsize)
        return -1;
    return ld16(dp->avail + 4 + 2 * (uint64_t)(dp->next_avail % dp->qsize));
}

static void put_used(struct net_dp *dp, uint16_t head, uint32_t len)
{
    uint8_t *e = dp->used + 4 + 8 * (uint64_t)(dp->next_used % dp->qsize);
    uint32_t id = head;
    memcpy(e, &id, 4);
    memcpy(e + 4, &len, 4);
    dp->next_used = (dp->next_used + 1) & 0xFFFF;
    dp->next_avail = (dp->next_avail + 1) & 0xFFFF;
}

/* Drop the first `skip` bytes of iov[0..n); the new count. */
static int skip_bytes(struct iovec *iov, int n, uint32_t skip)
{
    int i = 0;
    while (skip && i < n) {
        if (skip >= iov[i].iov_len) {
            skip -= (uint32_t)iov[i].iov_len;
            i++;
            continue;
        }
        iov[i].iov_base = (uint8_t *)iov[i].iov_base + skip;
        iov[i].iov_len -= skip;
        skip = 0;
    }
    if (i)
        memmove(iov, iov + i, (size_t)(n - i) * sizeof(*iov));
    return n - i;
}

/* Write up to max frames from the transmit ring to the tap; returns how many. */
int net_dp_tx(struct net_dp *dp, int max)
{
    struct iovec iov[MAX_SEGS];
    int done = 0;
    dp->stop = NET_DP_RING_EMPTY;
    while (done < max) {
        int head = next_head(dp);
        if (head < 0)
            return done;
        uint64_t total;
        int n = gather(dp, (uint16_t)head, 0, iov, &total);
        if (n == 0 || total <= HDR_LEN)
            break;
        n = skip_bytes(iov, n, dp->skip);
        ssize_t w;
        do
            w = writev(dp->fd, iov, n);
        while (w < 0 && errno == EINTR);
        if (w < 0)
            break;                              /* full or failed: Python sees it again */
        put_used(dp, (uint16_t)head, 0);
        done++;
    }
    if (done < max)
        dp->stop = NET_DP_HANDBACK;
    return done;
}

/* Read up to max frames from the tap into the receive ring; returns how many. */
int net_dp_rx(struct net_dp *dp, int max)
{
    struct iovec iov[MAX_SEGS + 1];
    int done = 0;
    dp->stop = NET_DP_RING_EMPTY;
    while (done < max) {
        int head = next_head(dp);
        if (head < 0)
            return done;
        uint64_t cap;
        int n = gather(dp, (uint16_t)head, 1, iov, &cap);
        if (n == 0 || iov[0].iov_len < HDR_LEN) {
            dp->stop = NET_DP_HANDBACK;
            return done;
        }
        uint8_t *hdr = iov[0].iov_base;
        n = skip_bytes(iov, n, dp->skip);
        iov[n].iov_base = dp->bounce;
        iov[n].iov_len = dp->bounce_len;
        ssize_t r;
        do
            r = readv(dp->fd, iov, n + 1);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            dp->stop = errno == EAGAIN ? NET_DP_TAP_EMPTY : NET_DP_HANDBACK;
            return done;
        }
        if (r == 0) {                           /* end of file: Python reports it */
            dp->stop = NET_DP_HANDBACK;
            return done;
        }
        uint64_t total = (uint64_t)r + dp->skip;
        if (total > cap) {
            dp->stop = NET_DP_OVERFLOW;
            dp->overflow = (uint32_t)r;
            return done;
        }
        uint16_t num_buffers = 1;
        if (!dp->guest_csum)
            memset(hdr, 0, HDR_LEN - 2);
        memcpy(hdr + HDR_LEN - 2, &num_buffers, 2);
        put_used(dp, (uint16_t)head, (uint32_t)total);
        done++;
    }
    return done;
}
