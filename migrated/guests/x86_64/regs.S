/* Loading and storing the x87, SSE, AVX and AVX-512 registers the CPL3 checks keep, in assembly
 * so the C around it (compiled with -mgeneral-regs-only) can never touch them. Included by
 * start.S. Buffer layout (u64 words), shared with smallos.c:
 *     0-6    x87 st(0)-st(6) as 64-bit integers (fild/fistp, exact; st(7) stays free)
 *     7      MXCSR (low 32 bits)
 *     8-14   k1-k7
 *     16-271 vector register i at words 16 + 8 i: zmm (64 bytes), ymm (32) or xmm (16)
 * rsi = WLX_FEAT_* of what the CPU and XCR0 allow. */
#define FEAT_AVX 2
#define FEAT_AVX512 4
#define VEC 128

	.text
	.globl wlx_regs_load
	.type wlx_regs_load, @function
wlx_regs_load:
	fninit
	.irp i,6,5,4,3,2,1,0
	fildq (8 * \i)(%rdi)
	.endr
	ldmxcsr 56(%rdi)
	testq $FEAT_AVX512, %rsi
	jz 1f
	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 (VEC + 64 * \i)(%rdi), %zmm\i
	.endr
	.irp i,1,2,3,4,5,6,7
	kmovq (64 + 8 * (\i - 1))(%rdi), %k\i
	.endr
	ret
1:	testq $FEAT_AVX, %rsi
	jz 2f
	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	vmovdqu (VEC + 64 * \i)(%rdi), %ymm\i
	.endr
	ret
2:	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movdqu (VEC + 64 * \i)(%rdi), %xmm\i
	.endr
	ret
	.size wlx_regs_load, . - wlx_regs_load

	.globl wlx_regs_store
	.type wlx_regs_store, @function
wlx_regs_store:
	.irp i,0,1,2,3,4,5,6
	fld %st(\i)
	fistpq (8 * \i)(%rdi)
	.endr
	stmxcsr 56(%rdi)
	testq $FEAT_AVX512, %rsi
	jz 1f
	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 %zmm\i, (VEC + 64 * \i)(%rdi)
	.endr
	.irp i,1,2,3,4,5,6,7
	kmovq %k\i, (64 + 8 * (\i - 1))(%rdi)
	.endr
	ret
1:	testq $FEAT_AVX, %rsi
	jz 2f
	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	vmovdqu %ymm\i, (VEC + 64 * \i)(%rdi)
	.endr
	ret
2:	.irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movdqu %xmm\i, (VEC + 64 * \i)(%rdi)
	.endr
	ret
	.size wlx_regs_store, . - wlx_regs_store
