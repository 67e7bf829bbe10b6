/* migrated's own boot sector: a guest for raw-image tests and demos (DESIGN section 7).
 *
 * Started as a BIOS starts a boot sector (real mode, CS:IP = 0:7c00, DL = boot drive), it
 *   1. programs the 8250 UART at 0x3f8 (8N1, divisor 1) and prints a banner, polling LSR bit 5;
 *   2. enables A20 through port 0x92, loads its GDT and switches to 32-bit protected mode;
 *   3. rewrites the region [base, base + bytes) forever. Pass p (p = 1, 2, ...) stores into every
 *      4-byte word at address a the value  a + p * PASS_KEY  (mod 2^32), so any word tells which
 *      pass wrote it: p = (word - a) * PASS_KEY^-1 (mod 2^32). After each pass the number of
 *      completed passes goes to PASSES_ADDR, and every `print_every` passes "pass N\n" goes to
 *      the UART.
 *
 * At any instant the region holds pass P + 1 below the loop's pointer and pass P above it, where
 * P is the count at PASSES_ADDR (which can lag the words by the one store it takes).
 *
 * The parameter block (PARAMS_OFFSET) is patched by migrated.guests.x86_64.bootsector.build; keep both
 * in step. Assembled with GNU as (no C preprocessor), linked at 0x7c00 as a flat binary.
 *
 * PVM runs real-mode and 32-bit code in its instruction emulator (HOST-NOTES: ~1-2 M
 * instructions/s, one dirty-ring entry per emulated store): the hot loop is a few plain
 * instructions per word, unrolled by four; no string instructions.
 */
	.set COM1, 0x3f8
	.set LSR, COM1 + 5
	.set LSR_THRE, 0x20
	.set PASSES_ADDR, 0x500
	.set PASS_KEY, 0x9e3779b1
	.set PARAMS_OFFSET, 0x1a0
	.set CODE32_SEL, 0x08
	.set DATA32_SEL, 0x10

	.section .text, "ax"
	.globl _start
	.code16
_start:
	cli
	cld
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $0x7c00, %sp
	ljmp $0, $real_mode          /* some BIOSes enter at 07c0:0000: make CS 0 */

real_mode:
	/* UART: DLAB on, divisor 1 (115200 baud), DLAB off with 8N1, FIFOs on and cleared,
	 * interrupts off, DTR|RTS|OUT2. Pairs of (register offset, value). */
	movw $uart_init, %si
	movw $uart_init_end, %di
1:	movw $COM1, %dx
	lodsb
	addb %al, %dl
	lodsb
	outb %al, %dx
	cmpw %di, %si
	jb 1b

	movw $banner, %si
	call puts16

	inb $0x92, %al                /* fast A20 gate; bit 0 would reset the machine */
	orb $0x02, %al
	andb $0xfe, %al
	outb %al, $0x92

	lgdtl gdt_desc
	movl %cr0, %eax
	orl $1, %eax                  /* CR0.PE */
	movl %eax, %cr0
	ljmpl $CODE32_SEL, $protected_mode

/* puts16: print the NUL-terminated string at ds:si. */
puts16:
	lodsb
	testb %al, %al
	jz 3f
	movb %al, %ah
	movw $LSR, %dx
2:	inb %dx, %al
	testb $LSR_THRE, %al
	jz 2b
	movb %ah, %al
	movw $COM1, %dx
	outb %al, %dx
	jmp puts16
3:	ret

	.code32
protected_mode:
	movw $DATA32_SEL, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	movl $0x7c00, %esp
	movl $pm_banner, %esi
	call puts32

	xorl %ebx, %ebx               /* ebx: the pass being written */
	movl %ebx, PASSES_ADDR
next_pass:
	incl %ebx
	imull $PASS_KEY, %ebx, %edx   /* edx: this pass's key */
	movl param_base, %edi
	movl param_bytes, %ecx
	addl %edi, %ecx               /* ecx: end of the region */
stamp:
	leal (%edi,%edx), %eax
	movl %eax, (%edi)
	leal 4(%edi,%edx), %eax
	movl %eax, 4(%edi)
	leal 8(%edi,%edx), %eax
	movl %eax, 8(%edi)
	leal 12(%edi,%edx), %eax
	movl %eax, 12(%edi)
	addl $16, %edi
	cmpl %ecx, %edi
	jb stamp
	movl %ebx, PASSES_ADDR

	movl %ebx, %eax
	xorl %edx, %edx
	divl param_print_every
	testl %edx, %edx
	jnz next_pass

	movl $pass_msg, %esi
	call puts32
	movl %ebx, %eax               /* the decimal digits, pushed least significant first */
	xorl %ecx, %ecx
	movl $10, %esi
4:	xorl %edx, %edx
	divl %esi
	addb $'0', %dl
	pushl %edx
	incl %ecx
	testl %eax, %eax
	jnz 4b
5:	popl %eax
	call putc32
	loop 5b
	movb $'\n', %al
	call putc32
	jmp next_pass

/* puts32: print the NUL-terminated string at esi. */
puts32:
	lodsb
	testb %al, %al
	jz 6f
	call putc32
	jmp puts32
6:	ret

/* putc32: print al; keeps every register but edx. */
putc32:
	movb %al, %ah
	movw $LSR, %dx
7:	inb %dx, %al
	testb $LSR_THRE, %al
	jz 7b
	movb %ah, %al
	movw $COM1, %dx
	outb %al, %dx
	ret

uart_init:
	.byte 1, 0x00                 /* IER: no interrupts */
	.byte 3, 0x80                 /* LCR: DLAB */
	.byte 0, 0x01                 /* DLL */
	.byte 1, 0x00                 /* DLM */
	.byte 3, 0x03                 /* LCR: 8N1, DLAB off */
	.byte 2, 0xc7                 /* FCR: FIFOs on, cleared, 14-byte trigger */
	.byte 4, 0x0b                 /* MCR: DTR, RTS, OUT2 */
uart_init_end:

banner:
	.asciz "migrated boot sector\n"
pm_banner:
	.asciz "protected mode\n"
pass_msg:
	.asciz "pass "

	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff      /* 0x08: code, base 0, 4 GiB, 32-bit, accessed */
	.quad 0x00cf93000000ffff      /* 0x10: data, base 0, 4 GiB, 32-bit, accessed */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	/* The parameter block: build.py finds it by its magic and patches it. */
	.org PARAMS_OFFSET
params:
	.ascii "MGBS"
	.long 1                       /* layout version of this block */
param_base:
	.long 0x100000                /* region start: 16-byte aligned, above this sector */
param_bytes:
	.long 0x100000                /* region size: a positive multiple of 16 */
param_print_every:
	.long 1                       /* print "pass N" every this many passes */

	.org 510
	.byte 0x55, 0xaa

	.section .note.GNU-stack, "", @progbits
