/* stratovirt-py test guest: MP table and AP bring-up (INIT-SIPI-SIPI). */
#include "lib.h"

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID   0x20
#define LAPIC_SVR  0xf0
#define LAPIC_ICRLO 0x300
#define LAPIC_ICRHI 0x310

extern char trampoline_start[], trampoline_end[];
static volatile u32 cpus_online;

static int checksum_ok(const u8 *p, size_t n)
{
    u8 sum = 0;
    for (size_t i = 0; i < n; i++)
        sum = (u8)(sum + p[i]);
    return sum == 0;
}

static const u8 *mpf_scan(u64 base, u64 len)
{
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' &&
            p[8] == 1 && checksum_ok(p, 16))
            return p;
    }
    return NULL;
}

static const u8 *mpf_find(void)
{
    const u8 *p = NULL;
    u64 bda = 0x40e;
    __asm__("" : "+r"(bda)); /* an address, not a null-pointer offset */
    u64 ebda = (u64)(*(volatile u16 *)bda) << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        p = mpf_scan(ebda, 1024);
    if (!p)
        p = mpf_scan(0x9fc00, 1024);
    if (!p)
        p = mpf_scan(0xf0000, 0x10000);
    return p;
}

static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }

static void send_ipi(u32 apic_id, u32 low)
{
    lapic_write(LAPIC_ICRHI, apic_id << 24);
    lapic_write(LAPIC_ICRLO, low);
    for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICRLO) & (1u << 12)); i++)
        cpu_relax();
}

/* Called on each AP at CPL0 (emulated) from head.S. */
void ap_main(void)
{
    u32 id = lapic_read(LAPIC_ID) >> 24;
    kprintf("cpu %u online\n", id);
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_SEQ_CST);
}

static int wait_online(u32 want, u64 us)
{
    u64 end = rdtsc() + us * tsc_khz / 1000;
    while (cpus_online < want) {
        if ((i64)(rdtsc() - end) > 0)
            return 0;
        cpu_relax();
    }
    return 1;
}

void smp_boot(void)
{
    u8 ids[MAX_CPUS];
    u32 n = 0;
    const u8 *mpf = mpf_find();
    const u8 *cfg = NULL;
    if (mpf) {
        u32 pa = *(const u32 *)(mpf + 4);
        if (pa)
            cfg = (const u8 *)(u64)pa;
        if (cfg && !(cfg[0] == 'P' && cfg[1] == 'C' && cfg[2] == 'M' && cfg[3] == 'P'))
            cfg = NULL;
    }
    if (!cfg) {
        kprintf("smp: no mp table\n");
        kprintf("smp: 1 cpus online\n");
        return;
    }
    /* Walk the entries by the table length, as Linux does (the entry count
     * field is not reliable: QEMU microvm leaves it 0). */
    u16 len = *(const u16 *)(cfg + 4);
    const u8 *e = cfg + 44, *end = cfg + len;
    while (e < end) {
        if (e[0] == 0) {
            if ((e[3] & 1) && n < MAX_CPUS)
                ids[n++] = e[1];
            e += 20;
        } else if (e[0] <= 4) {
            e += 8;
        } else {
            break;
        }
    }
    kprintf("smp: %u cpus in mp table\n", n);

    u32 self = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_SVR, 0x1ff);
    memcpy((void *)TRAMPOLINE_BASE, trampoline_start, (size_t)(trampoline_end - trampoline_start));
    barrier();

    u32 expect = 0;
    for (u32 i = 0; i < n; i++) {
        if (ids[i] == self)
            continue;
        expect++;
        send_ipi(ids[i], 0x00004500);                  /* INIT, assert */
        delay_us(10000);
        send_ipi(ids[i], 0x00004600 | (TRAMPOLINE_BASE >> 12)); /* SIPI */
        if (!wait_online(expect, 1000)) {
            send_ipi(ids[i], 0x00004600 | (TRAMPOLINE_BASE >> 12));
            if (!wait_online(expect, 3000000))
                kprintf("smp: cpu %u did not come up\n", ids[i]);
        }
    }
    kprintf("smp: %u cpus online\n", cpus_online + 1);
}
