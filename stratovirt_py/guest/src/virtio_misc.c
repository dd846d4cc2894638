/* stratovirt-py test guest: virtio-rng, virtio-console, virtio-net. */
#include "virtio.h"

#define TIMEOUT_MS 5000

void virtio_rng_main(void)
{
    static u8 buf[64];
    struct virtio_dev *d = virtio_open(VIRTIO_ID_RNG, 0, 1);
    if (!d) {
        kprintf("rng: no device\n");
        return;
    }
    struct virtq *q = &d->vq[0];
    u32 got = 0;
    while (got < sizeof(buf)) {
        struct virtq_chain c = { (u64)&buf[got], (u32)(sizeof(buf) - got), 1 };
        u32 len = 0;
        virtq_add(q, 0, &c, 1);
        virtq_notify(d, q);
        if (!virtq_wait(d, q, NULL, &len, TIMEOUT_MS)) {
            kprintf("rng: timeout\n");
            return;
        }
        if (len > sizeof(buf) - got)
            len = (u32)(sizeof(buf) - got);
        got += len;
    }
    char hex[2 * sizeof(buf) + 1];
    hexdump_str(hex, buf, sizeof(buf));
    kprintf("rng: %s\n", hex);
}

void virtio_console_main(void)
{
    static const char msg[] = "hello from virtio-console\n";
    static char tx[sizeof(msg)];
    struct virtio_dev *d = virtio_open(VIRTIO_ID_CONSOLE, 0, 2);
    if (!d) {
        kprintf("console: no device\n");
        return;
    }
    memcpy(tx, msg, sizeof(msg) - 1);
    struct virtq *q = &d->vq[1]; /* transmitq of port 0 */
    struct virtq_chain c = { (u64)tx, sizeof(msg) - 1, 0 };
    virtq_add(q, 0, &c, 1);
    virtq_notify(d, q);
    if (!virtq_wait(d, q, NULL, NULL, TIMEOUT_MS)) {
        kprintf("console: timeout\n");
        return;
    }
    kprintf("console: sent\n");
}

/* ------------------------------------------------------------ net */
#define VIRTIO_NET_F_MAC (1UL << 5)
#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1) */
#define NET_RX_BUFS 8
#define NET_BUF_SIZE 2048
#define ETHERTYPE_SV 0x88b5

static u8 net_rx[NET_RX_BUFS][NET_BUF_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u8 net_tx[NET_BUF_SIZE] __attribute__((aligned(64)));

static int net_send(struct virtio_dev *d, const u8 *dst, const u8 *src, const char *payload)
{
    struct virtq *q = &d->vq[1];
    size_t plen = strlen(payload);
    memset(net_tx, 0, NET_HDR_LEN + 60);
    u8 *f = net_tx + NET_HDR_LEN;
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = ETHERTYPE_SV >> 8;
    f[13] = ETHERTYPE_SV & 0xff;
    memcpy(f + 14, payload, plen);
    size_t flen = 14 + plen < 60 ? 60 : 14 + plen;
    struct virtq_chain c = { (u64)net_tx, (u32)(NET_HDR_LEN + flen), 0 };
    virtq_add(q, 0, &c, 1);
    virtq_notify(d, q);
    return virtq_wait(d, q, NULL, NULL, TIMEOUT_MS);
}

static void net_post_rx(struct virtq *q, u16 i)
{
    struct virtq_chain c = { (u64)net_rx[i], NET_BUF_SIZE, 1 };
    virtq_add(q, i, &c, 1);
}

void virtio_net_main(void)
{
    static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    struct virtio_dev *d = virtio_open(VIRTIO_ID_NET, VIRTIO_NET_F_MAC, 2);
    if (!d) {
        kprintf("net: no device\n");
        return;
    }
    struct virtq *rxq = &d->vq[0];
    u16 nrx = rxq->num < NET_RX_BUFS ? rxq->num : NET_RX_BUFS;
    for (u16 i = 0; i < nrx; i++)
        net_post_rx(rxq, i);
    virtq_notify(d, rxq);

    u8 mac[6];
    for (int i = 0; i < 6; i++)
        mac[i] = virtio_config_read8(d, (u32)i);
    kprintf("net: mac %02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);

    if (!net_send(d, bcast, mac, "SVGUEST-NET-PING")) {
        kprintf("net: send timeout\n");
        return;
    }
    kprintf("net: sent\n");

    u64 wait_ms = 10000;
    const char *w = cmdline_param("sv.netwait");
    if (w && *w >= '0' && *w <= '9')
        wait_ms = parse_u64(w, NULL);
    u64 end = rdtsc() + ms_to_tsc(wait_ms);
    for (;;) {
        u32 id, len;
        if (!virtq_poll(rxq, &id, &len)) {
            if ((i64)(rdtsc() - end) > 0) {
                kprintf("net: receive timeout\n");
                return;
            }
            cpu_relax();
            continue;
        }
        virtio_ack_irq(d);
        if (id >= nrx)
            continue;
        const u8 *f = net_rx[id] + NET_HDR_LEN;
        if (len > NET_BUF_SIZE)
            len = NET_BUF_SIZE;
        if (len >= NET_HDR_LEN + 14 && ((f[12] << 8) | f[13]) == ETHERTYPE_SV) {
            char text[128];
            u32 n = 0, plen = len - NET_HDR_LEN - 14;
            for (; n < plen && n < sizeof(text) - 1 && f[14 + n]; n++)
                text[n] = (f[14 + n] >= 0x20 && f[14 + n] < 0x7f) ? (char)f[14 + n] : '.';
            text[n] = 0;
            u8 src[6];
            memcpy(src, f + 6, 6);
            kprintf("net: got %s\n", text);
            net_post_rx(rxq, (u16)id);
            virtq_notify(d, rxq);
            if (net_send(d, src, mac, "SVGUEST-NET-PONG"))
                kprintf("net: replied\n");
            else
                kprintf("net: send timeout\n");
            return;
        }
        net_post_rx(rxq, (u16)id);
        virtq_notify(d, rxq);
    }
}
