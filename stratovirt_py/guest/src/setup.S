/*
 * stratovirt-py test guest: the bzImage setup area ((setup_sects + 1) * 512
 * bytes, linked at 0). build.py fills in the boot-protocol header fields
 * (0x1f1..0x26b, except the jump at 0x200). The real-mode entry at 0x200 (used
 * by loaders that run the 16-bit setup, e.g. QEMU's linuxboot option ROM)
 * switches to 32-bit protected mode and jumps to code32_start (0x100000) with
 * ESI = boot_params, as the 32-bit boot protocol says. 64-bit loaders (the
 * project's VMM) ignore all of this and enter the payload at +0x200.
 */
#define SETUP_SECTS 4

        .code16
        .section .text, "ax"
        .globl  _setup_start
_setup_start:
        /* Boot sector: booting from a disk is not supported. */
        cli
1:      hlt
        jmp     1b

        .org    0x200
        jmp     setup_entry

        .org    0x270
setup_entry:
        cli
        cld
        xorl    %esi, %esi
        movw    %ds, %si
        shll    $4, %esi                /* boot_params (the setup area) */
        movl    %esi, %eax
        addl    $gdt16, %eax
        movl    %eax, gdtptr16 + 2
        lgdtl   gdtptr16
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorl    %ebx, %ebx              /* not PVH */
        ljmpl   $0x08, $0x100000

        .align  8
gdt16:
        .quad   0
        .quad   0x00cf9b000000ffff      /* 0x08 code 32, flat */
        .quad   0x00cf93000000ffff      /* 0x10 data, flat */
gdtptr16:
        .word   23
        .long   0

        .globl  kernel_version_str
kernel_version_str:
        .asciz  "SVGUEST v1 (stratovirt-py test guest)"

        .org    (SETUP_SECTS + 1) * 512 - 1
        .byte   0
