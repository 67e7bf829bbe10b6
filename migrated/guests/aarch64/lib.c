/* What a freestanding C compiler may call on its own: GCC turns larger structure
 * initialisations into memset/memcpy calls even with -ffreestanding. The build passes
 * -fno-tree-loop-distribute-patterns so these loops do not become calls to themselves. */
#include <stddef.h>

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;
	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}
