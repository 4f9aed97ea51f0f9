/* resize.c — block_resize (QEMU 7.2's qmp_block_resize and bdrv_co_truncate): the permission a
 * resize holds while it runs, the checks in QEMU's order, and RESIZED for every node whose size
 * changed, so that dirty bitmaps follow.
 *
 * Invariants:
 *  (1) A node's size changes only inside cbt_qmp_block_resize(), with the protocol node at the
 *      bottom of the resized chain drained, which drains every node above it: no request is in
 *      flight on any node whose size or bitmaps change, so the I/O path reads bd->size plainly.
 *  (2) RESIZED runs for a node after its size changed and before the drain ends, child before
 *      parent, so a bitmap never sees a write against the size it is not sized for.
 *  (3) The resize holds CBT_PERM_RESIZE on the node (and, through child_perm, on the nodes it
 *      resizes) for its whole run: a holder that does not share resize (an export, a raw window)
 *      makes it fail before anything changed.
 */
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

/* QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT (1 GiB). */
#define MAX_LENGTH (G_MAXINT64 & ~((G_GINT64_CONSTANT(1) << 30) - 1))

void
cbt_blockdev_resized(CbtBlockdev *bd, guint64 old_size)
{
  cbt_blockdev_notify(bd, CBT_BLOCKDEV_EVENT_RESIZED, &old_size);
  for (guint i = 0; i < bd->parents->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->parents, i);
    CbtBlockdev *p = c->parent;
    guint64 before = p->size;
    if (!p->drv->child_resized)
      continue;
    p->drv->child_resized(p, c);
    if (p->size != before)
      cbt_blockdev_resized(p, before);
  }
}

gboolean
cbt_blockdev_truncate(CbtBlockdev *bd, guint64 size, GError **error)
{
  guint64 old = bd->size;

  if (size > (guint64)MAX_LENGTH) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "offset(%" G_GUINT64_FORMAT ") exceeds maximum(%" G_GINT64_FORMAT ")", size,
                (gint64)MAX_LENGTH);
    return FALSE;
  }
  if (bd->read_only) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Image is read-only");
    return FALSE;
  }
  if (!bd->drv->truncate) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Image format driver does not support resize");
    return FALSE;
  }
  if (!bd->drv->truncate(bd, size, error))
    return FALSE;
  /* A format's size follows its child's RESIZED (child_resized); a protocol node's is its own. */
  if (bd->children->len == 0 && bd->size != old)
    cbt_blockdev_resized(bd, old);
  return TRUE;
}

/* QEMU's bdrv_lookup_bs(): a device name first (cbtd has none), then the node name. */
static CbtBlockdev *
lookup(const char *device, const char *node_name, GError **error)
{
  CbtBlockdev *bd = node_name ? cbt_blockdev_find(node_name) : NULL;

  if (!bd)
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot find device='%s' nor node-name='%s'",
                device ? device : "", node_name ? node_name : "");
  return bd;
}

static CbtBlockdev *
bottom_of(CbtBlockdev *bd)
{
  CbtBlockdev *child;

  while ((child = cbt_blockdev_primary_child(bd)))
    bd = child;
  return bd;
}

gboolean
cbt_qmp_block_resize(const CbtQmpBlockResizeArg *args, GError **error)
{
  CbtBlockdev *bd = lookup(args->device, args->node_name, error);

  if (!bd)
    return FALSE;
  if (args->size < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Parameter 'size' expects a >0 size");
    return FALSE;
  }
  bd->resizers++;
  gboolean ok = cbt_blockdev_refresh_perms(bd, error);
  if (ok) {
    CbtBlockdev *bottom = bottom_of(bd);
    cbt_blockdev_drain_begin(bottom);
    ok = cbt_blockdev_truncate(bd, (guint64)args->size, error);
    cbt_blockdev_drain_end(bottom);
  }
  bd->resizers--;
  cbt_blockdev_refresh_perms(bd, NULL);
  return ok;
}
