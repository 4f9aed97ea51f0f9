/* raw.c — the `raw` format: the bytes of its child, optionally a window [offset, offset + size)
 * of them. Every request is passed down through the child's entry points, so the child's own
 * bitmaps see it too.
 */
#include <errno.h>
#include "blockdev/blockdev-internal.h"

typedef struct {
  guint64 offset;
  gboolean windowed; /* offset or size given: others may not resize the child */
  gboolean has_size; /* a fixed size: block_resize is refused, and it never follows the child */
} RawState;

static guint64
base(CbtBlockdev *bd)
{
  return ((RawState *)bd->opaque)->offset;
}

guint64
cbt_blockdev_raw_offset(CbtBlockdev *bd)
{
  return base(bd);
}

static CbtBlockdev *
child(CbtBlockdev *bd)
{
  return bd->file->node;
}

/* QEMU's raw driver raises read_aio and write_aio on its child before passing a read or a
 * data write down (a blkdebug child waits for them); zero-writes and discards raise nothing. */
static int
raw_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  cbt_blockdev_debug_event(child(bd), CBT_QMP_BLKDEBUG_EVENT_READ_AIO);
  return cbt_blockdev_pread(child(bd), buf, base(bd) + offset, len);
}

static int
raw_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  cbt_blockdev_debug_event(child(bd), CBT_QMP_BLKDEBUG_EVENT_WRITE_AIO);
  return cbt_blockdev_pwrite(child(bd), buf, base(bd) + offset, len, flags);
}

static int
raw_flush(CbtBlockdev *bd)
{
  return cbt_blockdev_flush(child(bd));
}

static int
raw_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return cbt_blockdev_discard(child(bd), base(bd) + offset, len, 0);
}

static int
raw_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  return cbt_blockdev_write_zeroes(child(bd), base(bd) + offset, len, flags);
}

static int
raw_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  return cbt_blockdev_block_status(child(bd), base(bd) + offset, len, pnum, status);
}

typedef struct {
  CbtBlockdevStatusFunc fn;
  gpointer user_data;
  guint64 base;
} RawWalk;

/* A run of the child, at the raw node's offset. */
static gboolean
raw_walk_run(guint64 offset, guint64 len, guint32 status, gpointer user_data)
{
  RawWalk *w = user_data;

  return w->fn(offset - w->base, len, status, w->user_data);
}

static int
raw_block_status_walk(CbtBlockdev *bd, guint64 offset, guint64 len, CbtBlockdevStatusFunc fn,
                      gpointer user_data)
{
  RawWalk w = { .fn = fn, .user_data = user_data, .base = base(bd) };

  /* The child's walk stays inside the range it is given: never past the window. */
  len = MIN(len, bd->size - offset);
  return cbt_blockdev_block_status_walk(child(bd), w.base + offset, len, raw_walk_run, &w);
}

static int
raw_get_data_fd(CbtBlockdev *bd, guint64 *fd_offset)
{
  guint64 child_offset;
  int fd = cbt_blockdev_get_data_fd(child(bd), &child_offset);

  if (fd >= 0)
    *fd_offset = child_offset + base(bd);
  return fd;
}

/* QEMU reads offset and size through its option parser, which refuses negative numbers. */
static gboolean
get_uint(gint64 v, const char *member, guint64 *out, GError **error)
{
  if (v < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Parameter '%s' expects a non-negative number below 2^64", member);
    return FALSE;
  }
  *out = (guint64)v;
  return TRUE;
}

static gboolean
window(CbtBlockdev *bd, const CbtQmpBlockdevOptionsRaw *o, RawState *s, GError **error)
{
  guint64 csize = cbt_blockdev_get_size(child(bd)), size = 0;

  if ((o->has_offset && !get_uint(o->offset, "offset", &s->offset, error)) ||
      (o->has_size && !get_uint(o->size, "size", &size, error)))
    return FALSE;
  if (s->offset > csize) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Offset (%" G_GUINT64_FORMAT ") cannot be greater "
                "than size of the containing file (%" G_GUINT64_FORMAT ")",
                s->offset, csize);
    return FALSE;
  }
  if (o->has_size && size > csize - s->offset) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "The sum of offset (%" G_GUINT64_FORMAT ") and "
                "size (%" G_GUINT64_FORMAT ") has to be smaller or equal to the  actual size of "
                "the containing file (%" G_GUINT64_FORMAT ")",
                s->offset, size, csize);
    return FALSE;
  }
  if (size % 512) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Specified size is not multiple of 512");
    return FALSE;
  }
  bd->size = o->has_size ? size : csize - s->offset;
  s->windowed = o->has_offset || o->has_size;
  s->has_size = o->has_size;
  if (o->has_offset)
    json_object_set_int_member(bd->full_opts, "offset", (gint64)s->offset);
  if (o->has_size)
    json_object_set_int_member(bd->full_opts, "size", (gint64)size);
  return TRUE;
}

/* QEMU's raw_co_truncate: the child is resized to hold @size bytes past the window's start. */
static gboolean
raw_truncate(CbtBlockdev *bd, guint64 size, GError **error)
{
  RawState *s = bd->opaque;

  if (s->has_size) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot resize fixed-size raw disks");
    return FALSE;
  }
  if ((guint64)G_MAXINT64 - size < s->offset) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Disk size too large for the added offset");
    return FALSE;
  }
  return cbt_blockdev_truncate(child(bd), size + s->offset, error);
}

/* Without a fixed size the node is the rest of its child past the offset (QEMU's
 * raw_getlength), so it follows the child's size. */
static void
raw_child_resized(CbtBlockdev *bd, CbtBlockdevChild *c)
{
  RawState *s = bd->opaque;
  guint64 csize = cbt_blockdev_get_size(c->node);

  if (s && !s->has_size && c == bd->file)
    bd->size = csize > s->offset ? csize - s->offset : 0;
}

/* A window fixes where the data is in the child: nobody else may resize it (QEMU's raw). */
static void
raw_child_perm(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
               guint64 *ret_perm, guint64 *ret_shared)
{
  RawState *s = bd->opaque;

  *ret_perm = perm;
  *ret_shared = s && s->windowed ? shared & ~CBT_PERM_RESIZE : shared;
}

/* QEMU borrows the file name of a protocol child when no option of ours changes the data;
 * over any other child the node is named by its options (json:{...}). */
static void
borrow_filename(CbtBlockdev *bd, const RawState *s)
{
  CbtBlockdev *file = child(bd);

  g_clear_pointer(&bd->exact_filename, g_free);
  if (!s->windowed && file->drv->protocol && file->exact_filename)
    bd->exact_filename = g_strdup(file->exact_filename);
}

void
cbt_blockdev_raw_file_changed(CbtBlockdev *bd)
{
  borrow_filename(bd, bd->opaque);
}

static gboolean
raw_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  g_autofree RawState *s = g_new0(RawState, 1);

  if (!window(bd, &opts->u.raw, s, error))
    return FALSE;
  borrow_filename(bd, s);
  bd->opaque = g_steal_pointer(&s);
  return TRUE;
}

static void
raw_close(CbtBlockdev *bd)
{
  g_free(bd->opaque);
  bd->opaque = NULL;
}

static const CbtBlockdevChildSpec raw_children[] = {
  { "file", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY },
  { NULL, 0 },
};

const CbtBlockdevDriver cbt_blockdev_raw_driver = {
  .name = "raw",
  .children = raw_children,
  .supported_flags = CBT_BLOCKDEV_FUA | CBT_BLOCKDEV_MAY_UNMAP | CBT_BLOCKDEV_NO_FALLBACK,
  .open = raw_open,
  .close = raw_close,
  .child_perm = raw_child_perm,
  .pread = raw_pread,
  .pwrite = raw_pwrite,
  .flush = raw_flush,
  .discard = raw_discard,
  .write_zeroes = raw_write_zeroes,
  .block_status = raw_block_status,
  .block_status_walk = raw_block_status_walk,
  .get_data_fd = raw_get_data_fd,
  .truncate = raw_truncate,
  .child_resized = raw_child_resized,
};
