/* reopen.c — blockdev-reopen (QEMU 7.2, qapi/block-core.json): new options for existing nodes,
 * for the whole list or for none. cbtd reopens raw nodes, and of their options only `file` may
 * change: what fleecing needs (docs/user-guide.md, "Fleecing") to insert a copy-before-write
 * filter under a format node an export already uses, and to take it out again.
 *
 * Every entry is checked before anything changes; then every node of the list is drained, its
 * `file` edge swapped, and the permissions refreshed; a refusal (QEMU's permission conflict)
 * puts every old edge back before the drains end, so no request ever sees a half-swapped graph
 * (docs/architecture.md, "A block graph with named children").
 */
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

/* One entry of the list, checked: the node and the child it gets (both referenced). */
typedef struct {
  CbtBlockdev *bd;
  CbtBlockdev *new_file;
  CbtBlockdev *old_file;
} Swap;

static void
swap_free(gpointer p)
{
  Swap *s = p;

  g_clear_pointer(&s->bd, cbt_blockdev_unref);
  g_clear_pointer(&s->new_file, cbt_blockdev_unref);
  g_clear_pointer(&s->old_file, cbt_blockdev_unref);
  g_free(s);
}

static Swap *
swap_at(GPtrArray *swaps, guint i)
{
  return g_ptr_array_index(swaps, i);
}

static gboolean
same_driver(CbtQmpBlockdevDriver driver, CbtBlockdev *bd)
{
  return g_str_equal(cbt_qmp_blockdev_driver_to_string(driver), bd->drv->name);
}

static gboolean
refuse_change(CbtBlockdev *bd, const char *option, GError **error)
{
  g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
              "cbtd cannot change the option '%s' of node '%s' by blockdev-reopen", option,
              bd->node_name);
  return FALSE;
}

/* The common options: absent means the default, as QEMU resets what is not given. QEMU refuses
 * a change of force-share itself; the others it applies, and cbtd does not implement that. */
static gboolean
check_common(CbtBlockdev *bd, const CbtQmpBlockdevOptions *o, GError **error)
{
  const CbtQmpBlockdevCacheOptions *c = o->cache;
  gboolean unmap = o->has_discard && o->discard == CBT_QMP_BLOCKDEV_DISCARD_OPTIONS_UNMAP;

  if ((o->has_force_share && o->force_share) != bd->force_share) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot change the option 'force-share'");
    return FALSE;
  }
  if ((o->has_read_only && o->read_only) != bd->read_only)
    return refuse_change(bd, "read-only", error);
  if ((o->has_auto_read_only && o->auto_read_only) != bd->auto_read_only)
    return refuse_change(bd, "auto-read-only", error);
  if (unmap != bd->discard_unmap)
    return refuse_change(bd, "discard", error);
  if (o->detect_zeroes != bd->detect_zeroes)
    return refuse_change(bd, "detect-zeroes", error);
  if ((c && c->has_direct && c->direct) != bd->cache_direct)
    return refuse_change(bd, "cache.direct", error);
  if ((c && c->has_no_flush && c->no_flush) != bd->cache_no_flush)
    return refuse_change(bd, "cache.no-flush", error);
  return TRUE;
}

/* raw's window: 7.2 reads offset and size again (absent: 0 and the rest of the new child);
 * cbtd keeps the window and the node's size as they are. */
static gboolean
check_window(CbtBlockdev *bd, const CbtQmpBlockdevOptionsRaw *o, CbtBlockdev *file, GError **error)
{
  JsonObject *cur = bd->full_opts;
  guint64 offset = cbt_blockdev_raw_offset(bd);

  if (o->has_offset != json_object_has_member(cur, "offset") ||
      (o->has_offset && (guint64)o->offset != offset))
    return refuse_change(bd, "offset", error);
  if (o->has_size != json_object_has_member(cur, "size") ||
      (o->has_size && (guint64)o->size != bd->size))
    return refuse_change(bd, "size", error);
  if (cbt_blockdev_get_size(file) < offset + bd->size ||
      (!o->has_size && cbt_blockdev_get_size(file) - offset != bd->size))
    return refuse_change(bd, "size", error);
  return TRUE;
}

/* Is @bd @node or below it? */
static gboolean
reaches(CbtBlockdev *node, CbtBlockdev *bd)
{
  if (node == bd)
    return TRUE;
  for (guint i = 0; i < node->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(node->children, i);
    if (reaches(c->node, bd))
      return TRUE;
  }
  return FALSE;
}

/* The node that becomes @bd's `file`, QEMU's checks in its order. */
static CbtBlockdev *
new_file_child(CbtBlockdev *bd, const CbtQmpBlockdevRef *ref, GError **error)
{
  CbtBlockdev *old = bd->file->node, *file;

  if (ref->type == CBT_QMP_BLOCKDEV_REF_KIND_DEFINITION) {
    if (!same_driver(ref->u.definition->driver, old)) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot change the option 'file.driver'");
      return NULL;
    }
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd cannot reopen the child 'file' of node '%s' from an inline definition: "
                "give the name of a node",
                bd->node_name);
    return NULL;
  }
  file = cbt_blockdev_find(ref->u.reference);
  if (!file) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot find device='' nor node-name='%s'",
                ref->u.reference);
    return NULL;
  }
  if (reaches(file, bd)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Making '%s' a file child of '%s' would create a cycle", file->node_name,
                bd->node_name);
    return NULL;
  }
  return file;
}

static gboolean
check_entry(const CbtQmpBlockdevOptions *o, GPtrArray *swaps, GError **error)
{
  CbtBlockdev *bd, *file;

  if (!o->node_name) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "node-name not specified");
    return FALSE;
  }
  bd = cbt_blockdev_find(o->node_name);
  if (!bd) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to find node with node-name='%s'",
                o->node_name);
    return FALSE;
  }
  if (!same_driver(o->driver, bd)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot change the option 'driver'");
    return FALSE;
  }
  if (bd->drv != &cbt_blockdev_raw_driver) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd cannot reopen node '%s': blockdev-reopen supports raw nodes only, not '%s'",
                bd->node_name, bd->drv->name);
    return FALSE;
  }
  /* The filter of a backup job must stay under its node until the job ends (backup-filter.c). */
  if (bd->file && cbt_blockdev_cbw_is_backup(bd->file->node)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "cbtd cannot reopen node '%s' while a backup job's filter '%s' is under it",
                bd->node_name, bd->file->node->node_name);
    return FALSE;
  }
  for (guint i = 0; i < swaps->len; i++) {
    if (swap_at(swaps, i)->bd == bd) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                  "cbtd cannot reopen node '%s' twice in one blockdev-reopen", bd->node_name);
      return FALSE;
    }
  }
  if (!(file = new_file_child(bd, o->u.raw.file, error)) || !check_common(bd, o, error) ||
      !check_window(bd, &o->u.raw, file, error))
    return FALSE;
  /* A writer of @bd must find the new child writable, as it found the old one. */
  if ((bd->perm & CBT_PERM_WRITE) && !cbt_blockdev_check_writable(file, error))
    return FALSE;
  Swap *s = g_new0(Swap, 1);
  s->bd = cbt_blockdev_ref(bd);
  s->new_file = cbt_blockdev_ref(file);
  g_ptr_array_add(swaps, s);
  return TRUE;
}

/* Make @file @bd's `file` child (the node is drained), and keep its options and file name as
 * QEMU shows them. */
static void
set_file(CbtBlockdev *bd, CbtBlockdev *file)
{
  guint role = bd->file->role;

  cbt_blockdev_detach_child(bd->file);
  cbt_blockdev_attach_child(bd, file, "file", role);
  json_object_set_object_member(bd->full_opts, "file", json_object_ref(file->full_opts));
  cbt_blockdev_raw_file_changed(bd);
}

/* Swap every edge, then refresh: a conflict anywhere undoes all of them. */
static gboolean
swap_all(GPtrArray *swaps, GError **error)
{
  guint i;

  for (i = 0; i < swaps->len; i++) {
    Swap *s = swap_at(swaps, i);
    s->old_file = cbt_blockdev_ref(s->bd->file->node);
    set_file(s->bd, s->new_file);
  }
  for (i = 0; i < swaps->len; i++)
    if (!cbt_blockdev_refresh_perms(swap_at(swaps, i)->bd, error))
      break;
  if (i == swaps->len)
    return TRUE;
  for (i = swaps->len; i-- > 0;)
    set_file(swap_at(swaps, i)->bd, swap_at(swaps, i)->old_file);
  for (i = 0; i < swaps->len; i++)
    cbt_blockdev_refresh_perms(swap_at(swaps, i)->bd, NULL);
  return FALSE;
}

gboolean
cbt_qmp_blockdev_reopen(const CbtQmpBlockdevReopenArg *args, GError **error)
{
  g_autoptr(GPtrArray) swaps = g_ptr_array_new_with_free_func(swap_free);
  gboolean ok;

  CBT_ASSERT_MAIN_THREAD();
  /* 7.2 asserts on an empty list; refusing it is the only answer that keeps the daemon up. */
  if (!args->options || args->options->len == 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "blockdev-reopen needs the options of at least one node");
    return FALSE;
  }
  for (guint i = 0; i < args->options->len; i++) {
    if (!check_entry(g_ptr_array_index(args->options, i), swaps, error))
      return FALSE;
  }
  for (guint i = 0; i < swaps->len; i++)
    cbt_blockdev_drain_begin(swap_at(swaps, i)->bd);
  ok = swap_all(swaps, error);
  for (guint i = swaps->len; i-- > 0;)
    cbt_blockdev_drain_end(swap_at(swaps, i)->bd);
  return ok;
}

gboolean
cbt_blockdev_swap_file(CbtBlockdev *bd, CbtBlockdev *file, GError **error)
{
  g_autoptr(GPtrArray) swaps = g_ptr_array_new_with_free_func(swap_free);
  Swap *s = g_new0(Swap, 1);

  CBT_ASSERT_MAIN_THREAD();
  g_assert(bd->drv == &cbt_blockdev_raw_driver && bd->drains_own > 0);
  s->bd = cbt_blockdev_ref(bd);
  s->new_file = cbt_blockdev_ref(file);
  g_ptr_array_add(swaps, s);
  return swap_all(swaps, error);
}
