/* blockdev/dirty-bitmap-cmds.c — the block-dirty-bitmap-* commands and `transaction`.
 *
 * Every bitmap operation is an action with prepare / commit / abort, as in QEMU: a transaction
 * prepares its actions in order (each sees the earlier ones' effects), then commits them all, or
 * aborts the prepared ones newest first when one fails. A plain command is a transaction of one
 * action that needs no undo. prepare does all its checks before it changes anything, so a failing
 * prepare leaves nothing to undo. Every node an action touches is drained from its first use until
 * the transaction ends, so writes cannot slip between the actions.
 */
#include "blockdev/dirty-bitmap-cmds-private.h"

typedef struct {
  gboolean undoable; /* keep what abort needs (not for a single command) */
  GPtrArray *drained; /* CbtBlockdev *, each referenced and drained once */
} Txn;

typedef struct {
  const struct ActionOps *ops;
  CbtBlockdev *bd;
  CbtDirtyBitmap *dbm;
  CbtBitmap *backup; /* clear, merge: the bits before the action */
  gboolean was_recording;
} Action;

typedef struct ActionOps {
  const char *kind;
  gboolean (*prepare)(Action *a, JsonObject *data, Txn *txn, GError **error);
  void (*commit)(Action *a); /* optional */
  void (*abort)(Action *a);  /* optional */
} ActionOps;

static void
txn_drain(Txn *txn, CbtBlockdev *bd)
{
  if (g_ptr_array_find(txn->drained, bd, NULL))
    return;
  cbt_blockdev_drain_begin(bd);
  g_ptr_array_add(txn->drained, cbt_blockdev_ref(bd));
}

static void
txn_init(Txn *txn, gboolean undoable)
{
  txn->undoable = undoable;
  txn->drained = g_ptr_array_new();
}

static void
txn_end(Txn *txn)
{
  for (guint i = txn->drained->len; i-- > 0;) {
    CbtBlockdev *bd = g_ptr_array_index(txn->drained, i);
    cbt_blockdev_drain_end(bd);
    cbt_blockdev_unref(bd);
  }
  g_ptr_array_unref(txn->drained);
}

static gboolean
member_bool(JsonObject *o, const char *member, gboolean dflt)
{
  return json_object_has_member(o, member) ? json_object_get_boolean_member(o, member) : dflt;
}

/* The bitmap named by @data's node and name, with the state checks of @flags. */
static gboolean
lookup_checked(Action *a, JsonObject *data, CbtDirtyBitmapCheckFlags flags, GError **error)
{
  a->dbm = cbt_blockdev_bitmap_lookup(json_object_get_string_member(data, "node"),
                                      json_object_get_string_member(data, "name"), &a->bd, error);
  return a->dbm && cbt_dirty_bitmap_check(a->dbm, flags, error);
}

/* add ---------------------------------------------------------------------------------------- */

/* The checks of block-dirty-bitmap-add, in QEMU's order. */
static CbtBlockdev *
add_check(JsonObject *data, const char *name, guint32 *granularity, GError **error)
{
  const char *node = json_object_get_string_member(data, "node");

  if (!cbt_dirty_bitmap_check_name_present(name, error))
    return NULL;
  CbtBlockdev *bd = cbt_blockdev_find(node);
  if (!bd) {
    cbt_blockdev_bitmap_error(error, "Cannot find device='%s' nor node-name='%s'", node, node);
    return NULL;
  }
  *granularity = cbt_dirty_bitmap_default_granularity(0);
  if (json_object_has_member(data, "granularity")) {
    gint64 g = json_object_get_int_member(data, "granularity");
    if (!cbt_dirty_bitmap_check_granularity(g, error))
      return NULL;
    *granularity = g;
  }
  /* Only qcow2 stores bitmaps, and cbtd has no qcow2 (yet). */
  if (member_bool(data, "persistent", FALSE)) {
    cbt_blockdev_bitmap_error(error, "Can't store persistent bitmaps to %s: Operation not "
                              "supported", cbt_blockdev_get_node_name(bd));
    return NULL;
  }
  if (cbt_blockdev_bitmap_find(bd, name)) {
    cbt_blockdev_bitmap_error(error, "Bitmap already exists: %s", name);
    return NULL;
  }
  if (!cbt_dirty_bitmap_check_name_length(name, error))
    return NULL;
  return bd;
}

static gboolean
add_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  const char *name = json_object_get_string_member(data, "name");
  guint32 granularity;

  a->bd = add_check(data, name, &granularity, error);
  if (!a->bd)
    return FALSE;
  a->dbm = cbt_dirty_bitmap_new(name, cbt_blockdev_get_size(a->bd), granularity);
  if (member_bool(data, "disabled", FALSE))
    cbt_dirty_bitmap_set_recording(a->dbm, FALSE);
  txn_drain(txn, a->bd);
  cbt_blockdev_bitmap_attach(a->bd, a->dbm);
  return TRUE;
}

static void
add_abort(Action *a)
{
  cbt_blockdev_bitmap_detach(a->bd, a->dbm);
  cbt_dirty_bitmap_free(a->dbm);
}

/* remove: busy until commit, so later actions of the transaction cannot use it -------------- */

static gboolean
remove_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  if (!lookup_checked(a, data, CBT_DIRTY_BITMAP_CHECK_BUSY | CBT_DIRTY_BITMAP_CHECK_READ_ONLY,
                      error))
    return FALSE;
  txn_drain(txn, a->bd);
  cbt_dirty_bitmap_busy_ref(a->dbm);
  return TRUE;
}

static void
remove_commit(Action *a)
{
  cbt_dirty_bitmap_busy_unref(a->dbm);
  cbt_blockdev_bitmap_detach(a->bd, a->dbm);
  cbt_dirty_bitmap_free(a->dbm);
}

static void
remove_abort(Action *a)
{
  cbt_dirty_bitmap_busy_unref(a->dbm);
}

/* clear, and the undo shared with merge ------------------------------------------------------ */

static void
keep_backup(Action *a, Txn *txn)
{
  if (txn->undoable)
    a->backup = cbt_bitmap_copy(cbt_dirty_bitmap_get_bitmap(a->dbm));
}

/* Put the bits back in place (the node is still drained), so tracking is untouched. */
static void
restore_backup(Action *a)
{
  CbtBitmap *bits = cbt_dirty_bitmap_get_bitmap(a->dbm);

  cbt_bitmap_clear_all(bits);
  cbt_bitmap_merge(bits, a->backup);
}

static gboolean
clear_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  if (!lookup_checked(a, data, CBT_DIRTY_BITMAP_CHECK_ALL, error))
    return FALSE;
  txn_drain(txn, a->bd);
  keep_backup(a, txn);
  cbt_bitmap_clear_all(cbt_dirty_bitmap_get_bitmap(a->dbm));
  return TRUE;
}

/* enable, disable ---------------------------------------------------------------------------- */

static gboolean
set_recording_prepare(Action *a, JsonObject *data, Txn *txn, gboolean recording,
                      GError **error)
{
  if (!lookup_checked(a, data, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, error))
    return FALSE;
  txn_drain(txn, a->bd);
  a->was_recording = cbt_dirty_bitmap_is_recording(a->dbm);
  cbt_blockdev_bitmap_set_recording(a->bd, a->dbm, recording);
  return TRUE;
}

static gboolean
enable_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  return set_recording_prepare(a, data, txn, TRUE, error);
}

static gboolean
disable_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  return set_recording_prepare(a, data, txn, FALSE, error);
}

static void
set_recording_abort(Action *a)
{
  cbt_blockdev_bitmap_set_recording(a->bd, a->dbm, a->was_recording);
}

/* merge -------------------------------------------------------------------------------------- */

/* Source @node (a name on the target's node, or {node, name}), checked and drained. */
static CbtDirtyBitmap *
merge_source(Action *a, JsonNode *node, Txn *txn, GError **error)
{
  CbtBlockdev *bd = a->bd;
  CbtDirtyBitmap *src;

  if (JSON_NODE_HOLDS_VALUE(node)) {
    const char *name = json_node_get_string(node);
    src = cbt_blockdev_bitmap_find(bd, name);
    if (!src)
      cbt_blockdev_bitmap_error(error, "Dirty bitmap '%s' not found", name);
  } else {
    JsonObject *o = json_node_get_object(node);
    src = cbt_blockdev_bitmap_lookup(json_object_get_string_member(o, "node"),
                                     json_object_get_string_member(o, "name"), &bd, error);
  }
  if (!src || !cbt_dirty_bitmap_check(src, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, error))
    return NULL;
  if (cbt_dirty_bitmap_get_size(src) != cbt_dirty_bitmap_get_size(a->dbm)) {
    cbt_blockdev_bitmap_error(error, "Bitmaps are of different sizes (destination size is %"
                              G_GUINT64_FORMAT ", source size is %" G_GUINT64_FORMAT
                              ") and can't be merged", cbt_dirty_bitmap_get_size(a->dbm),
                              cbt_dirty_bitmap_get_size(src));
    return NULL;
  }
  txn_drain(txn, bd);
  return src;
}

static gboolean
merge_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  JsonArray *sources = json_object_get_array_member(data, "bitmaps");

  /* qsd 7.2 crashes here; an empty union would be a no-op that hides a caller's bug. */
  if (json_array_get_length(sources) == 0) {
    cbt_blockdev_bitmap_error(error, "Parameter 'bitmaps' must not be empty");
    return FALSE;
  }
  a->dbm = cbt_blockdev_bitmap_lookup(json_object_get_string_member(data, "node"),
                                      json_object_get_string_member(data, "target"), &a->bd,
                                      error);
  if (!a->dbm || !cbt_dirty_bitmap_check(a->dbm, CBT_DIRTY_BITMAP_CHECK_ALL, error))
    return FALSE;
  txn_drain(txn, a->bd);

  /* The union goes into scratch bits first: a failing source leaves the target untouched. */
  g_autoptr(CbtBitmap) scratch = cbt_bitmap_new(cbt_dirty_bitmap_get_size(a->dbm),
                                                cbt_dirty_bitmap_get_granularity(a->dbm));
  for (guint i = 0; i < json_array_get_length(sources); i++) {
    CbtDirtyBitmap *src = merge_source(a, json_array_get_element(sources, i), txn, error);
    if (!src)
      return FALSE;
    cbt_bitmap_merge(scratch, cbt_dirty_bitmap_get_bitmap(src));
  }
  keep_backup(a, txn);
  cbt_bitmap_merge(cbt_dirty_bitmap_get_bitmap(a->dbm), scratch);
  return TRUE;
}

/* abort -------------------------------------------------------------------------------------- */

static gboolean
abort_prepare(Action *a, JsonObject *data, Txn *txn, GError **error)
{
  cbt_blockdev_bitmap_error(error, "Transaction aborted using Abort action");
  return FALSE;
}

static const ActionOps action_ops[] = {
  { "abort", abort_prepare, NULL, NULL },
  { "block-dirty-bitmap-add", add_prepare, NULL, add_abort },
  { "block-dirty-bitmap-remove", remove_prepare, remove_commit, remove_abort },
  { "block-dirty-bitmap-clear", clear_prepare, NULL, restore_backup },
  { "block-dirty-bitmap-enable", enable_prepare, NULL, set_recording_abort },
  { "block-dirty-bitmap-disable", disable_prepare, NULL, set_recording_abort },
  { "block-dirty-bitmap-merge", merge_prepare, NULL, restore_backup },
};

static const ActionOps *
find_ops(const char *kind)
{
  for (gsize i = 0; i < G_N_ELEMENTS(action_ops); i++)
    if (g_str_equal(action_ops[i].kind, kind))
      return &action_ops[i];
  g_return_val_if_reached(NULL); /* the schema admits only these kinds */
}

static void
action_clear(Action *a)
{
  g_clear_pointer(&a->backup, cbt_bitmap_free);
}

/* transaction -------------------------------------------------------------------------------- */

/* Prepare every action in order; on failure abort the prepared ones, newest first. */
static gboolean
txn_run(Txn *txn, JsonArray *actions, gboolean grouped, GError **error)
{
  guint n = json_array_get_length(actions);
  g_autofree Action *done = g_new0(Action, MAX(n, 1));
  guint prepared = 0;
  gboolean ok = TRUE;

  for (; ok && prepared < n; prepared++) {
    JsonObject *act = json_array_get_object_element(actions, prepared);
    Action *a = &done[prepared];

    a->ops = find_ops(json_object_get_string_member(act, "type"));
    if (grouped && a->ops->prepare != abort_prepare) {
      cbt_blockdev_bitmap_error(error, "Action '%s' does not support Transaction property "
                                "completion-mode = grouped", a->ops->kind);
      ok = FALSE;
    } else {
      ok = a->ops->prepare(a, json_object_get_object_member(act, "data"), txn, error);
    }
  }
  if (!ok)
    prepared--; /* the failed one changed nothing */
  for (guint i = 0; i < prepared; i++) {
    Action *a = &done[ok ? i : prepared - 1 - i];
    if (ok && a->ops->commit)
      a->ops->commit(a);
    else if (!ok && a->ops->abort)
      a->ops->abort(a);
  }
  for (guint i = 0; i < n; i++)
    action_clear(&done[i]);
  return ok;
}

static JsonNode *
cmd_transaction(JsonObject *args, gpointer user_data, GError **error)
{
  JsonObject *props = json_object_has_member(args, "properties")
                        ? json_object_get_object_member(args, "properties") : NULL;
  gboolean grouped = props && json_object_has_member(props, "completion-mode") &&
                     g_str_equal(json_object_get_string_member(props, "completion-mode"),
                                 "grouped");
  Txn txn;

  txn_init(&txn, TRUE);
  gboolean ok = txn_run(&txn, json_object_get_array_member(args, "actions"), grouped, error);
  txn_end(&txn);
  return ok ? cbt_rpc_empty_return() : NULL;
}

/* The plain commands: one action, nothing to undo. */
static JsonNode *
run_single(const char *kind, JsonObject *args, GError **error)
{
  const ActionOps *ops = find_ops(kind);
  Action a = { .ops = ops };
  Txn txn;

  txn_init(&txn, FALSE);
  gboolean ok = ops->prepare(&a, args, &txn, error);
  if (ok && ops->commit)
    ops->commit(&a);
  action_clear(&a);
  txn_end(&txn);
  return ok ? cbt_rpc_empty_return() : NULL;
}

#define SINGLE_COMMAND(fn, kind)                                            \
  static JsonNode *fn(JsonObject *args, gpointer user_data, GError **error) \
  {                                                                         \
    return run_single(kind, args, error);                                   \
  }
SINGLE_COMMAND(cmd_add, "block-dirty-bitmap-add")
SINGLE_COMMAND(cmd_remove, "block-dirty-bitmap-remove")
SINGLE_COMMAND(cmd_clear, "block-dirty-bitmap-clear")
SINGLE_COMMAND(cmd_enable, "block-dirty-bitmap-enable")
SINGLE_COMMAND(cmd_disable, "block-dirty-bitmap-disable")
SINGLE_COMMAND(cmd_merge, "block-dirty-bitmap-merge")

/* No state check: the checksum works on busy and inconsistent bitmaps too. */
static JsonNode *
cmd_sha256(JsonObject *args, gpointer user_data, GError **error)
{
  CbtDirtyBitmap *dbm = cbt_blockdev_bitmap_lookup(json_object_get_string_member(args, "node"),
                                                   json_object_get_string_member(args, "name"),
                                                   NULL, error);
  if (!dbm)
    return NULL;
  g_autofree char *hex = cbt_bitmap_sha256(cbt_dirty_bitmap_get_bitmap(dbm));
  JsonObject *ret = json_object_new();
  json_object_set_string_member(ret, "sha256", hex);
  JsonNode *node = json_node_new(JSON_NODE_OBJECT);
  json_node_take_object(node, ret);
  return node;
}

static const CbtRpcCommand bitmap_commands[] = {
  { "block-dirty-bitmap-add", cmd_add },
  { "block-dirty-bitmap-remove", cmd_remove },
  { "block-dirty-bitmap-clear", cmd_clear },
  { "block-dirty-bitmap-enable", cmd_enable },
  { "block-dirty-bitmap-disable", cmd_disable },
  { "block-dirty-bitmap-merge", cmd_merge },
  { "x-debug-block-dirty-bitmap-sha256", cmd_sha256 },
  { "transaction", cmd_transaction },
};

void
cbt_blockdev_register_bitmap_commands(CbtRpc *rpc)
{
  cbt_rpc_register(rpc, bitmap_commands, G_N_ELEMENTS(bitmap_commands), NULL);
  cbt_blockdev_bitmap_install_hooks();
}
