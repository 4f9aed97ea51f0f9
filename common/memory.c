/* common/memory.c — see memory.h. */
#include "common/memory.h"

#include <malloc.h>
#include <sys/mman.h>

static gsize released; /* bytes since the last trim (g_atomic_pointer_*: gsize wide) */

void
cbt_memory_init(void)
{
  mallopt(M_MMAP_THRESHOLD, CBT_MEMORY_MMAP_THRESHOLD);
  /* Fixing the mapping threshold also fixes the trim threshold at glibc's 128 KiB, so every
   * heap would give back and fault in again its top at each burst of requests (measured:
   * ~10% fewer 4 KiB writes at depth 32). Tops up to this size stay; the trims after a
   * burst (cbt_memory_released) still return everything. */
  mallopt(M_TRIM_THRESHOLD, CBT_MEMORY_TRIM_THRESHOLD);
}

void
cbt_memory_released(gsize bytes)
{
  gsize now = (gsize)g_atomic_pointer_add(&released, bytes) + bytes;

  if (now < CBT_MEMORY_TRIM_AFTER)
    return;
  /* One thread trims per threshold crossing; the others go on. */
  if (g_atomic_pointer_compare_and_exchange(&released, now, 0))
    malloc_trim(0);
}

void *
cbt_memory_map(gsize len)
{
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

void
cbt_memory_unmap(void *p, gsize len)
{
  if (p)
    munmap(p, len);
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(leak_sanitizer)
#define CBT_LSAN 1
#include <sanitizer/lsan_interface.h>
#endif
#endif

void
cbt_memory_thread_begin(void)
{
#ifdef CBT_LSAN
  __lsan_disable();
  g_slice_free1(8, g_slice_alloc(8)); /* GLib 2.74 makes the thread's cache at its first use */
  __lsan_enable();
#endif
}
