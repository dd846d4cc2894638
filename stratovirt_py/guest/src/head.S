/*
 * stratovirt-py test guest: entry points, descriptor tables, page tables,
 * trap stubs and the AP trampoline.
 *
 * Entry points (all land in common64, CPL0, interrupts off):
 *   0x100000  32-bit: PVH (EBX = hvm_start_info, magic 0x336ec578) or the
 *             32-bit Linux boot protocol (ESI = boot_params).
 *   0x100200  64-bit: Linux 64-bit boot protocol (RSI = boot_params);
 *             this is e_entry of the ELF and bzImage payload offset 0x200.
 */
#include "layout.h"

        .section .head.text, "ax"
        .code32
        .globl pvh_entry32
pvh_entry32:
        cli
        cld
        cmpl    $PVH_START_MAGIC, (%ebx)
        jne     1f
        movl    $BOOT_PVH, boot_kind
        movl    %ebx, boot_ptr
        movl    $0, boot_ptr + 4
        jmp     2f
1:      movl    $BOOT_LINUX, boot_kind
        movl    %esi, boot_ptr
        movl    $0, boot_ptr + 4
2:      lgdt    gdt_ptr
        movl    $KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $(CR0_PG | CR0_PE), %eax
        movl    %eax, %cr0
        ljmp    $KCODE, $common64

        .org    0x200
        .code64
        .globl startup_64
startup_64:
        cli
        cld
        movl    $BOOT_LINUX, boot_kind(%rip)
        movq    %rsi, boot_ptr(%rip)
common64:
        lgdt    gdt_ptr(%rip)
        movl    $KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $pml4, %eax
        movq    %rax, %cr3
        movq    %cr4, %rax                      /* all pages are user pages: */
        andq    $~(CR4_SMEP | CR4_SMAP), %rax   /* no SMEP/SMAP */
        movq    %rax, %cr4
        movq    $kstack_top, %rsp
        pushq   $KCODE
        pushq   $1f
        lretq
1:      call    setup_tss_idt
        /* Mask both 8259 PICs: this guest polls and never takes an interrupt,
         * so device interrupts are not even left pending at the vCPU. */
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        /* Drop to CPL3 with IOPL=3, interrupts off. */
        movl    boot_kind(%rip), %edi
        movq    boot_ptr(%rip), %rsi
        pushq   $(UDATA | 3)
        pushq   $(ustack_top - 8)
        pushq   $0x3002
        pushq   $(UCODE | 3)
        pushq   $guest_main
        iretq

        .text
/* Build the TSS descriptor and the IDT, load TR and IDTR (BSP, once). */
setup_tss_idt:
        movl    $tss, %eax
        movl    %eax, %ecx
        andl    $0xffff, %ecx
        shlq    $16, %rcx
        orq     $(TSS_SIZE - 1), %rcx
        movl    %eax, %edx
        shrl    $16, %edx
        andl    $0xff, %edx
        shlq    $32, %rdx
        orq     %rdx, %rcx
        movabsq $0x0000890000000000, %rdx
        orq     %rdx, %rcx
        movl    %eax, %edx
        shrl    $24, %edx
        shlq    $56, %rdx
        orq     %rdx, %rcx
        movq    %rcx, gdt + TSSSEL
        movq    $0, gdt + TSSSEL + 8
        movl    $TSSSEL, %eax
        ltr     %ax

        movq    $idt, %rdi
        movl    $isr_stubs, %eax
        movl    $0x8e, %r8d
        movl    $32, %ecx
3:      call    make_gate
        addq    $16, %rdi
        addl    $16, %eax
        decl    %ecx
        jnz     3b
        movq    $(idt + 16 * 13), %rdi
        movl    $gp_entry, %eax
        movl    $0x8e, %r8d
        call    make_gate
        lidt    idt_ptr(%rip)
        ret

/* rdi = gate, eax = handler (< 4 GiB), r8d = type/attributes */
make_gate:
        movl    %eax, %r9d
        andl    $0xffff, %r9d
        orl     $(KCODE << 16), %r9d
        movl    %r9d, (%rdi)
        movl    %r8d, %r9d
        shll    $8, %r9d
        movl    %eax, %r10d
        andl    $0xffff0000, %r10d
        orl     %r10d, %r9d
        movl    %r9d, 4(%rdi)
        movq    $0, 8(%rdi)
        ret

/* Exception stubs: 16 bytes each, push (error code or 0) and vector. */
        .align  16
isr_stubs:
        .set    vec, 0
        .rept   32
        .align  16
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     isr_common
        .set    vec, vec + 1
        .endr

isr_common:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        cld
        call    trap_handler
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        addq    $16, %rsp
        iretq

/*
 * #GP fast path: under PVM the CPU ignores IOPL=3 at CPL3, so port I/O there
 * raises #GP. For a #GP from CPL3 on one of the I/O instructions the guest uses
 * (in/out with the port in DX, byte/word/dword, and rep outsb), perform the
 * access here at CPL0 and skip the instruction. Anything else is a real fault.
 * On entry: 0(%rsp) error code, 8 rip, 16 cs, 24 rflags, 32 rsp, 40 ss.
 */
gp_entry:
        testb   $3, 16(%rsp)
        jz      gp_fault
        pushq   %rbx
        movq    16(%rsp), %rbx          /* faulting rip */
        movzbl  (%rbx), %ebx
        cmpl    $0xee, %ebx
        je      9f
        cmpl    $0xec, %ebx
        je      10f
        cmpl    $0xef, %ebx
        je      11f
        cmpl    $0xed, %ebx
        je      12f
        cmpl    $0x66, %ebx
        je      13f
        cmpl    $0xf3, %ebx
        je      14f
gp_popfault:
        popq    %rbx
gp_fault:
        pushq   $13
        jmp     isr_common
9:      outb    %al, %dx
        movl    $1, %ebx
        jmp     gp_done
10:     inb     %dx, %al
        movl    $1, %ebx
        jmp     gp_done
11:     outl    %eax, %dx
        movl    $1, %ebx
        jmp     gp_done
12:     inl     %dx, %eax
        movl    $1, %ebx
        jmp     gp_done
13:     movq    16(%rsp), %rbx
        movzbl  1(%rbx), %ebx
        cmpl    $0xef, %ebx
        je      15f
        cmpl    $0xed, %ebx
        jne     gp_popfault
        inw     %dx, %ax
        movl    $2, %ebx
        jmp     gp_done
15:     outw    %ax, %dx
        movl    $2, %ebx
        jmp     gp_done
14:     movq    16(%rsp), %rbx          /* f3 6e: rep outsb */
        cmpb    $0x6e, 1(%rbx)
        jne     gp_popfault
        pushq   %rax
        testq   %rcx, %rcx
        jz      17f
16:     movb    (%rsi), %al
        outb    %al, %dx
        incq    %rsi
        decq    %rcx
        jnz     16b
17:     popq    %rax
        movl    $2, %ebx
gp_done:
        addq    %rbx, 16(%rsp)
        popq    %rbx
        addq    $8, %rsp
        iretq

/* Load an empty IDT and fault: #UD -> #GP -> #DF -> triple fault. */
        .globl  do_triple_fault
do_triple_fault:
        lidt    empty_idt_ptr(%rip)
        ud2
        jmp     do_triple_fault

/* AP 64-bit entry (from the trampoline), CPL0; stays at CPL0. */
ap_start64:
        movl    $KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        lidt    idt_ptr(%rip)
        movl    $1, %eax
        lock xaddl %eax, ap_next(%rip)
        cmpl    $MAX_CPUS, %eax
        jae     5f
        incl    %eax
        imull   $AP_STACK_SIZE, %eax
        addq    $ap_stacks, %rax
        movq    %rax, %rsp
        call    ap_main
5:      cli
        hlt
        jmp     5b

/*
 * AP trampoline, copied to TRAMPOLINE_BASE (SIPI vector TRAMPOLINE_BASE>>12):
 * real mode -> 32-bit protected mode -> long mode -> ap_start64.
 */
        .globl  trampoline_start, trampoline_end
        .code16
trampoline_start:
        cli
        cld
        movw    %cs, %ax
        movw    %ax, %ds
        lgdtl   tr_gdt_ptr - trampoline_start
        movl    %cr0, %eax
        orl     $CR0_PE, %eax
        movl    %eax, %cr0
        ljmpl   $KCODE32, $(TRAMPOLINE_BASE + tr32 - trampoline_start)
        .code32
tr32:
        movl    $KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $CR0_PG, %eax
        movl    %eax, %cr0
        ljmp    $KCODE, $ap_start64
        .align  8
tr_gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt
trampoline_end:
        .code64

/* ---------------------------------------------------------------- data */
        .section .data.pagetables, "aw"
        .align  4096
        .globl  pml4
pml4:   .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:   .quad   pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
        .fill   508, 8, 0
/* 4 GiB identity map, 2 MiB pages, present | writable | user | PS. */
pd:
        .set    i, 0
        .rept   2048
        .quad   (i << 21) | 0x87
        .set    i, i + 1
        .endr
        .align  4096
idt:    .fill   256 * 16, 1, 0

        .data
        .align  16
        .globl  gdt
gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08 kernel code 64 */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data */
        .quad   0x00cffb000000ffff      /* 0x18 user code 32 */
        .quad   0x00cff3000000ffff      /* 0x20 user data */
        .quad   0x00affb000000ffff      /* 0x28 user code 64 */
        .quad   0, 0                    /* 0x30 TSS */
        .quad   0x00cf9b000000ffff      /* 0x40 kernel code 32 */
gdt_end:
        .align  8
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .align  8
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt
        .align  8
empty_idt_ptr:
        .word   0
        .quad   0
        .align  16
tss:
        .long   0
        .quad   kstack_top              /* rsp0 */
        .fill   102 - 12, 1, 0
        .word   TSS_SIZE                /* no I/O bitmap (IOPL=3 at CPL3) */
        .align  8
        .globl  boot_kind, boot_ptr
boot_kind:
        .long   0
        .long   0
boot_ptr:
        .quad   0
ap_next:
        .long   0

        .section .noinit, "aw", @nobits
        .align  4096
kstack: .skip   KSTACK_SIZE
kstack_top:
ustack: .skip   USTACK_SIZE
        .globl  ustack_top
ustack_top:
        .align  4096
ap_stacks:
        .skip   (MAX_CPUS + 1) * AP_STACK_SIZE

/* PVH entry note for QEMU / Firecracker-style loaders. */
        .section .note.pvh, "a"
        .align  4
        .long   4                       /* namesz */
        .long   8                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .align  4
        .quad   pvh_entry32
        .align  4

        .section .note.GNU-stack, "", @progbits
