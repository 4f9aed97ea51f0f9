/* common/assert.h — contracts that headers state, checked in debug builds (without NDEBUG).
 *
 * CBT_ASSERT_MAIN_THREAD(): the caller runs on the control plane, the thread that owns the
 * default GMainContext. The daemon's main thread, and every test program's, takes that
 * ownership for good with cbt_main_thread_init() before anything else runs.
 *
 * CbtMutex: a pthread mutex that knows its owner, so CBT_ASSERT_HELD() can check the rule of a
 * function named _locked. pthread's, not GMutex: ThreadSanitizer sees its ordering.
 */
#pragma once

#include <glib.h>
#include <pthread.h>

G_BEGIN_DECLS

/* Make the calling thread the owner of the default main context, once and for good. */
void cbt_main_thread_init(void);

void cbt_assert_main_thread_failed(const char *func);

typedef struct {
  pthread_mutex_t mutex;
#ifndef NDEBUG
  pthread_t owner; /* valid while held, read and written with relaxed atomics */
  gint held;
#endif
} CbtMutex;

#define CBT_MUTEX_INIT                                                                             \
  {                                                                                                \
    .mutex = PTHREAD_MUTEX_INITIALIZER                                                             \
  }

void cbt_mutex_init(CbtMutex *m);
void cbt_mutex_clear(CbtMutex *m);

/* The owner bookkeeping, done while the pthread mutex is held. */
static inline void
cbt_mutex_note_held_(CbtMutex *m, gboolean held)
{
#ifndef NDEBUG
  if (held)
    __atomic_store_n(&m->owner, pthread_self(), __ATOMIC_RELAXED);
  __atomic_store_n(&m->held, held ? 1 : 0, __ATOMIC_RELAXED);
#else
  (void)m;
  (void)held;
#endif
}

static inline void
cbt_mutex_lock(CbtMutex *m)
{
  pthread_mutex_lock(&m->mutex);
  cbt_mutex_note_held_(m, TRUE);
}

static inline void
cbt_mutex_unlock(CbtMutex *m)
{
  cbt_mutex_note_held_(m, FALSE);
  pthread_mutex_unlock(&m->mutex);
}

/* pthread_cond_wait() and _timedwait() on a CbtMutex: the mutex is not held while waiting. */
static inline int
cbt_mutex_cond_wait(CbtMutex *m, pthread_cond_t *cond)
{
  cbt_mutex_note_held_(m, FALSE);
  int r = pthread_cond_wait(cond, &m->mutex);
  cbt_mutex_note_held_(m, TRUE);
  return r;
}

static inline int
cbt_mutex_cond_timedwait(CbtMutex *m, pthread_cond_t *cond, const struct timespec *abstime)
{
  cbt_mutex_note_held_(m, FALSE);
  int r = pthread_cond_timedwait(cond, &m->mutex, abstime);
  cbt_mutex_note_held_(m, TRUE);
  return r;
}

#ifdef NDEBUG
#define CBT_ASSERT_MAIN_THREAD() ((void)0)
#define CBT_ASSERT_HELD(m) ((void)0)
#else
#define CBT_ASSERT_MAIN_THREAD()                                                                   \
  G_STMT_START                                                                                     \
  {                                                                                                \
    if (G_UNLIKELY(!g_main_context_is_owner(g_main_context_default())))                            \
      cbt_assert_main_thread_failed(G_STRFUNC);                                                    \
  }                                                                                                \
  G_STMT_END
#define CBT_ASSERT_HELD(m)                                                                         \
  g_assert(__atomic_load_n(&(m)->held, __ATOMIC_RELAXED) &&                                        \
           pthread_equal(__atomic_load_n(&(m)->owner, __ATOMIC_RELAXED), pthread_self()))
#endif

G_END_DECLS
