/* The virtio-net fast path's interface (read by cffi as its cdef too: declarations only). */
struct net_dp {
    uint64_t gpa[2], size[2];     /* guest RAM regions and their host mappings */
    uint8_t *host[2];
    int nregions;
    uint8_t *desc, *avail, *used; /* the queue's rings, as host addresses */
    uint32_t qsize;
    int indirect;                 /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    uint32_t next_avail, next_used;
    int fd;                       /* the tap */
    uint32_t skip;                /* 12 when the tap has no vnet header, else 0 */
    int guest_csum;               /* the guest takes the tap's header as it is */
    uint8_t *bounce;              /* receive: catches what does not fit in the chain */
    uint32_t bounce_len;
    int stop;                     /* out: why the call returned (NET_DP_*) */
    uint32_t overflow;            /* out, NET_DP_OVERFLOW: bytes the read returned */
};

#define NET_DP_RING_EMPTY 0       /* no chain left, or the frame limit reached */
#define NET_DP_HANDBACK 1         /* Python takes the next chain (not plain, or an error) */
#define NET_DP_TAP_EMPTY 2        /* receive: the tap had no frame */
#define NET_DP_OVERFLOW 3         /* receive: a frame read into the next chain did not fit */

int net_dp_tx(struct net_dp *dp, int max);
int net_dp_rx(struct net_dp *dp, int max);
