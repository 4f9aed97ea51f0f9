/* bitmap/store/mark.c — the write path of a store, its epochs and its syncer.
 *
 * cbt_store_mark() keeps invariants (1) and (2) of store.c. Its fast path, a write whose chunks
 * are all set and whose regions are durable in the current epoch (every rewrite of a dirty
 * chunk in steady state), takes no lock and makes no system call: one walk of the bitmap per
 * recording bitmap and one load per region. A newly dirty chunk costs a pwrite of its word
 * into the area, under the store's lock; a region new to the epoch costs a pwrite into the
 * slot and a share of one group-committed sync.
 *
 * Epochs: the syncer (every sync_interval_ms, and only when something changed) ends the current
 * epoch: it writes the next slot holding the regions written during this epoch (the hot ones
 * stay durable, so steady writers never wait), switches to it, syncs the areas, and only then
 * records in the header that the old epoch is synced (invariant 3). A region nobody wrote
 * during an epoch so leaves the intents: after a power loss, recovery widens by the regions
 * written during the last two sync intervals at most (docs/bitmaps.md, "Crashes").
 */
#include "bitmap/store/store-internal.h"
#include "common/memory.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#define BIT(r) (G_GUINT64_CONSTANT(1) << ((r) % 64))
#define AREA_STEP_WORDS 8192u

static gboolean
test_bit(const guint64 *a, guint64 r)
{
  return (__atomic_load_n(&a[r / 64], __ATOMIC_ACQUIRE) & BIT(r)) != 0;
}

static void
set_bit(guint64 *a, guint64 r)
{
  if (!(__atomic_load_n(&a[r / 64], __ATOMIC_RELAXED) & BIT(r)))
    __atomic_fetch_or(&a[r / 64], BIT(r), __ATOMIC_RELEASE);
}

/* ---- slots ----------------------------------------------------------------------------- */

static int
write_slot(CbtStore *s, guint i, guint64 epoch, const guint64 *bits)
{
  CbtStoreSlotHead h = { .epoch = epoch, .nregions = s->region_words * 64 };
  g_autofree guint64 *zeros = bits ? NULL : g_new0(guint64, s->region_words);

  memcpy(h.magic, CBT_STORE_SLOT_MAGIC, 8);
  cbt_store_checksum(h.checksum, &h, G_STRUCT_OFFSET(CbtStoreSlotHead, checksum), NULL, 0);
  /* Bits first: a slot whose head names the new epoch never shows the old epoch's bits as
   * less than they are (a torn head counts as live anyway, load.c). */
  int r = cbt_store_io_write(s->f, bits ? bits : zeros, s->region_words * 8,
                             s->hdr.slot_offset[i] + CBT_STORE_PAGE);
  return r < 0 ? r : cbt_store_io_write(s->f, &h, sizeof h, s->hdr.slot_offset[i]);
}

void
cbt_store_intents_free(CbtStore *s)
{
  for (int i = 0; i < 2; i++) {
    g_clear_pointer(&s->durable[i], g_free);
    g_clear_pointer(&s->written[i], g_free);
    g_clear_pointer(&s->touched[i], g_free);
  }
}

int
cbt_store_intents_init(CbtStore *s, guint64 epoch0)
{
  cbt_store_intents_free(s);
  s->region_shift = s->hdr.region_shift;
  s->region_words = (s->hdr.slot_len - CBT_STORE_PAGE) / 8;
  s->nregions = (s->size >> s->region_shift) + 1;
  for (int i = 0; i < 2; i++) {
    s->durable[i] = g_new0(guint64, s->region_words);
    s->written[i] = g_new0(guint64, s->region_words);
    s->touched[i] = g_new0(guint64, s->region_words);
  }
  s->cur = 0;
  s->epoch = epoch0 + 1;
  s->hdr.synced_epoch = epoch0;
  int r = write_slot(s, 0, epoch0 + 1, NULL);
  if (r == 0)
    r = write_slot(s, 1, epoch0, NULL);
  return r < 0 ? r : s->f->io->sync(s->f);
}

int
cbt_store_intents_reset(CbtStore *s)
{
  s->hdr.region_shift = cbt_store_region_shift(s, G_GUINT64_CONSTANT(1) << s->hdr.region_shift);
  return cbt_store_intents_init(s, s->epoch + 1);
}

/* ---- failures -------------------------------------------------------------------------- */

/* Under `lock`: an area write failed. Invariant (4): the flag is durable before we go on. */
static void
degrade(CbtStore *s, int err)
{
  s->fail_gen++;
  if (__atomic_load_n(&s->degraded, __ATOMIC_ACQUIRE))
    return;
  __atomic_store_n(&s->degraded, TRUE, __ATOMIC_RELEASE);
  s->hdr.flags |= CBT_STORE_HDR_DEGRADED;
  int r = cbt_store_write_header(s);
  cbt_store_report(s, "cannot write a bitmap's bits (recovery will widen by intent regions)", -err);
  if (r < 0)
    cbt_store_fail(s, "cannot record that the store is degraded", -r);
}

/* ---- the write path -------------------------------------------------------------------- */

/* Invariant (1): the words go to the area, then the bits to memory, under `lock`. */
static void
mark_area(CbtStore *s, CbtStoreEntry *e, guint64 offset, guint64 end)
{
  guint shift = (guint)g_bit_storage(e->granularity) - 1;
  guint64 c0 = offset >> shift, c1 = (end - 1) >> shift;
  guint64 buf[AREA_STEP_WORDS];

  pthread_mutex_lock(&s->lock);
  for (guint64 w = c0 / 64; w <= c1 / 64;) {
    guint64 n = MIN((guint64)AREA_STEP_WORDS, c1 / 64 - w + 1);
    cbt_bitmap_read_words(e->bm, w, n, buf);
    for (guint64 i = 0; i < n; i++) {
      guint64 lo = w + i == c0 / 64 ? c0 % 64 : 0, hi = w + i == c1 / 64 ? c1 % 64 : 63;
      buf[i] |= (hi == 63 ? G_MAXUINT64 : (G_GUINT64_CONSTANT(1) << (hi + 1)) - 1) &
                ~((G_GUINT64_CONSTANT(1) << lo) - 1);
    }
    int r = cbt_store_io_write(s->f, buf, n * 8, e->area_offset + w * 8);
    if (r < 0)
      degrade(s, r);
    w += n;
  }
  cbt_bitmap_mark_range(e->bm, offset, end - offset);
  __atomic_store_n(&s->fine_dirty, TRUE, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&s->lock);
}

/* Under `lock`: wait until every intent write up to @gen is durable (group commit: the first
 * waiter syncs for all). FALSE when the sync failed. */
static gboolean
wait_intents(CbtStore *s, guint64 gen)
{
  while (s->intent_synced < gen && !__atomic_load_n(&s->failed, __ATOMIC_ACQUIRE)) {
    if (s->intent_syncing) {
      pthread_cond_wait(&s->synced, &s->lock);
      continue;
    }
    guint64 g = s->intent_gen;
    s->intent_syncing = TRUE;
    pthread_mutex_unlock(&s->lock);
    int r = s->f->io->sync(s->f);
    pthread_mutex_lock(&s->lock);
    s->intent_syncing = FALSE;
    if (r == 0) {
      s->intent_synced = MAX(s->intent_synced, g);
    } else {
      cbt_store_fail(s, "cannot sync intent regions", -r);
    }
    pthread_cond_broadcast(&s->synced);
  }
  return s->intent_synced >= gen;
}

/* Invariant (2), slow path: regions [r0, r1] durable in the current epoch's slot. */
static void
mark_intents(CbtStore *s, guint64 r0, guint64 r1)
{
  pthread_mutex_lock(&s->lock);
  guint cur = s->cur;
  guint64 *written = s->written[cur];
  guint64 w0 = G_MAXUINT64, w1 = 0;
  for (guint64 r = r0; r <= r1; r++) {
    if (!(written[r / 64] & BIT(r))) {
      written[r / 64] |= BIT(r);
      w0 = MIN(w0, r / 64);
      w1 = r / 64;
    }
  }
  if (w0 != G_MAXUINT64) {
    int err = cbt_store_io_write(s->f, written + w0, (w1 - w0 + 1) * 8,
                                 s->hdr.slot_offset[cur] + CBT_STORE_PAGE + w0 * 8);
    if (err < 0)
      cbt_store_fail(s, "cannot write intent regions", -err);
    s->intent_gen++;
  }
  /* Also when another thread wrote these regions and waits for their sync. */
  if (wait_intents(s, s->intent_gen))
    for (guint64 r = r0; r <= r1; r++)
      set_bit(s->durable[cur], r);
  pthread_mutex_unlock(&s->lock);
}

void
cbt_store_mark(CbtStore *s, guint64 offset, guint64 len)
{
  CbtStoreRecSet *set = __atomic_load_n(&s->rec, __ATOMIC_ACQUIRE);

  if (!set || len == 0 || offset >= s->size)
    return;
  guint64 end = len > s->size - offset ? s->size : offset + len;
  for (guint i = 0; i < set->n; i++)
    if (cbt_bitmap_next_clean(set->e[i]->bm, offset, end) >= 0)
      mark_area(s, set->e[i], offset, end);
  /* The epoch is read after the area writes (invariant 2). */
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  guint cur = __atomic_load_n(&s->cur, __ATOMIC_SEQ_CST);
  guint64 r0 = offset >> s->region_shift, r1 = (end - 1) >> s->region_shift;
  gboolean need = FALSE;
  for (guint64 r = r0; r <= r1; r++) {
    set_bit(s->touched[cur], r);
    need = need || !test_bit(s->durable[cur], r);
  }
  if (need)
    mark_intents(s, r0, r1);
}

void
cbt_store_publish_recording(CbtStore *s)
{
  CbtStoreRecSet *set = g_malloc(sizeof *set + s->entries->len * sizeof(CbtStoreEntry *));

  set->n = 0;
  for (guint i = 0; i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    if (e->recording && e->bm && !e->inconsistent)
      set->e[set->n++] = e;
  }
  if (set->n == 0)
    g_clear_pointer(&set, g_free);
  /* The caller holds the device drained: no reader of the old set is left. */
  g_free(__atomic_exchange_n(&s->rec, set, __ATOMIC_ACQ_REL));
}

/* ---- areas ----------------------------------------------------------------------------- */

typedef struct {
  CbtStore *s;
  CbtStoreEntry *e;
  guint64 pos;
  int err;
} AreaWriter;

static void
area_piece(const guint8 *data, gsize len, gpointer p)
{
  AreaWriter *w = p;
  guint64 at = w->e->area_offset + w->pos;

  len = (gsize)MIN((guint64)len, w->e->area_len - MIN(w->pos, w->e->area_len));
  if (w->err == 0 && len)
    w->err =
      data ? cbt_store_io_write(w->s->f, data, len, at) : w->s->f->io->punch(w->s->f, at, len);
  w->pos += len;
}

int
cbt_store_write_area(CbtStore *s, CbtStoreEntry *e)
{
  AreaWriter w = { s, e, 0, 0 };

  cbt_bitmap_serialize(e->bm, area_piece, &w);
  if (w.err == 0 && w.pos < e->area_len)
    w.err = s->f->io->punch(s->f, e->area_offset + w.pos, e->area_len - w.pos);
  return w.err;
}

/* ---- epochs ---------------------------------------------------------------------------- */

/* Would a sync retire a region (durable in this epoch, not written during it)? */
static gboolean
retirable(CbtStore *s)
{
  for (guint64 w = 0; w < s->region_words; w++)
    if (s->durable[s->cur][w] & ~__atomic_load_n(&s->touched[s->cur][w], __ATOMIC_RELAXED))
      return TRUE;
  return FALSE;
}

/* Under `lock`: while degraded, every area is rewritten from memory; TRUE when that worked. */
static gboolean
repair(CbtStore *s)
{
  for (guint i = 0; i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    if (e->bm && !e->inconsistent && cbt_store_write_area(s, e) < 0)
      return FALSE;
  }
  return TRUE;
}

/* Under `lock`: write the next slot and switch to it. */
static int
switch_epoch(CbtStore *s, gboolean final, gboolean keep_all)
{
  guint cur = s->cur, next = cur ^ 1;
  g_autofree guint64 *carry = g_new0(guint64, s->region_words);

  for (guint64 w = 0; !final && w < s->region_words; w++)
    carry[w] =
      __atomic_load_n(&s->touched[cur][w], __ATOMIC_RELAXED) | (keep_all ? s->written[cur][w] : 0);
  int r = write_slot(s, next, s->epoch + 1, carry);
  if (r == 0)
    r = s->f->io->sync(s->f);
  if (r < 0)
    return r;
  memcpy(s->durable[next], carry, s->region_words * 8);
  memcpy(s->written[next], carry, s->region_words * 8);
  memset(s->touched[next], 0, s->region_words * 8);
  s->epoch++;
  __atomic_store_n(&s->cur, next, __ATOMIC_SEQ_CST);
  return 0;
}

int
cbt_store_sync_locked_out(CbtStore *s, gboolean final)
{
  pthread_mutex_lock(&s->sync_lock);
  pthread_mutex_lock(&s->lock);
  gboolean degraded = __atomic_load_n(&s->degraded, __ATOMIC_ACQUIRE);
  if (!final && !degraded && !__atomic_load_n(&s->fine_dirty, __ATOMIC_ACQUIRE) && !retirable(s)) {
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&s->sync_lock);
    return 0;
  }
  guint64 fails = s->fail_gen; /* a failure after this keeps the store degraded */
  gboolean repaired = degraded && repair(s) && s->fail_gen == fails;
  int r = switch_epoch(s, final && (!degraded || repaired), degraded && !repaired);
  __atomic_store_n(&s->fine_dirty, FALSE, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&s->lock);
  /* Every area write made before the switch is durable after this (invariant 3). */
  if (r == 0)
    r = s->f->io->sync(s->f);
  pthread_mutex_lock(&s->lock);
  if (r < 0) {
    __atomic_store_n(&s->fine_dirty, TRUE, __ATOMIC_RELEASE);
  } else if ((!degraded || repaired) && s->fail_gen == fails) {
    /* No area write failed since the switch began: the old epoch's marks are all in the
     * areas, durably (a failure would leave its region to the intents: invariant 4). */
    CbtStoreHeader old = s->hdr;
    s->hdr.synced_epoch = s->epoch - 1;
    s->hdr.flags &= ~(guint32)CBT_STORE_HDR_DEGRADED;
    r = cbt_store_write_header(s);
    if (r < 0)
      s->hdr = old;
    else
      __atomic_store_n(&s->degraded, FALSE, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&s->lock);
  pthread_mutex_unlock(&s->sync_lock);
  return r;
}

gboolean
cbt_store_sync(CbtStore *store, GError **error)
{
  int r = cbt_store_sync_locked_out(store, FALSE);

  if (r < 0)
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_IO, "Bitmap store '%s': cannot sync: %s",
                store->path, g_strerror(-r));
  return r == 0;
}

/* ---- the syncer ------------------------------------------------------------------------ */

static gpointer
syncer(gpointer data)
{
  CbtStore *s = data;

  cbt_memory_thread_begin();
  pthread_mutex_lock(&s->sync_lock);
  while (!s->stopping) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    guint64 ns = (guint64)ts.tv_nsec + (guint64)s->sync_interval_ms * 1000000;
    ts.tv_sec += (time_t)(ns / 1000000000);
    ts.tv_nsec = (long)(ns % 1000000000);
    pthread_cond_timedwait(&s->wake, &s->sync_lock, &ts);
    if (s->stopping)
      break;
    pthread_mutex_unlock(&s->sync_lock);
    int r = cbt_store_sync_locked_out(s, FALSE);
    if (r < 0)
      cbt_store_report(s, "cannot sync the store", -r);
    pthread_mutex_lock(&s->sync_lock);
  }
  pthread_mutex_unlock(&s->sync_lock);
  return NULL;
}

void
cbt_store_syncer_start(CbtStore *s)
{
  s->syncer = g_thread_new("cbt-store-sync", syncer, s);
}

void
cbt_store_syncer_stop(CbtStore *s)
{
  if (!s->syncer)
    return;
  pthread_mutex_lock(&s->sync_lock);
  s->stopping = TRUE;
  pthread_cond_broadcast(&s->wake);
  pthread_mutex_unlock(&s->sync_lock);
  g_thread_join(s->syncer);
  s->syncer = NULL;
}
