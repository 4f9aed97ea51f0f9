/* nbd/pool.c — the requests of one connection in transmission, and its workers.
 *
 * A fixed array of CBT_NBD_MAX_INFLIGHT slots: the reader admits a request into a free slot
 * (waiting when none is free or the buffers would pass CBT_NBD_BUFFER_BUDGET), then either
 * serves it itself or queues it here. Workers (started on demand, at most CBT_NBD_MAX_WORKERS)
 * take queued requests in order, execute and answer them, and free the slot. A slot keeps its
 * buffer for the next request, so the hot path allocates nothing; idle buffers are given back
 * only to make room under the budget. The connection thread frees the pool only after every
 * slot is free and every worker joined, so no worker outlives its connection
 * (docs/nbd-server.md, "Connections and their requests").
 * The lock (a CbtMutex) and conditions are pthread's rather than GMutex/GCond (futex-based in
 * glib, opaque to ThreadSanitizer), so TSan checks the pool.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "common/memory.h"

#define BUF_ROUND (64u << 10)

/* Large buffers are mappings of their own, so the memory of a client that asked for 32 MiB
 * requests goes back to the system with the buffer, whatever malloc's thresholds became. */
static void *
buf_alloc(gsize cap)
{
  void *p = NULL;

  if (cap >= CBT_MEMORY_MAP_MIN)
    return cbt_memory_map(cap);
  /* Page-aligned, so cache.direct nodes can use O_DIRECT on it. */
  return posix_memalign(&p, 4096, cap) == 0 ? p : NULL;
}

static void
buf_free(void *buf, gsize cap)
{
  if (cap >= CBT_MEMORY_MAP_MIN)
    cbt_memory_unmap(buf, cap);
  else
    free(buf);
}

struct CbtNbdPool {
  CbtNbdConn *conn;
  CbtMutex lock;
  pthread_cond_t work; /* a request was queued, or the pool is stopping */
  pthread_cond_t done; /* a request completed */
  CbtNbdReq slots[CBT_NBD_MAX_INFLIGHT];
  gint free;       /* free list (LIFO: the warm buffer comes back first) */
  gint head, tail; /* queue for the workers */
  guint inflight;
  guint waiters; /* threads waiting on `done` */
  gsize bytes;   /* sum of the slots' buffer capacities */
  guint64 write_seq;
  guint idle;
  gboolean stopping;
  GThread *workers[CBT_NBD_MAX_WORKERS];
  guint n_workers;
};

CbtNbdPool *
cbt_nbd_pool_new(CbtNbdConn *conn)
{
  CbtNbdPool *pool = g_new0(CbtNbdPool, 1);

  pool->conn = conn;
  cbt_mutex_init(&pool->lock);
  pthread_cond_init(&pool->work, NULL);
  pthread_cond_init(&pool->done, NULL);
  for (guint i = 0; i < CBT_NBD_MAX_INFLIGHT; i++) {
    pool->slots[i].conn = conn;
    pool->slots[i].next = i + 1 < CBT_NBD_MAX_INFLIGHT ? (gint)i + 1 : -1;
  }
  pool->free = 0;
  pool->head = pool->tail = -1;
  return pool;
}

static void
wait_done_locked(CbtNbdPool *pool)
{
  CBT_ASSERT_HELD(&pool->lock);
  pool->waiters++;
  cbt_mutex_cond_wait(&pool->lock, &pool->done);
  pool->waiters--;
}

/* Give back the buffer of one idle slot other than @keep. FALSE when there is none. */
static gboolean
release_idle_locked(CbtNbdPool *pool, CbtNbdReq *keep)
{
  CBT_ASSERT_HELD(&pool->lock);
  for (gint i = pool->free; i >= 0; i = pool->slots[i].next) {
    CbtNbdReq *r = &pool->slots[i];
    if (r != keep && r->buf) {
      pool->bytes -= r->cap;
      buf_free(g_steal_pointer(&r->buf), r->cap);
      r->cap = 0;
      return TRUE;
    }
  }
  return FALSE;
}

static gsize
round_cap(gsize len)
{
  return (len + BUF_ROUND - 1) / BUF_ROUND * BUF_ROUND;
}

/* A free slot that can hold @need bytes within the budget (lock held). */
static CbtNbdReq *
take_slot_locked(CbtNbdPool *pool, gsize need)
{
  CBT_ASSERT_HELD(&pool->lock);
  for (;;) {
    if (pool->free >= 0) {
      CbtNbdReq *r = &pool->slots[pool->free];
      if (need <= r->cap || pool->bytes - r->cap + round_cap(need) <= CBT_NBD_BUFFER_BUDGET) {
        pool->free = r->next;
        return r;
      }
      if (release_idle_locked(pool, r))
        continue;
    }
    wait_done_locked(pool);
  }
}

CbtNbdReq *
cbt_nbd_pool_admit(CbtNbdPool *pool, guint16 type, gsize buf_len)
{
  gboolean write = type == NBD_CMD_WRITE || type == NBD_CMD_TRIM || type == NBD_CMD_WRITE_ZEROES;

  cbt_mutex_lock(&pool->lock);
  CbtNbdReq *r = take_slot_locked(pool, buf_len);
  pool->inflight++;
  r->write_seq = write ? ++pool->write_seq : 0;
  r->flush_upto = pool->write_seq;
  gsize grow = buf_len > r->cap ? round_cap(buf_len) : 0;
  if (grow) {
    pool->bytes += grow - r->cap;
    buf_free(g_steal_pointer(&r->buf), r->cap);
    r->cap = grow;
  }
  cbt_mutex_unlock(&pool->lock);

  if (grow && !(r->buf = buf_alloc(grow))) {
    cbt_mutex_lock(&pool->lock);
    pool->bytes -= r->cap;
    r->cap = 0;
    cbt_mutex_unlock(&pool->lock);
    cbt_nbd_pool_complete(pool, r);
    return NULL;
  }
  return r;
}

gboolean
cbt_nbd_pool_busy(CbtNbdPool *pool)
{
  cbt_mutex_lock(&pool->lock);
  gboolean busy = pool->inflight > 0;
  cbt_mutex_unlock(&pool->lock);
  return busy;
}

void
cbt_nbd_pool_complete(CbtNbdPool *pool, CbtNbdReq *req)
{
  cbt_nbd_account_done(req);
  cbt_mutex_lock(&pool->lock);
  req->write_seq = 0;
  req->next = pool->free;
  pool->free = (gint)(req - pool->slots);
  pool->inflight--;
  if (pool->waiters)
    pthread_cond_broadcast(&pool->done);
  cbt_mutex_unlock(&pool->lock);
}

void
cbt_nbd_pool_wait_writes(CbtNbdPool *pool, const CbtNbdReq *req)
{
  cbt_mutex_lock(&pool->lock);
  for (;;) {
    gboolean pending = FALSE;
    for (guint i = 0; i < CBT_NBD_MAX_INFLIGHT && !pending; i++) {
      guint64 seq = pool->slots[i].write_seq;
      pending = seq != 0 && seq <= req->flush_upto;
    }
    if (!pending)
      break;
    wait_done_locked(pool);
  }
  cbt_mutex_unlock(&pool->lock);
}

static gpointer
worker(gpointer data)
{
  CbtNbdPool *pool = data;

  cbt_memory_thread_begin();

  cbt_mutex_lock(&pool->lock);
  for (;;) {
    while (pool->head < 0 && !pool->stopping) {
      pool->idle++;
      cbt_mutex_cond_wait(&pool->lock, &pool->work);
      pool->idle--;
    }
    if (pool->head < 0)
      break;
    CbtNbdReq *r = &pool->slots[pool->head];
    pool->head = r->next;
    if (pool->head < 0)
      pool->tail = -1;
    cbt_mutex_unlock(&pool->lock);
    cbt_nbd_execute(pool, r);
    cbt_nbd_pool_complete(pool, r);
    cbt_mutex_lock(&pool->lock);
  }
  cbt_mutex_unlock(&pool->lock);
  return NULL;
}

void
cbt_nbd_pool_submit(CbtNbdPool *pool, CbtNbdReq *req)
{
  GThread *t = NULL;

  cbt_mutex_lock(&pool->lock);
  req->next = -1;
  if (pool->tail >= 0)
    pool->slots[pool->tail].next = (gint)(req - pool->slots);
  else
    pool->head = (gint)(req - pool->slots);
  pool->tail = (gint)(req - pool->slots);
  if (pool->idle > 0) {
    pthread_cond_signal(&pool->work);
  } else if (pool->n_workers < CBT_NBD_MAX_WORKERS) {
    t = g_thread_try_new("nbd-worker", worker, pool, NULL);
    if (t)
      pool->workers[pool->n_workers++] = t;
  }
  gboolean stranded = pool->n_workers == 0;
  cbt_mutex_unlock(&pool->lock);

  if (stranded) {
    /* No thread could be started: serve it here rather than never. */
    cbt_mutex_lock(&pool->lock);
    pool->head = pool->tail = -1;
    cbt_mutex_unlock(&pool->lock);
    cbt_nbd_execute(pool, req);
    cbt_nbd_pool_complete(pool, req);
  }
}

void
cbt_nbd_pool_free(CbtNbdPool *pool)
{
  cbt_mutex_lock(&pool->lock);
  while (pool->inflight > 0)
    wait_done_locked(pool);
  pool->stopping = TRUE;
  pthread_cond_broadcast(&pool->work);
  cbt_mutex_unlock(&pool->lock);

  for (guint i = 0; i < pool->n_workers; i++)
    g_thread_join(pool->workers[i]);
  gsize bytes = 0;
  for (guint i = 0; i < CBT_NBD_MAX_INFLIGHT; i++) {
    buf_free(pool->slots[i].buf, pool->slots[i].cap);
    bytes += pool->slots[i].cap;
  }
  cbt_mutex_clear(&pool->lock);
  pthread_cond_destroy(&pool->work);
  pthread_cond_destroy(&pool->done);
  g_free(pool);
  cbt_memory_released(bytes);
}
