/* null.c — `null-co` (and `null-aio`): reads return zeroes, writes are dropped, each after
 * `latency-ns` when given (a slow device for tests). The size is rounded up to 512 bytes, as
 * QEMU reports it.
 */
#include <string.h>
#include "blockdev/blockdev-internal.h"

typedef struct {
  gboolean read_zeroes;
  guint64 latency_ns; /* every read, write and flush takes this long (tests: a slow device) */
} NullState;

static void
delay(CbtBlockdev *bd)
{
  const NullState *s = bd->opaque;

  if (s->latency_ns)
    g_usleep(s->latency_ns / 1000);
}

static int
null_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  delay(bd);
  memset(buf, 0, len);
  return 0;
}

static int
null_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  delay(bd);
  return 0;
}

static int
null_flush(CbtBlockdev *bd)
{
  delay(bd);
  return 0;
}

static int
null_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return 0;
}

/* QEMU's null driver has no zero-write of its own: it writes zeroes, latency included. */
static int
null_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  delay(bd);
  return 0;
}

static int
null_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  /* As QEMU: allocated data, known to read as zeroes only with read-zeroes. */
  *pnum = len;
  *status = ((const NullState *)bd->opaque)->read_zeroes ? CBT_BLOCKDEV_STATUS_ZERO : 0;
  return 0;
}

/* null-co and null-aio share one branch type. */
static gboolean
null_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  const CbtQmpBlockdevOptionsNull *o =
    opts->driver == CBT_QMP_BLOCKDEV_DRIVER_NULL_AIO ? &opts->u.null_aio : &opts->u.null_co;
  /* qemu-storage-daemon 7.2 aborts on a negative size; we answer as its option parser does
   * for other sizes. */
  if (o->size < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Parameter 'size' expects a non-negative number below 2^64");
    return FALSE;
  }
  if (o->has_size)
    json_object_set_int_member(bd->full_opts, "size", o->size);
  if (o->has_latency_ns && o->latency_ns > G_MAXINT64) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "latency-ns is invalid");
    return FALSE;
  }
  if (o->has_read_zeroes)
    json_object_set_boolean_member(bd->full_opts, "read-zeroes", o->read_zeroes);
  bd->size = ((guint64)o->size + 511) / 512 * 512;
  /* Without size or read-zeroes QEMU names the node after its driver. */
  if (!o->has_size && !o->has_read_zeroes)
    bd->exact_filename = g_strdup_printf("%s://", bd->drv->name);
  NullState *st = g_new0(NullState, 1);
  st->read_zeroes = o->read_zeroes;
  st->latency_ns = o->has_latency_ns ? (guint64)o->latency_ns : 0;
  bd->opaque = st;
  return TRUE;
}

static void
null_close(CbtBlockdev *bd)
{
  g_clear_pointer(&bd->opaque, g_free);
}

/* null-co and null-aio behave the same here (QEMU's differ only in how they complete). */
#define NULL_DRIVER(drv_name)                                                                      \
  {                                                                                                \
    .name = drv_name, .protocol = TRUE, .open = null_open,                                         \
    .close = null_close, /* nothing is kept, so every request is as durable as it can be */        \
      .supported_flags = CBT_BLOCKDEV_FUA | CBT_BLOCKDEV_MAY_UNMAP | CBT_BLOCKDEV_NO_FALLBACK,     \
    .pread = null_pread, .pwrite = null_pwrite, .flush = null_flush, .discard = null_discard,      \
    .write_zeroes = null_write_zeroes, .block_status = null_block_status,                          \
  }

const CbtBlockdevDriver cbt_blockdev_null_driver = NULL_DRIVER("null-co");
const CbtBlockdevDriver cbt_blockdev_null_aio_driver = NULL_DRIVER("null-aio");
