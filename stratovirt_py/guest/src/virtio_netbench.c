/* stratovirt-py test guest: virtio-net benchmarks: transmit (sv.netbench=tx,<count>,<len>)
 * and an in-order receive check with acknowledgements (sv.netbench=rx,<count>). */
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1UL << 5)
#define NB_HDR_LEN 12          /* struct virtio_net_hdr_v1, all zero */
#define NB_DEPTH 16            /* frames in flight on transmitq */
#define NB_MIN_LEN 18          /* Ethernet header + 4-byte sequence number */
#define NB_MAX_LEN 1514
#define NB_SLOT 2048           /* header + frame, one descriptor per frame */
#define NB_TIMEOUT_MS 5000     /* without any completion */
#define ETHERTYPE_BENCH 0x88b6
#define ETHERTYPE_ACK 0x88b7
#define NB_RX 32               /* receive buffers posted */
#define NB_ACK_EVERY 64        /* frames received between acknowledgements */

static u8 nb_tx[NB_DEPTH][NB_SLOT] __attribute__((aligned(4096), section(".noinit")));
static u8 nb_busy[NB_DEPTH];
static u8 nb_rx[NB_RX][NB_SLOT] __attribute__((aligned(4096), section(".noinit")));

static void nb_fill(u16 s, u32 seq)
{
    u8 *f = nb_tx[s] + NB_HDR_LEN;
    f[14] = (u8)(seq >> 24);
    f[15] = (u8)(seq >> 16);
    f[16] = (u8)(seq >> 8);
    f[17] = (u8)seq;
    nb_busy[s] = 1;
}

static void nb_submit(struct virtq *q, u16 s, u32 seq, u32 len)
{
    nb_fill(s, seq);
    struct virtq_chain c = { (u64)nb_tx[s], NB_HDR_LEN + len, 0 };
    virtq_add(q, s, &c, 1);
}

static void nb_post_rx(struct virtq *q, u16 i)
{
    struct virtq_chain c = { (u64)nb_rx[i], NB_SLOT, 1 };
    virtq_add(q, i, &c, 1);
}

/* Tell the host how many bench frames arrived so far (EtherType 0x88B7, a big-endian
 * count): the host keeps no more than a window of frames beyond it in flight. */
static int nb_ack(struct virtio_dev *d, const u8 *mac, u64 n)
{
    struct virtq *q = &d->vq[1];
    u8 *b = nb_tx[0];
    memset(b, 0, NB_HDR_LEN + 60);
    u8 *f = b + NB_HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETHERTYPE_ACK >> 8;
    f[13] = ETHERTYPE_ACK & 0xff;
    f[14] = (u8)(n >> 24);
    f[15] = (u8)(n >> 16);
    f[16] = (u8)(n >> 8);
    f[17] = (u8)n;
    struct virtq_chain c = { (u64)b, NB_HDR_LEN + 60, 0 };
    virtq_add(q, 0, &c, 1);
    virtq_notify(d, q);
    return virtq_wait(d, q, NULL, NULL, NB_TIMEOUT_MS);
}

/* sv.netbench=rx,<count>: receive count frames of EtherType 0x88B6 and check that their
 * sequence numbers run 0, 1, 2, ... without a gap or a step back. */
static void netbench_rx(struct virtio_dev *d, const u8 *mac, u64 count)
{
    struct virtq *q = &d->vq[0];
    u16 nrx = q->num < NB_RX ? q->num : NB_RX;
    for (u16 i = 0; i < nrx; i++)
        nb_post_rx(q, i);
    virtq_notify(d, q);
    if (!nb_ack(d, mac, 0)) {
        kprintf("netbench: ack timeout\n");
        return;
    }
    u64 got = 0, misordered = 0, expect = 0, t0 = 0;
    u64 deadline = rdtsc() + ms_to_tsc(NB_TIMEOUT_MS);
    while (got < count) {
        u32 id, len;
        int any = 0, ack = 0;
        while (got < count && virtq_poll(q, &id, &len)) {
            any = 1;
            if (id >= nrx)
                continue;
            const u8 *f = nb_rx[id] + NB_HDR_LEN;
            if (len >= NB_HDR_LEN + NB_MIN_LEN && len <= NB_SLOT &&
                ((f[12] << 8) | f[13]) == ETHERTYPE_BENCH) {
                u32 seq = ((u32)f[14] << 24) | ((u32)f[15] << 16) | ((u32)f[16] << 8) | f[17];
                if (!got)
                    t0 = rdtsc();
                if (seq != expect)
                    misordered++;
                expect = (u64)seq + 1;
                got++;
                if (got % NB_ACK_EVERY == 0)
                    ack = 1;
            }
            nb_post_rx(q, (u16)id);
        }
        if (any) {
            virtq_notify(d, q);
            virtio_ack_irq(d);
            deadline = rdtsc() + ms_to_tsc(NB_TIMEOUT_MS);
        }
        if (ack && !nb_ack(d, mac, got)) {
            kprintf("netbench: ack timeout\n");
            return;
        }
        if (!any) {
            if ((i64)(rdtsc() - deadline) > 0) {
                kprintf("netbench: rx timeout after %lu of %lu\n", got, count);
                return;
            }
            cpu_relax();
        }
    }
    u64 t1 = rdtsc();
    nb_ack(d, mac, got);
    kprintf("netbench: rx %lu %lu %lu %lu\n", got, misordered, t1 - t0, tsc_khz);
}

/* The net device with its two queues, and its MAC (printed); NULL after saying why. */
static struct virtio_dev *nb_open(u8 mac[6])
{
    struct virtio_dev *d = virtio_open(VIRTIO_ID_NET, VIRTIO_NET_F_MAC, 2);
    if (!d) {
        kprintf("netbench: no device\n");
        return NULL;
    }
    for (int i = 0; i < 6; i++)
        mac[i] = virtio_config_read8(d, (u32)i);
    kprintf("netbench: mac %02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3],
            mac[4], mac[5]);
    return d;
}

/* sv.netbench=tx,<count>,<len> | rx,<count> */
void virtio_netbench(const char *arg)
{
    u8 mac[6];
    if (strncmp(arg, "rx,", 3) == 0) {
        u64 count = parse_u64(arg + 3, NULL);
        if (!count || count > 0xffffffffUL) {
            kprintf("netbench: bad argument\n");
            return;
        }
        struct virtio_dev *d = nb_open(mac);
        if (d)
            netbench_rx(d, mac, count);
        return;
    }
    if (strncmp(arg, "tx,", 3) != 0) {
        kprintf("netbench: bad argument\n");
        return;
    }
    arg += 3;
    u64 count = parse_u64(arg, &arg);
    if (*arg++ != ',') {
        kprintf("netbench: bad argument\n");
        return;
    }
    u64 len = parse_u64(arg, NULL);
    if (!count || count > 0xffffffffUL || len < NB_MIN_LEN || len > NB_MAX_LEN) {
        kprintf("netbench: bad argument\n");
        return;
    }
    struct virtio_dev *d = nb_open(mac);
    if (!d)
        return;
    struct virtq *q = &d->vq[1]; /* transmitq */

    u16 depth = NB_DEPTH;
    if (depth > q->num)
        depth = q->num;
    for (u16 s = 0; s < depth; s++) {
        u8 *b = nb_tx[s];
        memset(b, 0, NB_HDR_LEN + len);
        u8 *f = b + NB_HDR_LEN;
        memset(f, 0xff, 6);
        memcpy(f + 6, mac, 6);
        f[12] = ETHERTYPE_BENCH >> 8;
        f[13] = ETHERTYPE_BENCH & 0xff;
        nb_busy[s] = 0;
    }

    u64 submitted = 0, completed = 0, errors = 0;
    u64 t0 = rdtsc();
    for (u16 s = 0; s < depth && submitted < count; s++, submitted++)
        nb_submit(q, s, (u32)submitted, (u32)len);
    virtq_notify(d, q);
    u64 deadline = rdtsc() + ms_to_tsc(NB_TIMEOUT_MS);
    while (completed < count) {
        u32 id;
        int notify = 0, got = 0;
        while (virtq_poll(q, &id, NULL)) {
            got = 1;
            if (id >= depth || !nb_busy[id]) {
                errors++;
                continue;
            }
            nb_busy[id] = 0;
            completed++;
            if (submitted < count) {
                nb_submit(q, (u16)id, (u32)submitted, (u32)len);
                submitted++;
                notify = 1;
            }
        }
        if (notify)
            virtq_notify(d, q);
        if (got) {
            virtio_ack_irq(d);
            deadline = rdtsc() + ms_to_tsc(NB_TIMEOUT_MS);
        } else if ((i64)(rdtsc() - deadline) > 0) {
            if (errors)
                kprintf("netbench: errors %lu\n", errors);
            kprintf("netbench: timeout after %lu of %lu\n", completed, count);
            return;
        } else {
            cpu_relax();
        }
    }
    u64 t1 = rdtsc();
    if (errors)
        kprintf("netbench: errors %lu\n", errors);
    kprintf("netbench: tx %lu %lu %lu %lu\n", count, len, t1 - t0, tsc_khz);
}
