/* The C fast path's interface (read by cffi as its cdef too: declarations only). */
struct blk_dp {
    uint64_t gpa[2], size[2];     /* guest RAM regions and their host mappings */
    uint8_t *host[2];
    int nregions;
    uint8_t *desc, *avail, *used; /* the queue's rings, as host addresses */
    uint32_t qsize;
    int indirect;                 /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    uint32_t next_avail, next_used;
    int fd;
    uint64_t capacity;            /* bytes */
    int readonly;
    uint32_t align;               /* O_DIRECT alignment of buffers, 1 when buffered */
};

int blk_dp_run(struct blk_dp *dp);
