/* frozen.c — a named bitmap frozen for a backup job: QEMU's successor
 * (docs/user-guide.md, "Jobs and push-mode backup").
 *
 * While a job uses bitmap B, B is busy (every command but queries is refused with QEMU's "in use
 * by another operation" text) and a successor S, an anonymous bitmap of the same granularity,
 * records every write since the job's instant. The job ends in one of two ways:
 *   abdicate  B := S (plus, for bitmap-mode always after a failure, the clusters not copied):
 *             the bits the job copied are gone, every later write is kept
 *   reclaim   B := B | S: as if the job had never run
 *
 * Invariants:
 *  (1) No write is ever lost: S is tracked from the instant the job's selection is copied, in
 *      the same drained section, so S covers every write since that instant and B | S every
 *      write B would have seen. An in-memory B stops being marked meanwhile (QEMU's: its count
 *      stays the selection's) and is tracked again when the freeze ends, drained; a persistent
 *      B keeps being marked by its store, so a crash during the job leaves it a superset of
 *      every write (its count then includes the writes during the job).
 *  (2) Abdicate replaces B's bits with the node drained, so no write is marked half in the old
 *      bits and half in the new; a persistent B is rewritten in its store before the drain ends.
 *  (3) B holds one busy reference for the whole freeze, so it cannot be removed, cleared, merged
 *      into or frozen again, and its node (held while frozen) cannot be deleted.
 */
#include "dirty-bitmaps/dirty-bitmaps-private.h"

struct CbtDirtyBitmapsFrozen {
  CbtBlockdev *bd; /* referenced, and held while frozen (3) */
  CbtDirtyBitmap *dbm;
  CbtBitmap *successor;
  gboolean tracked;   /* the successor is marked by the node's writes */
  gboolean untracked; /* B (in memory) is not marked while frozen (1) */
  CbtBitmap *selection;
};

CbtDirtyBitmap *
cbt_dirty_bitmaps_get(CbtBlockdev *bd, const char *name)
{
  return cbt_dirty_bitmaps_find(bd, name);
}

CbtDirtyBitmapsFrozen *
cbt_dirty_bitmaps_freeze_for_job(CbtBlockdev *bd, CbtDirtyBitmap *dbm)
{
  CBT_ASSERT_MAIN_THREAD();
  CbtDirtyBitmapsFrozen *f = g_new0(CbtDirtyBitmapsFrozen, 1);
  CbtBitmap *bits = cbt_dirty_bitmap_get_bitmap(dbm);

  f->bd = cbt_blockdev_ref(bd);
  f->dbm = dbm;
  cbt_dirty_bitmap_busy_ref(dbm);
  cbt_blockdev_hold(bd);
  f->selection = cbt_bitmap_copy(bits);
  f->successor = cbt_bitmap_new(cbt_bitmap_get_size(bits), cbt_bitmap_get_granularity(bits));
  /* A disabled bitmap's successor records nothing either (QEMU's). */
  f->tracked = cbt_dirty_bitmap_is_recording(dbm);
  if (f->tracked)
    cbt_blockdev_track_bitmap(bd, f->successor);
  f->untracked = f->tracked && !cbt_dirty_bitmap_is_persistent(dbm);
  if (f->untracked)
    cbt_blockdev_untrack_bitmap(bd, bits);
  return f;
}

const CbtBitmap *
cbt_dirty_bitmaps_frozen_selection(CbtDirtyBitmapsFrozen *f)
{
  return f->selection;
}

static void
abdicate(CbtDirtyBitmapsFrozen *f, const CbtBitmap *also)
{
  CbtBitmap *bits = cbt_dirty_bitmap_get_bitmap(f->dbm);
  g_autoptr(GError) error = NULL;

  cbt_bitmap_clear_all(bits);
  cbt_bitmap_merge(bits, f->successor);
  if (also)
    cbt_bitmap_merge(bits, also);
  /* The bits from before the job are gone, as a clear drops them (docs/bitmaps.md). */
  cbt_dirty_bitmap_set_break(f->dbm, CBT_DIRTY_BITMAP_BROKEN_CLEARED);
  if (!cbt_dirty_bitmap_is_persistent(f->dbm))
    return;
  if (!cbt_dirty_bitmaps_persist_set_break(f->bd, f->dbm, &error) ||
      !cbt_dirty_bitmaps_persist_rewrite(f->bd, f->dbm, &error)) {
    /* The store keeps its superset; memory must not claim less than it. */
    g_warning("bitmap '%s' of node '%s': the backup's result cannot be stored: %s",
              cbt_dirty_bitmap_get_name(f->dbm), cbt_blockdev_get_node_name(f->bd), error->message);
    (void)cbt_dirty_bitmaps_persist_demote(f->bd, f->dbm, error);
  }
}

void
cbt_dirty_bitmaps_frozen_end(CbtDirtyBitmapsFrozen *f, gboolean clear_copied,
                             const CbtBitmap *not_copied)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!f)
    return;
  cbt_blockdev_drain_begin(f->bd);
  if (clear_copied)
    abdicate(f, not_copied);
  else
    cbt_bitmap_merge(cbt_dirty_bitmap_get_bitmap(f->dbm), f->successor);
  if (f->untracked)
    cbt_blockdev_track_bitmap(f->bd, cbt_dirty_bitmap_get_bitmap(f->dbm));
  if (f->tracked)
    cbt_blockdev_untrack_bitmap(f->bd, f->successor);
  cbt_blockdev_drain_end(f->bd);
  cbt_dirty_bitmap_busy_unref(f->dbm);
  cbt_blockdev_unhold(f->bd);
  cbt_bitmap_free(f->successor);
  cbt_bitmap_free(f->selection);
  cbt_blockdev_unref(f->bd);
  g_free(f);
}
