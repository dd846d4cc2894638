/* stratovirt-py test guest: virtio-blk (sv.blk, sv.blkwrite, sv.blkbench, sv.bad=blk). */
#include "virtio.h"

#define VIRTIO_BLK_F_FLUSH (1UL << 9)
#define VIRTIO_RING_F_INDIRECT_DESC (1UL << 28)
#define VIRTQ_DESC_F_INDIRECT 4

#define BENCH_DEPTH 16     /* default requests in flight */
#define BENCH_MAX_DEPTH 64
#define BENCH_BUF (2UL << 20)
#define BLK_TIMEOUT_MS 5000

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct blk_req reqs[BENCH_MAX_DEPTH] __attribute__((aligned(64)));
static volatile u8 statuses[BENCH_MAX_DEPTH];
/* Deep queues: one ring descriptor per request, pointing at its own 3-entry table. */
static struct virtq_desc bench_ind[BENCH_MAX_DEPTH][3] __attribute__((aligned(16)));
static u8 sector_buf[512] __attribute__((aligned(512)));
static u8 bench_buf[BENCH_BUF] __attribute__((aligned(4096), section(".noinit")));

struct virtio_dev *blk_open(void)
{
    struct virtio_dev *d = virtio_open(VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH, 1);
    if (!d)
        kprintf("blk: no device\n");
    return d;
}

static u64 blk_capacity(struct virtio_dev *d)
{
    u32 gen, lo, hi, tries = 0;
    do {
        gen = vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = virtio_config_read32(d, 0);
        hi = virtio_config_read32(d, 4);
    } while (gen != vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION) && ++tries < 10);
    return ((u64)hi << 32) | lo;
}

/* One synchronous request on descriptors 0..2; returns the status byte or -1
 * on timeout. */
int blk_request(struct virtio_dev *d, u32 type, u64 sector, void *buf, u32 len,
                int device_writes)
{
    struct virtq *q = &d->vq[0];
    struct virtq_chain c[3];
    int n = 0;
    reqs[0].type = type;
    reqs[0].reserved = 0;
    reqs[0].sector = sector;
    statuses[0] = 0xff;
    c[n++] = (struct virtq_chain){ (u64)&reqs[0], sizeof(reqs[0]), 0 };
    if (len)
        c[n++] = (struct virtq_chain){ (u64)buf, len, device_writes };
    c[n++] = (struct virtq_chain){ (u64)&statuses[0], 1, 1 };
    virtq_add(q, 0, c, n);
    virtq_notify(d, q);
    if (!virtq_wait(d, q, NULL, NULL, BLK_TIMEOUT_MS)) {
        kprintf("blk: request type %u timed out\n", type);
        return -1;
    }
    return statuses[0];
}

static void fill_pattern(u8 *buf, u64 sector)
{
    char pat[48];
    int n = ksnprintf(pat, sizeof(pat), "SVGUEST-WRITE-%lu", sector);
    for (int i = 0; i < 512; i++)
        buf[i] = (u8)pat[i % n];
}

void virtio_blk_main(void)
{
    struct virtio_dev *d = blk_open();
    if (!d)
        return;
    kprintf("blk: capacity %lu\n", blk_capacity(d));

    char id[21];
    memset(id, 0, sizeof(id));
    int st = blk_request(d, VIRTIO_BLK_T_GET_ID, 0, id, 20, 1);
    if (st == 0)
        kprintf("blk: id %s\n", id);
    else
        kprintf("blk: id unavailable status %d\n", st);

    char hex[33];
    st = blk_request(d, VIRTIO_BLK_T_IN, 0, sector_buf, 512, 1);
    if (st == 0) {
        hexdump_str(hex, sector_buf, 16);
        kprintf("blk: sector0 %s\n", hex);
    } else {
        kprintf("blk: sector0 status %d\n", st);
    }

    const char *w = cmdline_param("sv.blkwrite");
    if (w && *w && *w != ' ') {
        u64 sector = parse_u64(w, NULL);
        fill_pattern(sector_buf, sector);
        st = blk_request(d, VIRTIO_BLK_T_OUT, sector, sector_buf, 512, 0);
        kprintf("blk: write %lu status %d\n", sector, st);
        st = blk_request(d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0);
        kprintf("blk: flush status %d\n", st);
        static u8 expect[512];
        fill_pattern(expect, sector);
        memset(sector_buf, 0, 512);
        st = blk_request(d, VIRTIO_BLK_T_IN, sector, sector_buf, 512, 1);
        kprintf("blk: readback %lu %s\n", sector,
                st == 0 && memcmp(sector_buf, expect, 512) == 0 ? "ok" : "mismatch");
    }
}

/* Put request slot s (sector) on the ring: descriptors 3s..3s+2, or, with an
 * indirect table, ring descriptor s. */
static void bench_submit(struct virtq *q, u32 s, int write, u64 bs, u64 sector, int indirect)
{
    reqs[s].type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    reqs[s].reserved = 0;
    reqs[s].sector = sector;
    statuses[s] = 0xff;
    struct virtq_chain c[3] = {
        { (u64)&reqs[s], sizeof(reqs[s]), 0 },
        { (u64)&bench_buf[s * bs], (u32)bs, !write },
        { (u64)&statuses[s], 1, 1 },
    };
    if (!indirect) {
        virtq_add(q, (u16)(3 * s), c, 3);
        return;
    }
    for (int i = 0; i < 3; i++) {
        bench_ind[s][i].addr = c[i].addr;
        bench_ind[s][i].len = c[i].len;
        bench_ind[s][i].flags = (u16)((c[i].write ? VIRTQ_DESC_F_WRITE : 0) |
                                      (i < 2 ? VIRTQ_DESC_F_NEXT : 0));
        bench_ind[s][i].next = (u16)(i + 1);
    }
    struct virtq_desc *d = &q->desc[s];
    d->addr = (u64)&bench_ind[s][0];
    d->len = sizeof(bench_ind[s]);
    d->flags = VIRTQ_DESC_F_INDIRECT;
    d->next = 0;
    q->avail->ring[q->avail_idx % q->num] = (u16)s;
    q->avail_idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)&q->avail->idx = q->avail_idx;
}

/* The n-th request's sector: in order, or from a xorshift64 sequence that is the
 * same for every VMM. */
static u64 bench_sector(u64 *rng, u64 n, u64 spr, u64 span, int random)
{
    if (!random)
        return n * spr % span;
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    return *rng % (span / spr) * spr;
}

/* sv.blkbench=<read|write>,<bs>,<count>[,<depth>[,rand]] */
void virtio_blkbench(const char *arg)
{
    int write;
    if (strncmp(arg, "read,", 5) == 0) {
        write = 0;
        arg += 5;
    } else if (strncmp(arg, "write,", 6) == 0) {
        write = 1;
        arg += 6;
    } else {
        kprintf("blkbench: bad argument\n");
        return;
    }
    u64 bs = parse_u64(arg, &arg);
    if (*arg == 'K' || *arg == 'k') {
        bs <<= 10;
        arg++;
    }
    if (*arg++ != ',') {
        kprintf("blkbench: bad argument\n");
        return;
    }
    u64 count = parse_u64(arg, &arg);
    u64 want_depth = BENCH_DEPTH;
    int random = 0;
    if (*arg == ',') {
        want_depth = parse_u64(arg + 1, &arg);
        if (strncmp(arg, ",rand", 5) == 0) {
            random = 1;
            arg += 5;
        }
    }
    if (!bs || bs % 512 || bs > BENCH_BUF || !count || !want_depth ||
        want_depth > BENCH_MAX_DEPTH || (*arg && *arg != ' ')) {
        kprintf("blkbench: bad argument\n");
        return;
    }
    int indirect = want_depth > VQ_MAX_SIZE / 3;
    struct virtio_dev *d = indirect
        ? virtio_open(VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_INDIRECT_DESC, 1)
        : blk_open();
    if (!d)
        return;
    if (indirect && !(d->features & VIRTIO_RING_F_INDIRECT_DESC)) {
        kprintf("blkbench: depth %lu needs indirect descriptors\n", want_depth);
        return;
    }
    struct virtq *q = &d->vq[0];
    u64 cap = blk_capacity(d);
    u64 spr = bs / 512;
    if (cap < spr) {
        kprintf("blkbench: disk too small\n");
        return;
    }
    u64 span = cap / spr * spr;
    u32 depth = (u32)want_depth;
    if (depth > (indirect ? q->num : q->num / 3))
        depth = indirect ? q->num : q->num / 3;
    if (depth > BENCH_BUF / bs)
        depth = (u32)(BENCH_BUF / bs);
    if (write)
        for (u64 i = 0; i < depth * bs; i++)
            bench_buf[i] = (u8)(i * 7);

    u64 rng = 0x9E3779B97F4A7C15UL;
    u64 submitted = 0, completed = 0, errors = 0;
    u64 t0 = rdtsc();
    for (u32 s = 0; s < depth && submitted < count; s++, submitted++)
        bench_submit(q, s, write, bs, bench_sector(&rng, submitted, spr, span, random), indirect);
    virtq_notify(d, q);
    u64 deadline = rdtsc() + ms_to_tsc(BLK_TIMEOUT_MS);
    int pollexit = cmdline_param("sv.pollexit") != NULL;
    while (completed < count) {
        u32 id;
        int notify = 0, got = 0;
        while (virtq_poll(q, &id, NULL)) {
            got = 1;
            u32 s = indirect ? id : id / 3;
            if (s >= depth) {
                errors++;
                continue;
            }
            if (pollexit)
                (void)inb(0x80);
            if (statuses[s] != 0)
                errors++;
            completed++;
            if (submitted < count) {
                bench_submit(q, s, write, bs, bench_sector(&rng, submitted, spr, span, random),
                             indirect);
                submitted++;
                notify = 1;
            }
        }
        if (notify)
            virtq_notify(d, q);
        if (got) {
            virtio_ack_irq(d);
            deadline = rdtsc() + ms_to_tsc(BLK_TIMEOUT_MS);
        } else if ((i64)(rdtsc() - deadline) > 0) {
            kprintf("blkbench: timeout after %lu of %lu\n", completed, count);
            return;
        } else {
            cpu_relax();
        }
    }
    u64 t1 = rdtsc();
    if (errors)
        kprintf("blkbench: errors %lu\n", errors);
    kprintf("blkbench: %s %lu %lu %lu %lu\n", write ? "write" : "read", bs, count, t1 - t0, tsc_khz);
}

/* Wait up to ms for a used element or NEEDS_RESET. */
static void bad_wait(struct virtio_dev *d, struct virtq *q, u64 ms)
{
    u64 end = rdtsc() + ms_to_tsc(ms);
    while ((i64)(rdtsc() - end) < 0) {
        if (virtq_poll(q, NULL, NULL))
            return;
        if (vio_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
            return;
        delay_us(1000);
    }
}

/* sv.bad=blk: a descriptor far outside RAM, then (unless the device already
 * wants a reset) a looping chain; sv.bad=blkaddr / sv.bad=blkloop: only one. */
void virtio_bad_blk(int addr, int loop)
{
    struct virtio_dev *d = blk_open();
    if (!d)
        return;
    struct virtq *q = &d->vq[0];

    reqs[0].type = VIRTIO_BLK_T_OUT;
    reqs[0].reserved = 0;
    reqs[0].sector = 0;
    struct virtq_chain c[3] = {
        { 0x7ff000000000UL, sizeof(struct blk_req), 0 }, /* far outside RAM */
        { (u64)sector_buf, 512, 0 },
        { (u64)&statuses[0], 1, 1 },
    };
    if (addr) {
        virtq_add(q, 0, c, 3);
        virtq_notify(d, q);
        bad_wait(d, q, 500);
    }

    if (loop && !(vio_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)) {
        /* descriptors 3 and 4 point at each other */
        struct virtq_desc *d3 = &q->desc[3], *d4 = &q->desc[4];
        d3->addr = (u64)&reqs[0];
        d3->len = sizeof(struct blk_req);
        d3->flags = VIRTQ_DESC_F_NEXT;
        d3->next = 4;
        d4->addr = (u64)sector_buf;
        d4->len = 512;
        d4->flags = VIRTQ_DESC_F_NEXT; /* device-readable: a pure loop, no order error */
        d4->next = 3;
        q->avail->ring[q->avail_idx % q->num] = 3;
        q->avail_idx++;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        *(volatile u16 *)&q->avail->idx = q->avail_idx;
        virtq_notify(d, q);
        bad_wait(d, q, 500);
    }
    virtio_ack_irq(d);
    kprintf("bad: status 0x%x\n", vio_read(d, VIRTIO_MMIO_STATUS));
}
