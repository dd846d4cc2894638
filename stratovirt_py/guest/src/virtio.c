/* stratovirt-py test guest: virtio-mmio transport and split virtqueues. */
#include "virtio.h"

#define MAX_DEVS 8
#define RING_PAGES 16

static struct virtio_dev devs[MAX_DEVS];
static u32 ndevs;
/* One 4 KiB page per queue: descriptors, then avail, then used. */
static u8 ring_pages[RING_PAGES][4096] __attribute__((aligned(4096), section(".noinit")));
static u32 ring_next;

static u64 memparse(const char *s, const char **end)
{
    u64 v = parse_u64(s, &s);
    switch (*s) {
    case 'G': case 'g': v <<= 10; /* fallthrough */
    case 'M': case 'm': v <<= 10; /* fallthrough */
    case 'K': case 'k': v <<= 10; s++; break;
    default: break;
    }
    *end = s;
    return v;
}

/* virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>] (Linux's syntax) */
static void parse_devices(void)
{
    static int done;
    size_t pos = 0;
    const char *tok;
    const char *key = "virtio_mmio.device=";
    if (done)
        return;
    done = 1;
    while ((tok = cmdline_next(key, &pos)) != NULL && ndevs < MAX_DEVS) {
        const char *s = tok + strlen(key);
        struct virtio_dev *d = &devs[ndevs];
        d->size = memparse(s, &s);
        if (*s++ != '@')
            continue;
        d->base = parse_u64(s, &s);
        if (*s++ != ':')
            continue;
        d->irq = (u32)parse_u64(s, &s);
        if (!d->size || !d->base)
            continue;
        ndevs++;
    }
}

static void set_status(struct virtio_dev *d, u32 bits)
{
    vio_write(d, VIRTIO_MMIO_STATUS, vio_read(d, VIRTIO_MMIO_STATUS) | bits);
}

static int setup_queue(struct virtio_dev *d, u32 index, struct virtq *q)
{
    vio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (vio_read(d, VIRTIO_MMIO_QUEUE_READY)) {
        kprintf("virtio: queue %u at 0x%lx already ready\n", index, d->base);
        return 0;
    }
    u32 max = vio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!max) {
        kprintf("virtio: queue %u at 0x%lx not available\n", index, d->base);
        return 0;
    }
    if (ring_next >= RING_PAGES)
        return 0;
    u32 num = max < VQ_MAX_SIZE ? max : VQ_MAX_SIZE;
    u8 *page = ring_pages[ring_next++];
    memset(page, 0, 4096);
    q->index = (u16)index;
    q->num = (u16)num;
    q->avail_idx = 0;
    q->last_used = 0;
    q->desc = (struct virtq_desc *)page;
    q->avail = (struct virtq_avail *)(page + 16 * VQ_MAX_SIZE);
    q->used = (struct virtq_used *)(page + 2048);
    vio_write(d, VIRTIO_MMIO_QUEUE_NUM, num);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
    vio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return 1;
}

struct virtio_dev *virtio_open(u32 id, u64 wanted, u32 nvqs)
{
    parse_devices();
    for (u32 i = 0; i < ndevs; i++) {
        struct virtio_dev *d = &devs[i];
        if (vio_read(d, VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE)
            continue;
        u32 devid = vio_read(d, VIRTIO_MMIO_DEVICE_ID);
        if (devid != id)
            continue;
        u32 version = vio_read(d, VIRTIO_MMIO_VERSION);
        if (version != 2) {
            kprintf("virtio: legacy device at 0x%lx skipped\n", d->base);
            continue;
        }
        if (d->id == id) /* already opened */
            return d;
        kprintf("virtio: device %u at 0x%lx irq %u\n", id, d->base, d->irq);

        vio_write(d, VIRTIO_MMIO_STATUS, 0); /* reset */
        for (int t = 0; t < 1000 && vio_read(d, VIRTIO_MMIO_STATUS); t++)
            cpu_relax();
        set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
        set_status(d, VIRTIO_STATUS_DRIVER);
        vio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        u64 offered = vio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
        vio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        offered |= (u64)vio_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
        if (!(offered & VIRTIO_F_VERSION_1)) {
            kprintf("virtio: device at 0x%lx lacks VIRTIO_F_VERSION_1\n", d->base);
            set_status(d, VIRTIO_STATUS_FAILED);
            continue;
        }
        u64 feat = VIRTIO_F_VERSION_1 | (offered & wanted);
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)feat);
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(feat >> 32));
        set_status(d, VIRTIO_STATUS_FEATURES_OK);
        if (!(vio_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
            kprintf("virtio: device at 0x%lx did not accept features 0x%lx\n", d->base, feat);
            set_status(d, VIRTIO_STATUS_FAILED);
            continue;
        }
        d->features = feat;
        d->nvqs = 0;
        for (u32 q = 0; q < nvqs; q++) {
            if (!setup_queue(d, q, &d->vq[q]))
                break;
            d->nvqs++;
        }
        if (d->nvqs != nvqs) {
            set_status(d, VIRTIO_STATUS_FAILED);
            continue;
        }
        set_status(d, VIRTIO_STATUS_DRIVER_OK);
        d->id = id;
        return d;
    }
    return NULL;
}

void virtq_add(struct virtq *q, u16 head, const struct virtq_chain *bufs, int n)
{
    for (int i = 0; i < n; i++) {
        u16 di = (u16)((head + i) % q->num);
        struct virtq_desc *desc = &q->desc[di];
        desc->addr = bufs[i].addr;
        desc->len = bufs[i].len;
        desc->flags = (u16)((bufs[i].write ? VIRTQ_DESC_F_WRITE : 0) |
                            (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        desc->next = (u16)((di + 1) % q->num);
    }
    q->avail->ring[q->avail_idx % q->num] = head;
    q->avail_idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)&q->avail->idx = q->avail_idx;
}

void virtq_notify(struct virtio_dev *d, struct virtq *q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    vio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_poll(struct virtq *q, u32 *id, u32 *len)
{
    u16 used = *(volatile u16 *)&q->used->idx;
    if (used == q->last_used)
        return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->num];
    if (id)
        *id = e->id;
    if (len)
        *len = e->len;
    q->last_used++;
    return 1;
}

void virtio_ack_irq(struct virtio_dev *d)
{
    u32 isr = vio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        vio_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

int virtq_wait(struct virtio_dev *d, struct virtq *q, u32 *id, u32 *len, u64 timeout_ms)
{
    u64 end = rdtsc() + ms_to_tsc(timeout_ms);
    while (!virtq_poll(q, id, len)) {
        if ((i64)(rdtsc() - end) > 0)
            return 0;
        cpu_relax();
    }
    virtio_ack_irq(d);
    return 1;
}

u32 virtio_config_read32(struct virtio_dev *d, u32 off)
{
    return vio_read(d, VIRTIO_MMIO_CONFIG + off);
}

u8 virtio_config_read8(struct virtio_dev *d, u32 off)
{
    return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

void virtio_main(void)
{
    if (cmdline_param("sv.blk") || cmdline_param("sv.blkwrite"))
        virtio_blk_main();
    const char *bench = cmdline_param("sv.blkbench");
    if (bench)
        virtio_blkbench(bench);
    if (cmdline_param("sv.rng"))
        virtio_rng_main();
    if (cmdline_param("sv.console"))
        virtio_console_main();
    if (cmdline_param("sv.net"))
        virtio_net_main();
    const char *netbench = cmdline_param("sv.netbench");
    if (netbench)
        virtio_netbench(netbench);
    const char *bad = cmdline_param("sv.bad");
    if (bad) {
        size_t n = token_len(bad);
        if (n == 3 && strncmp(bad, "blk", 3) == 0)
            virtio_bad_blk(1, 1);
        else if (n == 7 && strncmp(bad, "blkaddr", 7) == 0)
            virtio_bad_blk(1, 0);
        else if (n == 7 && strncmp(bad, "blkloop", 7) == 0)
            virtio_bad_blk(0, 1);
        else
            kprintf("bad: unknown mode\n");
    }
}
