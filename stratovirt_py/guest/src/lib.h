/* stratovirt-py test guest: freestanding helpers. */
#ifndef LIB_H
#define LIB_H

#include "layout.h"

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long size_t;
#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define barrier() __asm__ volatile("" ::: "memory")

/* Port I/O, always with the port in DX: at CPL3 it raises #GP (PVM ignores
 * IOPL) and head.S's #GP handler performs it at CPL0. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "d"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "d"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "d"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "d"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "d"(port)); return v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }

static inline u64 read_volatile64(const u64 *p) { return *(const volatile u64 *)p; }
static inline void write_volatile64(u64 *p, u64 v) { *(volatile u64 *)p = v; }

/* string.c-like */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* parse an unsigned number: decimal or 0x hex; *end set past it */
u64 parse_u64(const char *s, const char **end);

/* serial console (8250 at 0x3F8), lines serialised by a spinlock */
void serial_lock(void);
void serial_unlock(void);
void serial_write(const char *s, size_t n);  /* caller holds the lock */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int ksnprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void hexdump_str(char *out, const u8 *p, size_t n); /* out needs 2n+1 */

/* time */
extern u64 tsc_khz;
void tsc_calibrate(void);
void delay_us(u64 us);
static inline u64 ms_to_tsc(u64 ms) { return ms * tsc_khz; }

/* privileged services (int 0x80 from CPL3) */
__attribute__((noreturn)) void sys_halt(void);
void wrmsr(u32 msr, u64 val);
__attribute__((noreturn)) void sys_triplefault(void);
__attribute__((noreturn)) void poweroff(void);
__attribute__((noreturn)) void reset(void);

/* command line */
extern char cmdline[4096];
/* Returns the value of "key=value" (or "" for a bare "key") or NULL. The
 * returned pointer is into cmdline and ends at a space or NUL. */
const char *cmdline_param(const char *key);
/* Iterate over tokens starting with prefix: *pos starts at 0. */
const char *cmdline_next(const char *prefix, size_t *pos);
size_t token_len(const char *s);

/* smp.c */
void smp_boot(void);

/* main.c */
extern volatile u64 hb_counter;

#endif
