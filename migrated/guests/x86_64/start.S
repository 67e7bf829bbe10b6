/* Entry, at the first byte of the image (the VMM sets rip here). The VMM hands over
 * rdi = vCPU index, rsi = parameter page, rsp = this vCPU's stack top, at CPL3, IF=0.
 * The small OS (abi_smallos.h) enters at _kstart instead, at CPL0, and reaches _start by iretq
 * with the same registers and IF=1. */
	.section .text.start, "ax"
	.globl _start
	.type _start, @function
_start:
	andq $-16, %rsp      /* the SysV ABI wants rsp 16-aligned before the call */
	xorl %ebp, %ebp
	call workload_main
1:	pause               /* workload_main never returns; never halt (hlt #GPs at CPL3) */
	jmp 1b
	.size _start, . - _start
#include "kernel.S"
#include "regs.S"
	.section .note.GNU-stack, "", @progbits
