/* tools/backup/copy.c — the copy of a point's pieces, on several NBD connections at once.
 *
 * Each worker has its own connection to the frozen view, writes into the point's image
 * (qcow2.c, which takes writes from several threads) and takes the next piece from a shared
 * counter: the pieces are independent, so order does not matter. A piece or cluster that reads
 * as zeroes is not written in a full (the point stays sparse) and is flagged zero in an
 * incremental (it must mask the older point); a whole piece of zeroes is recorded as zeroes in
 * the manifest. The first error stops every worker; the caller then throws the point away, so
 * a partial copy is never mistaken for a point.
 */
#include "backup.h"

#include <gnutls/crypto.h>
#include <string.h>

typedef struct {
  const CbtBackupCopyArgs *a;
  GArray *pieces;
  gint next;
  gint stop;
  GMutex lock;
  GError *error;
  CbtBackupCopyStats stats;
  guint64 max_len;
  gint64 start_us;
  guint64 taken;  /* bytes the rate limit has let through; under lock */
  guint finished; /* workers done; under lock, signalled on @done */
  GCond done;
} Copy;

static void
fail(Copy *c, GError *err)
{
  g_mutex_lock(&c->lock);
  if (!c->error)
    c->error = err;
  else
    g_error_free(err);
  g_mutex_unlock(&c->lock);
  g_atomic_int_set(&c->stop, 1);
}

static gboolean
all_zero(const guint8 *buf, gsize len)
{
  return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

/* --max-rate: a piece may start once the bytes before it fit the rate since the start, so a
 * backup never takes more of the storage than it was given, however many connections. */
static void
throttle(Copy *c, guint64 len)
{
  if (!c->a->max_rate)
    return;
  g_mutex_lock(&c->lock);
  gint64 due = c->start_us + (gint64)(c->taken * G_USEC_PER_SEC / c->a->max_rate);
  c->taken += len;
  g_mutex_unlock(&c->lock);
  while (g_get_monotonic_time() < due && !cbt_backup_interrupted() && !g_atomic_int_get(&c->stop))
    g_usleep(MIN(due - g_get_monotonic_time(), 50 * 1000));
}

/* One piece; on failure @error says what and where. */
static gboolean
copy_piece(Copy *c, struct nbd_handle *src, guint8 *buf, CbtBackupPiece *p, CbtBackupCopyStats *st,
           GError **error)
{
  if (p->kind == CBT_BACKUP_DATA) {
    throttle(c, p->length);
    if (cbt_backup_interrupted() || g_atomic_int_get(&c->stop))
      return TRUE; /* the caller sees why */
    if (nbd_pread(src, buf, p->length, p->offset, 0) == -1) {
      cbt_backup_nbd_error(error, "reading the view");
      return FALSE;
    }
    st->read += p->length;
    if (all_zero(buf, p->length))
      p->kind = CBT_BACKUP_ZERO;
  }
  if (p->kind == CBT_BACKUP_ZERO) {
    if (c->a->write_zeroes && !cbt_backup_qcow2_zero(c->a->target, p->offset, p->length, error))
      return FALSE;
    st->zeroed += c->a->write_zeroes ? p->length : 0;
    return TRUE;
  }
  gnutls_hash_fast(GNUTLS_DIG_SHA256, buf, p->length, p->sha256);
  if (!cbt_backup_qcow2_write(c->a->target, p->offset, buf, p->length, c->a->write_zeroes, error))
    return FALSE;
  st->written += p->length;
  return TRUE;
}

static gpointer
worker(gpointer data)
{
  Copy *c = data;
  GError *err = NULL;
  CbtBackupCopyStats st = { 0 };
  struct nbd_handle *src = cbt_backup_nbd_connect(c->a->source, c->a->source_export, NULL, &err);
  g_autofree guint8 *buf = g_malloc(MAX(c->max_len, 1));

  while (!err && !g_atomic_int_get(&c->stop) && !cbt_backup_interrupted()) {
    guint i = (guint)g_atomic_int_add(&c->next, 1);
    if (i >= c->pieces->len)
      break;
    CbtBackupPiece *p = &g_array_index(c->pieces, CbtBackupPiece, i);
    if (!copy_piece(c, src, buf, p, &st, &err))
      g_prefix_error(&err, "at offset %" G_GUINT64_FORMAT ": ", p->offset);
    else if (c->a->progress)
      cbt_backup_progress_add(c->a->progress, p->length);
  }
  if (err)
    fail(c, err);
  if (src) {
    nbd_shutdown(src, 0);
    nbd_close(src);
  }
  g_mutex_lock(&c->lock);
  c->stats.read += st.read;
  c->stats.written += st.written;
  c->stats.zeroed += st.zeroed;
  c->finished++;
  g_cond_signal(&c->done);
  g_mutex_unlock(&c->lock);
  return NULL;
}

gboolean
cbt_backup_copy(const CbtBackupCopyArgs *a, GArray *pieces, CbtBackupCopyStats *stats,
                GError **error)
{
  Copy c = { .a = a, .pieces = pieces };
  guint n = CLAMP(a->connections, 1, 16);
  g_autoptr(GPtrArray) threads = g_ptr_array_new();

  for (guint i = 0; i < pieces->len; i++) {
    const CbtBackupPiece *p = &g_array_index(pieces, CbtBackupPiece, i);
    if (p->kind == CBT_BACKUP_DATA)
      c.max_len = MAX(c.max_len, p->length);
  }
  g_mutex_init(&c.lock);
  g_cond_init(&c.done);
  c.start_us = g_get_monotonic_time();
  for (guint i = 0; i < n; i++)
    g_ptr_array_add(threads, g_thread_new("copy", worker, &c));
  /* The owner of the progress output is this thread: it ticks while the workers copy, and
   * wakes as soon as the last one is done. */
  g_mutex_lock(&c.lock);
  while (c.finished < n) {
    if (!g_cond_wait_until(&c.done, &c.lock, g_get_monotonic_time() + 200 * 1000) && a->progress) {
      g_mutex_unlock(&c.lock);
      cbt_backup_progress_tick(a->progress, FALSE);
      g_mutex_lock(&c.lock);
    }
  }
  g_mutex_unlock(&c.lock);
  for (guint i = 0; i < n; i++)
    g_thread_join(g_ptr_array_index(threads, i));
  g_cond_clear(&c.done);
  g_mutex_clear(&c.lock);
  *stats = c.stats;
  if (c.error) {
    g_propagate_error(error, c.error);
    return FALSE;
  }
  if (!cbt_backup_check_interrupt(error))
    return FALSE;
  if (a->progress)
    cbt_backup_progress_tick(a->progress, TRUE);
  return TRUE;
}
