/* The small OS's CPL0 part in assembly: the kernel entry (at a fixed offset in the image, so the
 * VMM can start there), the interrupt stubs and the drop to CPL3. Included by start.S.
 *
 * PVM emulates every CPL0 instruction (HOST-NOTES): the stubs save only the caller-saved
 * registers and call C compiled with -mgeneral-regs-only, so no vector state is touched. */
#include "abi_smallos.h"

#define USER_CS (0x20 | 3)
#define USER_DS (0x18 | 3)

	.org WLX_KERNEL_ENTRY_OFFSET
	.globl _kstart
	.type _kstart, @function
/* rdi = vCPU index, rsi = parameter page, rsp = this vCPU's kernel stack top (= TSS rsp0). */
_kstart:
	movq %rdi, %r12
	movq %rsi, %r13
	xorl %ebp, %ebp
	call kernel_main        /* returns this vCPU's CPL3 stack top */
	pushq $USER_DS          /* ss */
	pushq %rax              /* rsp */
	pushq $0x202            /* rflags: IF */
	pushq $USER_CS          /* cs */
	leaq _start(%rip), %rax
	pushq %rax              /* rip */
	movq %r12, %rdi
	movq %r13, %rsi
	xorl %eax, %eax
	xorl %ecx, %ecx
	xorl %edx, %edx
	iretq
	.size _kstart, . - _kstart

/* One 16-byte stub per vector: a zero error code where the CPU pushes none, the vector, then
 * the common path. The IDT points vector v at isr_stubs + 16 * v. */
	.text
	.p2align 4
	.globl isr_stubs
isr_stubs:
	vec = 0
	.rept 256
	.p2align 4
	.if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	vec = vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq %rsp, %rdi         /* struct kframe * */
	call kernel_interrupt   /* rsp is 16-aligned here: 5 CPU words + 2 + 9 = 16 words */
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $16, %rsp          /* vector, error code */
	iretq

/* The end of a vCPU that faulted: interrupts keep being counted, the workload stops. */
	.globl kernel_park
kernel_park:
	sti
	hlt
	jmp kernel_park
