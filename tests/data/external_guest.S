# A guest that knows nothing of this project: it prints a line and its command line
# (read from boot_params.cmd_line_ptr at 0x228) on COM1, then resets through the i8042.
.code64
.globl _start
_start:
    mov $0x3f8, %dx
    lea msg(%rip), %rbx
1:  movb (%rbx), %al
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %rbx
    jmp 1b
2:  mov 0x228(%rsi), %ebx
3:  movb (%rbx), %al
    test %al, %al
    jz 4f
    outb %al, %dx
    inc %rbx
    jmp 3b
4:  mov $10, %al
    outb %al, %dx
    mov $0x64, %dx
    mov $0xfe, %al
    outb %al, %dx
    hlt
msg: .asciz "hello from mini\n"
