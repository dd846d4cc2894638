/* stratovirt-py test guest: freestanding library (string, serial, printf, time). */
#include <stdarg.h>
#include "lib.h"

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp) {
        while (n--)
            *dp++ = *sp++;
    } else {
        while (n--)
            dp[n] = sp[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i])
            return (u8)a[i] < (u8)b[i] ? -1 : 1;
        if (!a[i])
            return 0;
    }
    return 0;
}

u64 parse_u64(const char *s, const char **end)
{
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;;) {
            char c = *s;
            int d;
            if (c >= '0' && c <= '9')
                d = c - '0';
            else if (c >= 'a' && c <= 'f')
                d = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                d = c - 'A' + 10;
            else
                break;
            v = v * 16 + (u64)d;
            s++;
        }
    } else {
        while (*s >= '0' && *s <= '9')
            v = v * 10 + (u64)(*s++ - '0');
    }
    if (end)
        *end = s;
    return v;
}

/* ------------------------------------------------------------ serial */
#define COM1 0x3f8
static volatile u32 serial_lock_word;

void serial_lock(void)
{
    while (__atomic_exchange_n(&serial_lock_word, 1, __ATOMIC_ACQUIRE))
        while (serial_lock_word)
            cpu_relax();
}

void serial_unlock(void)
{
    __atomic_store_n(&serial_lock_word, 0, __ATOMIC_RELEASE);
}

void serial_write(const char *s, size_t n)
{
    u16 cs;
    if (!n)
        return;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    if (cs & 3) {
        /* CPL3: one #GP round trip per string; head.S does one outb per byte */
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)COM1) : "memory");
    } else {
        /* CPL0 (APs, trap handler): byte by byte, so that the VMM never sees a
         * string I/O exit with count > 1 */
        for (size_t i = 0; i < n; i++)
            outb(COM1, (u8)s[i]);
    }
}

struct outbuf {
    char *buf;
    size_t size, len;
};

static void ob_putc(struct outbuf *ob, char c)
{
    if (ob->len + 1 < ob->size)
        ob->buf[ob->len] = c;
    ob->len++;
}

static void ob_num(struct outbuf *ob, u64 v, unsigned base, int width, char pad, int neg)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width > n) {
        ob_putc(ob, pad);
        width--;
    }
    while (n)
        ob_putc(ob, tmp[--n]);
}

static int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf ob = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            ob_putc(&ob, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng = 1;
            fmt++;
        }
        switch (*fmt) {
        case 'd': {
            i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
            ob_num(&ob, v < 0 ? (u64)-v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
            ob_num(&ob, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad, 0);
            break;
        case 'x':
            ob_num(&ob, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad, 0);
            break;
        case 'p':
            ob_num(&ob, (u64)va_arg(ap, void *), 16, width, pad, 0);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            while (*s)
                ob_putc(&ob, *s++);
            break;
        }
        case 'c':
            ob_putc(&ob, (char)va_arg(ap, int));
            break;
        case '%':
            ob_putc(&ob, '%');
            break;
        default:
            ob_putc(&ob, '?');
            break;
        }
    }
    if (size)
        buf[ob.len < size ? ob.len : size - 1] = 0;
    return (int)ob.len;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

void kprintf(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof(buf))
        n = sizeof(buf) - 1;
    serial_lock();
    serial_write(buf, (size_t)n);
    serial_unlock();
}

void hexdump_str(char *out, const u8 *p, size_t n)
{
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hx[p[i] >> 4];
        out[2 * i + 1] = hx[p[i] & 15];
    }
    out[2 * n] = 0;
}

/* -------------------------------------------------------------- time */
u64 tsc_khz;

/* PIT channel 2 one-shot (mode 0) of 10 ms, gate via port 0x61. */
static u64 calibrate_pit(void)
{
    const u32 latch = 11932; /* 1193182 Hz / 100 */
    u8 old = inb(0x61);
    outb(0x61, (u8)((old & ~0x02) | 0x01));
    outb(0x43, 0xb0);
    outb(0x42, latch & 0xff);
    outb(0x42, (u8)(latch >> 8));
    u64 t0 = rdtsc();
    u64 polls = 0;
    while (!(inb(0x61) & 0x20)) {
        if (++polls > 200000)
            break;
    }
    u64 t1 = rdtsc();
    outb(0x61, old);
    if (polls < 2 || polls > 200000)
        return 0;
    return (t1 - t0) / 10;
}

/* KVM pvclock (MSR_KVM_SYSTEM_TIME_NEW): the TSC -> ns scale factors. */
struct pvclock_vcpu_time_info {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags, pad[2];
} __attribute__((packed));
static struct pvclock_vcpu_time_info pvti __attribute__((aligned(64)));

static u64 calibrate_kvmclock(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (b != 0x4b4d564b) /* "KVMKVMKVM" */
        return 0;
    wrmsr(0x4b564d01, (u64)&pvti | 1);
    u32 mul = 0;
    signed char shift = 0;
    for (int i = 0; i < 1000000; i++) {
        u32 v = *(volatile u32 *)&pvti.version;
        barrier();
        mul = *(volatile u32 *)&pvti.tsc_to_system_mul;
        shift = *(volatile signed char *)&pvti.tsc_shift;
        barrier();
        if (v && !(v & 1) && v == *(volatile u32 *)&pvti.version && mul)
            break;
        mul = 0;
        cpu_relax();
    }
    wrmsr(0x4b564d01, 0);
    if (!mul)
        return 0;
    /* ns = ((tsc << shift) * mul) >> 32  =>  kHz = 1e6 * 2^32 / mul / 2^shift */
    u64 khz = (1000000UL << 32) / mul;
    if (shift >= 0)
        khz >>= shift;
    else
        khz <<= -shift;
    return khz;
}

static int khz_plausible(u64 khz) { return khz >= 50000 && khz <= 20000000; }

void tsc_calibrate(void)
{
    /* kvmclock is exact and costs two traps; the PIT needs ~10 ms of polling. */
    const char *src = "kvmclock";
    u64 khz = calibrate_kvmclock();
    u32 a, b, c, d;
    if (!khz_plausible(khz)) {
        src = "pit";
        khz = calibrate_pit();
    }
    if (!khz_plausible(khz)) {
        khz = 0;
        src = "cpuid";
        cpuid(0x40000000, 0, &a, &b, &c, &d);
        if (a >= 0x40000010 && a < 0x40000100) {
            cpuid(0x40000010, 0, &a, &b, &c, &d);
            khz = a;
        }
        if (!khz) {
            cpuid(0, 0, &a, &b, &c, &d);
            u32 max = a;
            if (max >= 0x15) {
                cpuid(0x15, 0, &a, &b, &c, &d);
                if (a && b && c)
                    khz = (u64)c * b / a / 1000;
            }
            if (!khz && max >= 0x16) {
                cpuid(0x16, 0, &a, &b, &c, &d);
                khz = (u64)(a & 0xffff) * 1000;
            }
        }
        if (!khz) {
            khz = 2000000;
            src = "default";
        }
    }
    tsc_khz = khz;
    kprintf("tsc: %lu kHz (%s)\n", khz, src);
}

void delay_us(u64 us)
{
    u64 end = rdtsc() + us * tsc_khz / 1000;
    while ((i64)(rdtsc() - end) < 0)
        cpu_relax();
}

/* --------------------------------------------------- privileged calls */
/* "ud2; .byte nr": the #UD handler (trap_handler) runs service nr at CPL0. */
#define UD_SYSCALL(nr) __asm__ volatile("ud2; .byte %c0" :: "i"(nr) : "memory")

void wrmsr(u32 msr, u64 val)
{
    __asm__ volatile("ud2; .byte %c0" :: "i"(SYS_WRMSR), "D"((u64)msr), "S"(val) : "memory");
}

void sys_halt(void)
{
    for (;;)
        UD_SYSCALL(SYS_HALT);
}

void sys_triplefault(void)
{
    for (;;)
        UD_SYSCALL(SYS_TRIPLEFAULT);
}

void poweroff(void)
{
    outw(0x604, 0x2000);   /* stratovirt-py / StratoVirt: SLP_EN */
    delay_us(100000);
    outb(0x64, 0xfe);      /* fallback (QEMU microvm -no-reboot): reset */
    delay_us(100000);
    sys_triplefault();
}

void reset(void)
{
    outb(0x64, 0xfe);
    delay_us(100000);
    sys_triplefault();
}

struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};

extern void do_triple_fault(void) __attribute__((noreturn));

/* Runs at CPL0 (emulated: keep it short). */
void trap_handler(struct trap_frame *f)
{
    if (f->vec == 6 && (f->cs & 3) && ((const u8 *)f->rip)[0] == 0x0f &&
        ((const u8 *)f->rip)[1] == 0x0b) {
        switch (((const u8 *)f->rip)[2]) {
        case SYS_HALT:
            for (;;)
                __asm__ volatile("cli; hlt");
        case SYS_TRIPLEFAULT:
            do_triple_fault();
        case SYS_WRMSR:
            __asm__ volatile("wrmsr" :: "c"((u32)f->rdi), "a"((u32)f->rsi), "d"((u32)(f->rsi >> 32)));
            f->rip += 3;
            return;
        default:
            f->rip += 3;
            return;
        }
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    serial_unlock();
    kprintf("exception %lu err 0x%lx rip 0x%lx cs 0x%lx rflags 0x%lx rsp 0x%lx cr2 0x%lx\n",
            f->vec, f->err, f->rip, f->cs, f->rflags, f->rsp, cr2);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------ cmdline */
char cmdline[4096];

size_t token_len(const char *s)
{
    size_t n = 0;
    while (s[n] && s[n] != ' ' && s[n] != '\t' && s[n] != '\n')
        n++;
    return n;
}

const char *cmdline_next(const char *prefix, size_t *pos)
{
    size_t plen = strlen(prefix);
    size_t i = *pos;
    while (cmdline[i]) {
        while (cmdline[i] == ' ' || cmdline[i] == '\t' || cmdline[i] == '\n')
            i++;
        if (!cmdline[i])
            break;
        const char *tok = &cmdline[i];
        size_t n = token_len(tok);
        i += n;
        if (n >= plen && strncmp(tok, prefix, plen) == 0) {
            *pos = i;
            return tok;
        }
    }
    *pos = i;
    return NULL;
}

const char *cmdline_param(const char *key)
{
    size_t pos = 0, klen = strlen(key);
    const char *tok, *found = NULL;
    /* the last occurrence wins, as in Linux */
    while ((tok = cmdline_next(key, &pos)) != NULL) {
        if (tok[klen] == '=')
            found = tok + klen + 1;
        else if (tok[klen] == 0 || tok[klen] == ' ' || tok[klen] == '\t' || tok[klen] == '\n')
            found = tok + klen;
    }
    return found;
}
