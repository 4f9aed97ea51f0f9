/* common/memory.h — giving memory back to the system after bursts.
 *
 * glibc keeps what a program frees: in the heap of the thread's arena (one per busy thread, up
 * to 8 per core), and the threshold above which it maps allocations of their own rises to the
 * largest block ever freed. A daemon that serves a burst of hostile clients would keep their
 * high-water mark resident for good. Code that has just freed a lot says so here; past
 * CBT_MEMORY_TRIM_AFTER bytes, the caller's thread trims every arena (malloc_trim), which
 * returns the free pages inside the heaps, not only their tops (docs/user-guide.md, "Limits
 * and bad input").
 */
#pragma once

#include <glib.h>

#define CBT_MEMORY_TRIM_AFTER (16u << 20)

/* Blocks from this size up are mapped on their own and unmapped when freed. glibc starts
 * there too but raises the threshold to the largest mapped block freed so far (up to 32 MiB),
 * after which a burst's big buffers land in the heaps and stay; fixing it keeps them out.
 * Measured with tests/daemon/test_hostile_memory.py: the NBD half of the campaign left
 * +17 MiB with the moving threshold and +1 MiB with it fixed. */
#define CBT_MEMORY_MMAP_THRESHOLD (128u << 10)

/* Free memory at the top of a heap that glibc keeps between bursts (see memory.c). */
#define CBT_MEMORY_TRIM_THRESHOLD (4u << 20)

/* Once, early in main(): set the allocator up as above. */
void cbt_memory_init(void);

/* Any thread: about @bytes were just freed. Cheap unless it triggers a trim. */
void cbt_memory_released(gsize bytes);

/* Buffers of at least this size come from the kernel directly (cbt_memory_map()). */
#define CBT_MEMORY_MAP_MIN (256u << 10)

/* @len bytes of zero-filled, page-aligned memory of its own mapping, unmapped (returned to the
 * system at once) by cbt_memory_unmap(); NULL when the kernel has none. */
void *cbt_memory_map(gsize len);
void cbt_memory_unmap(void *p, gsize len);

/* First thing in every thread cbtd starts (its function's first line). GLib keeps a cache per
 * thread for its slice allocator, reachable only from the thread's pthread-specific data; a
 * leak checker that stops looking at a thread as it begins to end reports that cache as
 * leaked. Under LeakSanitizer (the fuzzing build) the cache is made here with leak checking off
 * for it; otherwise this does nothing. */
void cbt_memory_thread_begin(void);
