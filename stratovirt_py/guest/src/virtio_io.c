/* stratovirt-py test guest: sv.io=<dev>[,<dev>] - device I/O on every heartbeat.
 *
 * Each beat n writes sector 1000 + n % 64 with "SVGUEST-IO-<n>" and reads it back
 * (blk), reads 16 bytes of entropy (rng) and writes "io <n>" + newline to the
 * virtio-console port (con), then prints
 *     io <n> blk ok|fail rng ok|fail con ok|fail
 * (a device not asked for is left out).  Devices are opened on the first beat and
 * then used through the same queues for good, so after a snapshot is restored the
 * I/O goes through the restored queues.
 */
#include "virtio.h"

#define IO_TIMEOUT_MS 2000

static struct virtio_dev *io_blk, *io_rng, *io_con;
static int io_init_done, want_blk, want_rng, want_con;

static void io_init(void)
{
    const char *v = cmdline_param("sv.io");
    size_t n = v ? token_len(v) : 0;
    for (size_t i = 0; i < n; i++) {
        if (strncmp(v + i, "blk", 3) == 0)
            want_blk = 1;
        if (strncmp(v + i, "rng", 3) == 0)
            want_rng = 1;
        if (strncmp(v + i, "con", 3) == 0)
            want_con = 1;
    }
    if (want_blk)
        io_blk = blk_open();
    if (want_rng)
        io_rng = virtio_open(VIRTIO_ID_RNG, 0, 1);
    if (want_con)
        io_con = virtio_open(VIRTIO_ID_CONSOLE, 0, 2);
    io_init_done = 1;
}

static int io_blk_round(u64 n)
{
    static u8 wbuf[512] __attribute__((aligned(512)));
    static u8 rbuf[512] __attribute__((aligned(512)));
    char pat[40];
    int len = ksnprintf(pat, sizeof(pat), "SVGUEST-IO-%lu", n);
    for (int i = 0; i < 512; i++)
        wbuf[i] = (u8)pat[i % len];
    u64 sector = 1000 + n % 64;
    if (blk_request(io_blk, VIRTIO_BLK_T_OUT, sector, wbuf, 512, 0) != 0)
        return 0;
    memset(rbuf, 0, sizeof(rbuf));
    if (blk_request(io_blk, VIRTIO_BLK_T_IN, sector, rbuf, 512, 1) != 0)
        return 0;
    return memcmp(rbuf, wbuf, 512) == 0;
}

static int io_rng_round(void)
{
    static u8 buf[16];
    struct virtq *q = &io_rng->vq[0];
    struct virtq_chain c = { (u64)buf, sizeof(buf), 1 };
    u32 len = 0;
    virtq_add(q, 0, &c, 1);
    virtq_notify(io_rng, q);
    if (!virtq_wait(io_rng, q, NULL, &len, IO_TIMEOUT_MS))
        return 0;
    return len > 0;
}

static int io_con_round(u64 n)
{
    static char tx[32];
    int len = ksnprintf(tx, sizeof(tx), "io %lu\n", n);
    struct virtq *q = &io_con->vq[1]; /* transmitq of port 0 */
    struct virtq_chain c = { (u64)tx, (u32)len, 0 };
    virtq_add(q, 0, &c, 1);
    virtq_notify(io_con, q);
    return virtq_wait(io_con, q, NULL, NULL, IO_TIMEOUT_MS);
}

void virtio_io_tick(u64 n)
{
    if (!cmdline_param("sv.io"))
        return;
    if (!io_init_done)
        io_init();
    char line[96];
    int off = ksnprintf(line, sizeof(line), "io %lu", n);
    if (want_blk)
        off += ksnprintf(line + off, sizeof(line) - off, " blk %s",
                         io_blk && io_blk_round(n) ? "ok" : "fail");
    if (want_rng)
        off += ksnprintf(line + off, sizeof(line) - off, " rng %s",
                         io_rng && io_rng_round() ? "ok" : "fail");
    if (want_con)
        off += ksnprintf(line + off, sizeof(line) - off, " con %s",
                         io_con && io_con_round(n) ? "ok" : "fail");
    kprintf("%s\n", line);
}
