/* dirty-bitmaps/cmds.c — the block-dirty-bitmap-* commands and their transaction actions.
 *
 * Every bitmap operation is a prepare function, as in QEMU: it does all its checks before it
 * changes anything (a failing prepare leaves nothing to undo), makes the change, drains every
 * node it touches until the transaction ends, and records its commit, abort and clean
 * (common/txn.h). A `transaction` runs the prepares of its actions in order
 * (blockdev/transaction.c); a plain command runs one in a transaction that needs no undo.
 *
 * A persistent bitmap's change is made durable in its prepare (persist.c), so a store that
 * fails fails the command with memory put back as it was; an abort undoes it in the store too.
 * An undo the store refuses leaves the safe side: the bitmap leaves the store and goes on in
 * memory (persist.c, demote), never a stored bitmap with fewer bits than it should have.
 */
#include "blockdev/transaction.h"
#include "dirty-bitmaps/dirty-bitmaps-private.h"
#include "schemas/qmp-commands.h"

typedef struct {
  CbtBlockdev *bd;
  CbtDirtyBitmap *dbm;
  CbtBitmap *backup; /* clear, merge: the bits before the action (only when it may abort) */
  gboolean was_recording;
  CbtDirtyBitmapBreak was_broken; /* clear, disable: the break before the action */
} Action;

static Action *
action_new(CbtBlockdev *bd, CbtDirtyBitmap *dbm)
{
  Action *a = g_new0(Action, 1);

  a->bd = bd;
  a->dbm = dbm;
  return a;
}

static void
action_free(gpointer opaque)
{
  Action *a = opaque;

  g_clear_pointer(&a->backup, cbt_bitmap_free);
  g_free(a);
}

/* The bitmap named by @node and @name, with the state checks of @flags; the node drained. */
static CbtDirtyBitmap *
lookup_checked(const char *node, const char *name, CbtDirtyBitmapCheckFlags flags,
               CbtBlockdev **pbd, CbtTxn *txn, GError **error)
{
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_lookup(node, name, pbd, error);

  if (!dbm || !cbt_dirty_bitmap_check(dbm, flags, error))
    return NULL;
  cbt_blockdev_drain_in_txn(*pbd, txn);
  return dbm;
}

/* add ---------------------------------------------------------------------------------------- */

/* The checks of block-dirty-bitmap-add, in QEMU's order. */
static CbtBlockdev *
add_check(const CbtQmpBlockDirtyBitmapAdd *args, guint32 *granularity, GError **error)
{
  if (!cbt_dirty_bitmap_check_name_present(args->name, error))
    return NULL;
  CbtBlockdev *bd = cbt_blockdev_find(args->node);
  if (!bd) {
    cbt_dirty_bitmaps_error(error, "Cannot find device='%s' nor node-name='%s'", args->node,
                            args->node);
    return NULL;
  }
  *granularity = cbt_dirty_bitmap_default_granularity(0);
  if (args->has_granularity) {
    if (!cbt_dirty_bitmap_check_granularity(args->granularity, error))
      return NULL;
    *granularity = args->granularity;
  }
  /* QEMU stores bitmaps in qcow2 only; cbtd in a store beside file, host_device and raw nodes
   * (persist.c), and refuses the others with QEMU's text. */
  if (args->persistent && !cbt_dirty_bitmaps_persist_check(bd, error))
    return NULL;
  if (cbt_dirty_bitmaps_find(bd, args->name)) {
    cbt_dirty_bitmaps_error(error, "Bitmap already exists: %s", args->name);
    return NULL;
  }
  if (!cbt_dirty_bitmap_check_name_length(args->name, error))
    return NULL;
  return bd;
}

static void
add_abort(gpointer opaque)
{
  Action *a = opaque;
  g_autoptr(GError) error = NULL;

  /* The store borrows the bits: a bitmap it cannot let go of stays, whole and recording. */
  if (cbt_dirty_bitmap_is_persistent(a->dbm) &&
      !cbt_dirty_bitmaps_persist_remove(a->bd, a->dbm, &error)) {
    g_critical("node %s: the transaction's new bitmap %s stays: %s",
               cbt_blockdev_get_node_name(a->bd), cbt_dirty_bitmap_get_name(a->dbm),
               error->message);
    return;
  }
  cbt_dirty_bitmaps_detach(a->bd, a->dbm);
  cbt_dirty_bitmap_free(a->dbm);
}

static const CbtTxnActionOps add_ops = { "block-dirty-bitmap-add", NULL, add_abort, action_free };

static gboolean
add_prepare(const CbtQmpBlockDirtyBitmapAdd *args, CbtTxn *txn, GError **error)
{
  guint32 granularity;
  CbtBlockdev *bd = add_check(args, &granularity, error);

  if (!bd)
    return FALSE;
  CbtDirtyBitmap *dbm = cbt_dirty_bitmap_new(args->name, cbt_blockdev_get_size(bd), granularity);
  if (args->disabled) {
    cbt_dirty_bitmap_set_recording(dbm, FALSE);
    cbt_dirty_bitmap_set_break(dbm, CBT_DIRTY_BITMAP_BROKEN_CREATED_DISABLED);
  }
  cbt_dirty_bitmap_set_persistent(dbm, args->persistent);
  cbt_blockdev_drain_in_txn(bd, txn);
  cbt_dirty_bitmaps_attach(bd, dbm);
  if (args->persistent && !cbt_dirty_bitmaps_persist_add(bd, dbm, error)) {
    cbt_dirty_bitmaps_detach(bd, dbm);
    cbt_dirty_bitmap_free(dbm);
    return FALSE;
  }
  cbt_txn_add(txn, &add_ops, action_new(bd, dbm));
  return TRUE;
}

/* remove: busy until commit, so later actions of the transaction cannot use it -------------- */

static void
remove_commit(gpointer opaque)
{
  Action *a = opaque;

  cbt_dirty_bitmap_busy_unref(a->dbm);
  cbt_dirty_bitmaps_detach(a->bd, a->dbm);
  cbt_dirty_bitmap_free(a->dbm);
}

/* The removal from the store was durable: put the bitmap back, or (an inconsistent one, whose
 * bits are gone, or a store that refuses) keep it in memory only. */
static void
remove_abort(gpointer opaque)
{
  Action *a = opaque;
  g_autoptr(GError) error = NULL;

  cbt_dirty_bitmap_busy_unref(a->dbm);
  if (!cbt_dirty_bitmap_is_persistent(a->dbm))
    return;
  if (cbt_dirty_bitmap_is_inconsistent(a->dbm)) {
    cbt_dirty_bitmaps_persist_untie(a->bd, a->dbm);
    return;
  }
  if (!cbt_dirty_bitmaps_persist_add(a->bd, a->dbm, &error)) {
    g_warning("node %s: bitmap %s is no longer persistent: %s", cbt_blockdev_get_node_name(a->bd),
              cbt_dirty_bitmap_get_name(a->dbm), error->message);
    cbt_dirty_bitmaps_persist_untie(a->bd, a->dbm);
  }
}

static const CbtTxnActionOps remove_ops = { "block-dirty-bitmap-remove", remove_commit,
                                            remove_abort, action_free };

static gboolean
remove_prepare(const CbtQmpBlockDirtyBitmap *args, CbtTxn *txn, GError **error)
{
  CbtBlockdev *bd;
  CbtDirtyBitmap *dbm =
    lookup_checked(args->node, args->name,
                   CBT_DIRTY_BITMAP_CHECK_BUSY | CBT_DIRTY_BITMAP_CHECK_READ_ONLY, &bd, txn, error);

  if (!dbm)
    return FALSE;
  /* Durable now: a removal the store has not made could bring a stale bitmap back. */
  if (cbt_dirty_bitmap_is_persistent(dbm) && !cbt_dirty_bitmaps_persist_remove(bd, dbm, error))
    return FALSE;
  cbt_dirty_bitmap_busy_ref(dbm);
  cbt_txn_add(txn, &remove_ops, action_new(bd, dbm));
  return TRUE;
}

/* identity: clear and disable break a bitmap's record of changes for good (docs/bitmaps.md,
 * "Identity"). The break is durable before the bits or the state change, so that no crash
 * leaves a cleared or stopped bitmap that claims an unbroken record; an abort undoes it. */

static gboolean
set_break(CbtBlockdev *bd, CbtDirtyBitmap *dbm, CbtDirtyBitmapBreak why, GError **error)
{
  cbt_dirty_bitmap_set_break(dbm, why);
  return !cbt_dirty_bitmap_is_persistent(dbm) ||
         cbt_dirty_bitmaps_persist_set_break(bd, dbm, error);
}

static void
undo_break(Action *a)
{
  g_autoptr(GError) error = NULL;

  CbtDirtyBitmapBreak now = cbt_dirty_bitmap_get_break(a->dbm);

  if (now == a->was_broken)
    return;
  cbt_dirty_bitmap_set_identity(a->dbm, cbt_dirty_bitmap_get_uuid(a->dbm),
                                cbt_dirty_bitmap_get_created(a->dbm), a->was_broken);
  /* A store that cannot take the undo keeps the break, with its reason: broken is the safe
   * side, and memory must not claim what the store would not keep. */
  if (cbt_dirty_bitmap_is_persistent(a->dbm) &&
      !cbt_dirty_bitmaps_persist_set_break(a->bd, a->dbm, &error))
    cbt_dirty_bitmap_set_break(a->dbm, now);
}

/* clear, and the undo shared with merge ------------------------------------------------------ */

static void
put_back(CbtBitmap *bits, const CbtBitmap *backup)
{
  cbt_bitmap_clear_all(bits);
  cbt_bitmap_merge(bits, backup);
}

/* Put the bits back in place (the node is still drained), so tracking is untouched; a
 * persistent bitmap's store gets them too. */
static void
restore_backup(gpointer opaque)
{
  Action *a = opaque;
  g_autoptr(GError) error = NULL;

  put_back(cbt_dirty_bitmap_get_bitmap(a->dbm), a->backup);
  if (cbt_dirty_bitmap_is_persistent(a->dbm) &&
      !cbt_dirty_bitmaps_persist_rewrite(a->bd, a->dbm, &error))
    (void)cbt_dirty_bitmaps_persist_demote(a->bd, a->dbm, error);
  else
    undo_break(a);
}

static const CbtTxnActionOps clear_ops = { "block-dirty-bitmap-clear", NULL, restore_backup,
                                           action_free };
static const CbtTxnActionOps merge_ops = { "block-dirty-bitmap-merge", NULL, restore_backup,
                                           action_free };

/* Clear @dbm (@from NULL) or merge @from into it, durably for a persistent bitmap, and record
 * the action, keeping the old bits when it may be undone or the store may refuse. */
static gboolean
change_bits(const CbtTxnActionOps *ops, CbtBlockdev *bd, CbtDirtyBitmap *dbm, const CbtBitmap *from,
            CbtTxn *txn, GError **error)
{
  CbtBitmap *bits = cbt_dirty_bitmap_get_bitmap(dbm);
  gboolean persistent = cbt_dirty_bitmap_is_persistent(dbm);
  g_autoptr(CbtBitmap) backup = NULL;
  CbtDirtyBitmapBreak was_broken = cbt_dirty_bitmap_get_break(dbm);

  if (!from && !set_break(bd, dbm, CBT_DIRTY_BITMAP_BROKEN_CLEARED, error))
    return FALSE;
  if (cbt_txn_may_abort(txn) || persistent)
    backup = cbt_bitmap_copy(bits);
  if (from)
    cbt_bitmap_merge(bits, from);
  else
    cbt_bitmap_clear_all(bits);
  g_autoptr(GError) local = NULL;
  if (persistent && !cbt_dirty_bitmaps_persist_rewrite(bd, dbm, &local)) {
    put_back(bits, backup);
    /* The store has flagged its copy inconsistent and stopped marking it. */
    gboolean usable = cbt_dirty_bitmaps_persist_demote(bd, dbm, local);
    cbt_dirty_bitmaps_error(error, "%s; the bitmap is unchanged and %s", local->message,
                            usable ? "no longer persistent" : "now inconsistent");
    return FALSE;
  }
  Action *a = action_new(bd, dbm);
  a->was_broken = was_broken;
  if (cbt_txn_may_abort(txn))
    a->backup = g_steal_pointer(&backup);
  cbt_txn_add(txn, ops, a);
  return TRUE;
}

static gboolean
clear_prepare(const CbtQmpBlockDirtyBitmap *args, CbtTxn *txn, GError **error)
{
  CbtBlockdev *bd;
  CbtDirtyBitmap *dbm =
    lookup_checked(args->node, args->name, CBT_DIRTY_BITMAP_CHECK_ALL, &bd, txn, error);

  return dbm && change_bits(&clear_ops, bd, dbm, NULL, txn, error);
}

/* enable, disable ---------------------------------------------------------------------------- */

static gboolean
set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording, GError **error)
{
  if (cbt_dirty_bitmap_is_persistent(dbm))
    return cbt_dirty_bitmaps_persist_set_recording(bd, dbm, recording, error);
  cbt_dirty_bitmaps_set_recording(bd, dbm, recording);
  return TRUE;
}

static void
set_recording_abort(gpointer opaque)
{
  Action *a = opaque;
  g_autoptr(GError) error = NULL;

  if (!set_recording(a->bd, a->dbm, a->was_recording, &error))
    (void)cbt_dirty_bitmaps_persist_demote(a->bd, a->dbm, error);
  else
    undo_break(a);
}

static const CbtTxnActionOps set_recording_ops = { "block-dirty-bitmap-enable/disable", NULL,
                                                   set_recording_abort, action_free };

static gboolean
set_recording_prepare(const CbtQmpBlockDirtyBitmap *args, gboolean recording, CbtTxn *txn,
                      GError **error)
{
  CbtBlockdev *bd;
  CbtDirtyBitmap *dbm =
    lookup_checked(args->node, args->name, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, &bd, txn, error);

  if (!dbm)
    return FALSE;
  gboolean was_recording = cbt_dirty_bitmap_is_recording(dbm);
  CbtDirtyBitmapBreak was_broken = cbt_dirty_bitmap_get_break(dbm);
  if (!recording && was_recording && !set_break(bd, dbm, CBT_DIRTY_BITMAP_BROKEN_DISABLED, error))
    return FALSE;
  if (!set_recording(bd, dbm, recording, error))
    return FALSE;
  Action *a = action_new(bd, dbm);
  a->was_recording = was_recording;
  a->was_broken = was_broken;
  cbt_txn_add(txn, &set_recording_ops, a);
  return TRUE;
}

/* merge -------------------------------------------------------------------------------------- */

/* Source @src (a name on the target's node @bd, or {node, name}), checked and drained. */
static CbtDirtyBitmap *
merge_source(CbtBlockdev *bd, CbtDirtyBitmap *target, const CbtQmpBlockDirtyBitmapOrStr *src,
             CbtTxn *txn, GError **error)
{
  CbtDirtyBitmap *dbm;

  if (src->type == CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_LOCAL) {
    dbm = cbt_dirty_bitmaps_find(bd, src->u.local);
    if (!dbm)
      cbt_dirty_bitmaps_error(error, "Dirty bitmap '%s' not found", src->u.local);
  } else {
    dbm = cbt_dirty_bitmaps_lookup(src->u.external->node, src->u.external->name, &bd, error);
  }
  if (!dbm || !cbt_dirty_bitmap_check(dbm, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, error))
    return NULL;
  if (cbt_dirty_bitmap_get_size(dbm) != cbt_dirty_bitmap_get_size(target)) {
    cbt_dirty_bitmaps_error(error,
                            "Bitmaps are of different sizes (destination size is %" G_GUINT64_FORMAT
                            ", source size is %" G_GUINT64_FORMAT ") and can't be merged",
                            cbt_dirty_bitmap_get_size(target), cbt_dirty_bitmap_get_size(dbm));
    return NULL;
  }
  cbt_blockdev_drain_in_txn(bd, txn);
  return dbm;
}

static gboolean
merge_prepare(const CbtQmpBlockDirtyBitmapMerge *args, CbtTxn *txn, GError **error)
{
  CbtBlockdev *bd;
  GPtrArray *sources = args->bitmaps;

  /* qemu-storage-daemon 7.2 crashes here; an empty union would be a no-op that hides a
   * caller's bug. */
  if (sources->len == 0) {
    cbt_dirty_bitmaps_error(error, "Parameter 'bitmaps' must not be empty");
    return FALSE;
  }
  CbtDirtyBitmap *target =
    lookup_checked(args->node, args->target, CBT_DIRTY_BITMAP_CHECK_ALL, &bd, txn, error);
  if (!target)
    return FALSE;

  /* The union goes into scratch bits first: a failing source leaves the target untouched. */
  g_autoptr(CbtBitmap) scratch =
    cbt_bitmap_new(cbt_dirty_bitmap_get_size(target), cbt_dirty_bitmap_get_granularity(target));
  for (guint i = 0; i < sources->len; i++) {
    CbtDirtyBitmap *src = merge_source(bd, target, g_ptr_array_index(sources, i), txn, error);
    if (!src)
      return FALSE;
    cbt_bitmap_merge(scratch, cbt_dirty_bitmap_get_bitmap(src));
  }
  return change_bits(&merge_ops, bd, target, scratch, txn, error);
}

/* the transaction actions and the plain commands --------------------------------------------- */

static gboolean
txn_prepare(const CbtQmpTransactionAction *act, CbtTxn *txn, GError **error)
{
  switch (act->type) {
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_ADD:
    return add_prepare(act->u.block_dirty_bitmap_add.data, txn, error);
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_REMOVE:
    return remove_prepare(act->u.block_dirty_bitmap_remove.data, txn, error);
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_CLEAR:
    return clear_prepare(act->u.block_dirty_bitmap_clear.data, txn, error);
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_ENABLE:
    return set_recording_prepare(act->u.block_dirty_bitmap_enable.data, TRUE, txn, error);
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_DISABLE:
    return set_recording_prepare(act->u.block_dirty_bitmap_disable.data, FALSE, txn, error);
  case CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_MERGE:
    return merge_prepare(act->u.block_dirty_bitmap_merge.data, txn, error);
  default:
    g_return_val_if_reached(FALSE);
  }
}

void
cbt_dirty_bitmaps_cmds_init(void)
{
  static const CbtQmpTransactionActionKind kinds[] = {
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_ADD,
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_REMOVE,
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_CLEAR,
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_ENABLE,
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_DISABLE,
    CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_MERGE,
  };

  for (gsize i = 0; i < G_N_ELEMENTS(kinds); i++)
    cbt_blockdev_txn_register(kinds[i], txn_prepare);
}

/* The plain commands: one action each, in a transaction that keeps no undo. */

gboolean
cbt_qmp_block_dirty_bitmap_add(const CbtQmpBlockDirtyBitmapAdd *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, add_prepare(args, txn, error));
}

gboolean
cbt_dirty_bitmaps_checkpoint(CbtBlockdev *node, const char *name, guint32 granularity,
                             gboolean persistent, GError **error)
{
  const CbtQmpBlockDirtyBitmapAdd add = {
    .node = (char *)cbt_blockdev_get_node_name(node),
    .name = (char *)name,
    .has_granularity = granularity != 0,
    .granularity = granularity,
    .has_persistent = TRUE,
    .persistent = persistent,
  };

  return cbt_qmp_block_dirty_bitmap_add(&add, error);
}

gboolean
cbt_qmp_block_dirty_bitmap_remove(const CbtQmpBlockDirtyBitmap *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, remove_prepare(args, txn, error));
}

gboolean
cbt_qmp_block_dirty_bitmap_clear(const CbtQmpBlockDirtyBitmap *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, clear_prepare(args, txn, error));
}

gboolean
cbt_qmp_block_dirty_bitmap_enable(const CbtQmpBlockDirtyBitmap *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, set_recording_prepare(args, TRUE, txn, error));
}

gboolean
cbt_qmp_block_dirty_bitmap_disable(const CbtQmpBlockDirtyBitmap *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, set_recording_prepare(args, FALSE, txn, error));
}

gboolean
cbt_qmp_block_dirty_bitmap_merge(const CbtQmpBlockDirtyBitmapMerge *args, GError **error)
{
  CbtTxn *txn = cbt_txn_new(FALSE);

  return cbt_txn_finish(txn, merge_prepare(args, txn, error));
}

/* No state check: the checksum works on busy and inconsistent bitmaps too. */
CbtQmpBlockDirtyBitmapSha256 *
cbt_qmp_x_debug_block_dirty_bitmap_sha256(const CbtQmpBlockDirtyBitmap *args, GError **error)
{
  CbtDirtyBitmap *dbm = cbt_dirty_bitmaps_lookup(args->node, args->name, NULL, error);

  if (!dbm)
    return NULL;
  CbtQmpBlockDirtyBitmapSha256 *ret = g_new0(CbtQmpBlockDirtyBitmapSha256, 1);
  ret->sha256 = cbt_bitmap_sha256(cbt_dirty_bitmap_get_bitmap(dbm));
  return ret;
}

void
cbt_dirty_bitmaps_init(void)
{
  CBT_ASSERT_MAIN_THREAD();
  cbt_dirty_bitmaps_table_init();
  cbt_dirty_bitmaps_cmds_init();
  cbt_dirty_bitmaps_persist_init();
}
