/* stratovirt-py test guest: virtio-mmio driver (virtio 1.x "modern", MMIO
 * version 2, split virtqueues, polled completion). */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "lib.h"

/* MMIO registers */
#define VIRTIO_MMIO_MAGIC               0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976 /* "virt" */

/* device status */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED      0x80

#define VIRTIO_F_VERSION_1 (1UL << 32)

/* device ids */
#define VIRTIO_ID_NET     1
#define VIRTIO_ID_BLOCK   2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG     4

/* split ring */
#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};
struct virtq_used_elem {
    u32 id;
    u32 len;
};
struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[];
};

#define VQ_MAX_SIZE 64

struct virtq {
    u16 index;       /* queue index on the device */
    u16 num;         /* queue size */
    u16 avail_idx;   /* driver's next avail index */
    u16 last_used;   /* driver's next used index to consume */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
};

struct virtio_dev {
    u64 base;
    u64 size;
    u32 irq;
    u32 id;
    u64 features;    /* negotiated */
    struct virtq vq[2];
    u32 nvqs;
};

struct virtq_chain {
    u64 addr;
    u32 len;
    int write;       /* device-writable */
};

static inline u32 vio_read(struct virtio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vio_write(struct virtio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

/* Find the first device with this id on the command line and initialise it
 * (features: VERSION_1 | (offered & wanted)); sets up nvqs queues. Returns
 * NULL (after printing why) on failure. */
struct virtio_dev *virtio_open(u32 id, u64 wanted, u32 nvqs);
/* Put a chain of buffers on a queue starting at descriptor head (uses
 * descriptors head..head+n-1), without notifying. */
void virtq_add(struct virtq *q, u16 head, const struct virtq_chain *bufs, int n);
void virtq_notify(struct virtio_dev *d, struct virtq *q);
/* Wait (polling, at most timeout_ms) for the next used element; returns 1 and
 * fills id and len, or 0 on timeout. */
int virtq_wait(struct virtio_dev *d, struct virtq *q, u32 *id, u32 *len, u64 timeout_ms);
/* Non-blocking: 1 if a used element was consumed. */
int virtq_poll(struct virtq *q, u32 *id, u32 *len);
void virtio_ack_irq(struct virtio_dev *d);
u32 virtio_config_read32(struct virtio_dev *d, u32 off);
u8 virtio_config_read8(struct virtio_dev *d, u32 off);

void virtio_main(void);

/* drivers */
void virtio_blk_main(void);
void virtio_bad_blk(int addr, int loop);
void virtio_blkbench(const char *arg);
void virtio_rng_main(void);
void virtio_console_main(void);
void virtio_net_main(void);
void virtio_netbench(const char *arg);
#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8
struct virtio_dev *blk_open(void);
int blk_request(struct virtio_dev *d, u32 type, u64 sector, void *buf, u32 len, int device_writes);
/* sv.io=<blk,rng>: one round of device I/O per heartbeat (after a restore too). */
void virtio_io_tick(u64 n);

#endif
