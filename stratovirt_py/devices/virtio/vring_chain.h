/* Walking one descriptor chain of a split ring in host memory, for the C fast paths
 * (blk_dataplane.c, net_dataplane.c; not part of their cffi interfaces).
 *
 * A walk stops - vring_walk_next returns 0 - wherever queue.py would raise (an index out
 * of range, a loop, a nested or malformed indirect table, one outside RAM) and at an
 * indirect descriptor that is not the head; the caller then leaves the chain to Python.
 */
#include <stdint.h>
#include <string.h>

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct vring_walk {
    const uint8_t *table;         /* the ring's descriptor table, or an indirect one */
    uint32_t count, idx, steps;
    int in_indirect;
};

/* Guest RAM as the fast path sees it: host address of [gpa, gpa+len), or NULL. */
typedef uint8_t *(*vring_ptr_fn)(const void *dp, uint64_t gpa, uint64_t len);

static inline void vring_walk_start(struct vring_walk *w, const uint8_t *desc, uint32_t qsize,
                                    uint16_t head)
{
    w->table = desc;
    w->count = qsize;
    w->idx = head;
    w->steps = 0;
    w->in_indirect = 0;
}

/* The chain's next descriptor in *d, an indirect head followed; 0 when the walk stops.
 * The caller sees the chain's end in d->flags (no VRING_DESC_F_NEXT). */
static inline int vring_walk_next(struct vring_walk *w, int indirect_ok, vring_ptr_fn ptr,
                                  const void *dp, struct vring_desc *d)
{
    for (;;) {
        if (w->idx >= w->count || ++w->steps > w->count)
            return 0;
        const uint8_t *p = w->table + 16 * (uint64_t)w->idx;
        memcpy(&d->addr, p, 8);
        memcpy(&d->len, p + 8, 4);
        memcpy(&d->flags, p + 12, 2);
        memcpy(&d->next, p + 14, 2);
        if (!(d->flags & VRING_DESC_F_INDIRECT)) {
            w->idx = d->next;
            return 1;
        }
        if (!indirect_ok || w->in_indirect || w->steps != 1 || d->flags & VRING_DESC_F_NEXT ||
            d->len == 0 || d->len % 16 || d->len / 16 > 65536)
            return 0;
        w->table = ptr(dp, d->addr, d->len);
        if (!w->table)
            return 0;
        w->count = d->len / 16;
        w->idx = w->steps = 0;
        w->in_indirect = 1;
    }
}
