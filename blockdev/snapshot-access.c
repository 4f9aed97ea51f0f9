/* snapshot-access.c — QEMU's `snapshot-access`, the reader's half of fleecing
 * (docs/architecture.md, "The four seams"): the point-in-time view that the copy-before-write
 * node `file` keeps, through the graph's snapshot entry points. Reads, block status and (with
 * discard=unmap) discards of the view; writes fail with ENOTSUP, as QEMU's.
 *
 * As in qemu-storage-daemon 7.2, `file` may be any node at open; the snapshot entry points of
 * a node that keeps no view fail every read with ENOTSUP.
 */
#include <errno.h>
#include "blockdev/blockdev-internal.h"

static CbtBlockdev *
view(CbtBlockdev *bd)
{
  return bd->file->node;
}

static int
sa_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  return cbt_blockdev_snapshot_pread(view(bd), buf, offset, len);
}

static int
sa_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  return -ENOTSUP;
}

static int
sa_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  return -ENOTSUP;
}

static int
sa_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return cbt_blockdev_snapshot_discard(view(bd), offset, len);
}

/* Nothing is ever written through this node. */
static int
sa_flush(CbtBlockdev *bd)
{
  return 0;
}

static int
sa_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  return cbt_blockdev_snapshot_block_status(view(bd), offset, len, pnum, status);
}

static gboolean
sa_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  bd->size = view(bd)->size;
  /* QEMU names it after its child. */
  bd->exact_filename = cbt_blockdev_filename(view(bd));
  bd->opaque = bd; /* non-NULL: the node is open */
  return TRUE;
}

static void
sa_close(CbtBlockdev *bd)
{
  bd->opaque = NULL;
}

/* The view is the child's to keep consistent: nothing is needed of it, everything shared. */
static void
sa_child_perm(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
              guint64 *ret_perm, guint64 *ret_shared)
{
  *ret_perm = 0;
  *ret_shared = CBT_PERM_ALL;
}

static const CbtBlockdevChildSpec sa_children[] = {
  { "file", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY },
  { NULL, 0 },
};

const CbtBlockdevDriver cbt_blockdev_snapshot_access_driver = {
  .name = "snapshot-access",
  .no_image_info = TRUE,
  .children = sa_children,
  .open = sa_open,
  .close = sa_close,
  .child_perm = sa_child_perm,
  .pread = sa_pread,
  .pwrite = sa_pwrite,
  .flush = sa_flush,
  .discard = sa_discard,
  .write_zeroes = sa_write_zeroes,
  .block_status = sa_block_status,
  /* No get_data_fd: the view's bytes do not live in one file, so no zero-copy read. */
};
