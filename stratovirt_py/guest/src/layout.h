/* Constants shared by head.S and the C code. */
#ifndef LAYOUT_H
#define LAYOUT_H

#define KCODE           0x08
#define KDATA           0x10
#define UDATA           0x20
#define UCODE           0x28
#define TSSSEL          0x30
#define KCODE32         0x40
#define TSS_SIZE        104

#define CR0_PE          0x00000001
#define CR0_PG          0x80000000
#define CR4_PAE         0x20
#define CR4_SMEP        0x100000
#define CR4_SMAP        0x200000
#define MSR_EFER        0xc0000080
#define EFER_LME        0x100

#define PVH_START_MAGIC 0x336ec578
#define BOOT_LINUX      0
#define BOOT_PVH        1

#define SYS_HALT        0
#define SYS_TRIPLEFAULT 1
#define SYS_WRMSR       2

#define KSTACK_SIZE     16384
#define USTACK_SIZE     65536
#define AP_STACK_SIZE   16384
#define MAX_CPUS        64
#define TRAMPOLINE_BASE 0x10000

#endif
