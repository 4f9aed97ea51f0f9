/* nbd/status.c — extents for NBD_CMD_BLOCK_STATUS, one context at a time.
 *
 * Extents start at the request's offset and merge neighbours with equal status. The answer
 * covers the request, and its last extent runs on past the request's end while the status stays
 * the same, up to CBT_NBD_STATUS_OVERSHOOT further (docs/nbd-server.md, "Block status": free
 * knowledge saves the client a round trip; REQ_ONE answers are always clipped). Never past the
 * end of the export,
 * never more than CBT_NBD_MAX_EXTENTS descriptors, and never longer than CBT_NBD_MAX_STATUS_LEN
 * in total, rounded so the next query starts 4 KiB-aligned (an answer cut at 0xFFFFFFFF would
 * send the client's next query to an odd offset).
 * Called between cbt_blockdev_io_begin/_end, so bitmaps cannot be cleared meanwhile.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>

#define CBT_NBD_STATUS_OVERSHOOT (128u << 20)

typedef struct {
  guint64 req_end; /* end of the request (clipped to the export) */
  guint64 limit;   /* where the answer must stop */
  gboolean req_one;
  GArray *out;
} Answer;

/* Append [.., +len) with @flags, merged into the last extent when equal. FALSE when the answer
 * is complete: cap reached, REQ_ONE's first run ended, or past the request with a new status. */
static gboolean
add_extent(Answer *a, guint64 pos, guint64 len, guint32 flags)
{
  if (a->out->len > 0) {
    CbtNbdExtent *last = &g_array_index(a->out, CbtNbdExtent, a->out->len - 1);
    if (last->flags == flags) {
      last->len += len;
      return TRUE;
    }
    if (a->req_one || pos >= a->req_end || a->out->len >= CBT_NBD_MAX_EXTENTS)
      return FALSE;
  }
  CbtNbdExtent e = { .len = (guint32)len, .flags = flags };
  g_array_append_val(a->out, e);
  return TRUE;
}

typedef struct {
  Answer *a;
  guint64 pos; /* answered up to here */
} AllocationWalk;

static gboolean
add_allocation_run(guint64 offset, guint64 len, guint32 status, gpointer user_data)
{
  AllocationWalk *w = user_data;

  if (!add_extent(w->a, offset, len, status & (NBD_STATE_HOLE | NBD_STATE_ZERO)))
    return FALSE;
  w->pos = offset + len;
  return TRUE;
}

/* One walk over the node's runs (a file maps many extents per call). */
static int
base_allocation(CbtNbdExport *exp, guint64 pos, Answer *a)
{
  AllocationWalk w = { .a = a, .pos = pos };
  int r;

  if (pos >= a->limit)
    return 0;
  r = cbt_blockdev_block_status_walk(exp->bd, pos, a->limit - pos, add_allocation_run, &w);
  return r < 0 && w.pos < a->req_end ? r : 0; /* beyond the request it was only a bonus */
}

typedef struct {
  Answer *a;
  guint64 pos; /* answered up to here */
  gboolean done;
} BitmapWalk;

/* One dirty run, after the clean gap before it. */
static gboolean
add_dirty_run(guint64 offset, guint64 len, gpointer user_data)
{
  BitmapWalk *w = user_data;

  if (offset > w->pos && !add_extent(w->a, w->pos, offset - w->pos, 0))
    return !(w->done = TRUE);
  if (!add_extent(w->a, offset, len, NBD_STATE_DIRTY))
    return !(w->done = TRUE);
  w->pos = offset + len;
  return TRUE;
}

/* One pass over the dirty runs; past a bitmap shorter than the export everything is clean. */
static void
dirty_bitmap(CbtBitmap *bm, guint64 pos, Answer *a)
{
  guint64 bm_end = MIN(a->limit, cbt_bitmap_get_size(bm));
  BitmapWalk w = { .a = a, .pos = pos };

  if (pos < bm_end)
    cbt_bitmap_foreach_dirty_run(bm, pos, bm_end - pos, add_dirty_run, &w);
  if (!w.done && w.pos < a->limit)
    add_extent(a, w.pos, a->limit - w.pos, 0);
}

int
cbt_nbd_status_extents(CbtNbdExport *exp, const CbtNbdMetaSel *sel, guint64 offset, guint64 len,
                       gboolean req_one, GArray *out)
{
  /* Aligned so that offset + cap is a multiple of 4096. */
  guint64 cap = offset + CBT_NBD_MAX_STATUS_LEN - (offset & 4095);
  Answer a = { .req_end = MIN(MIN(offset + len, exp->size), cap), .req_one = req_one, .out = out };

  g_return_val_if_fail(g_array_get_element_size(out) == sizeof(CbtNbdExtent), -EINVAL);
  a.limit = req_one ? a.req_end : MIN(MIN(a.req_end + CBT_NBD_STATUS_OVERSHOOT, exp->size), cap);
  switch (sel->kind) {
  case CBT_NBD_META_BASE_ALLOCATION:
    return base_allocation(exp, offset, &a);
  case CBT_NBD_META_ALLOCATION_DEPTH:
    /* A flat node supplies all of its data itself: depth 1 ("local") everywhere, as qsd
     * reports for a raw image over a file. */
    add_extent(&a, offset, a.limit - offset, 1);
    return 0;
  case CBT_NBD_META_DIRTY_BITMAP:
    dirty_bitmap(((CbtNbdExportBitmap *)g_ptr_array_index(exp->bitmaps, sel->bitmap))->bm, offset,
                 &a);
    return 0;
  case CBT_NBD_META_IDENTITY: /* listed only, never selected (meta.c) */
    break;
  }
  return -EINVAL;
}
