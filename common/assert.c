/* common/assert.c — the slow paths of common/assert.h. */
#include "common/assert.h"

void
cbt_main_thread_init(void)
{
  /* Acquired once and never released: the thread keeps the context, whether it is iterating
   * it or running a command outside the loop (the command line, a test's direct call). */
  if (!g_main_context_is_owner(g_main_context_default()) &&
      !g_main_context_acquire(g_main_context_default()))
    g_error("the default main context belongs to another thread");
}

void
cbt_assert_main_thread_failed(const char *func)
{
  g_error("%s: called off the main thread (the owner of the default main context)", func);
}

void
cbt_mutex_init(CbtMutex *m)
{
  pthread_mutex_init(&m->mutex, NULL);
#ifndef NDEBUG
  m->held = 0;
#endif
}

void
cbt_mutex_clear(CbtMutex *m)
{
  pthread_mutex_destroy(&m->mutex);
}
