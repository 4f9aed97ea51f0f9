/* tools/backup/map.c — which extents a point must copy, from NBD_CMD_BLOCK_STATUS.
 *
 * A full copies every extent base:allocation does not report as reading zeroes (NBD_STATE_ZERO):
 * a hole stays a hole in the point. An incremental copies the extents its dirty bitmap marks;
 * of those, the ones that now read as zeroes become zero pieces, written as zeroes over the
 * older point (without them the older data would show through).
 */
#include "backup.h"

#include <string.h>

#define NBD_STATE_DIRTY 1u /* qemu:dirty-bitmap: (the NBD spec's metadata-contexts document) */
#define NBD_STATE_ZERO 2u  /* base:allocation */
#define STATUS_STEP (1ull << 30)
#define MAX_ZERO_PIECE (1ull << 30)

typedef struct {
  guint64 offset, length;
  gboolean hit;
} Segment;

typedef struct {
  const char *context;
  guint32 mask;
  gboolean invert;
  guint64 pos, end;
  GArray *out;
} Walk;

static void
append(GArray *out, guint64 offset, guint64 length, gboolean hit)
{
  if (out->len) {
    Segment *last = &g_array_index(out, Segment, out->len - 1);
    if (last->hit == hit && last->offset + last->length == offset) {
      last->length += length;
      return;
    }
  }
  Segment s = { offset, length, hit };
  g_array_append_val(out, s);
}

static int
extent_cb(void *opaque, const char *context, uint64_t offset, uint32_t *entries, size_t n,
          int *error)
{
  Walk *w = opaque;

  if (strcmp(context, w->context) != 0 || offset != w->pos)
    return 0;
  for (size_t i = 0; i + 1 < n && offset < w->end; i += 2) {
    guint64 len = MIN((guint64)entries[i], w->end - offset);
    gboolean hit = (entries[i + 1] & w->mask) != 0;
    append(w->out, offset, len, w->invert ? !hit : hit);
    offset += len;
  }
  w->pos = offset;
  return 0;
}

/* Segments covering [from, to) of @context, each saying whether (flags & mask) (or not). */
static gboolean
walk(struct nbd_handle *h, const char *context, guint32 mask, gboolean invert, guint64 from,
     guint64 to, GArray *out, GError **error)
{
  Walk w = { context, mask, invert, from, to, out };

  while (w.pos < to) {
    guint64 before = w.pos;
    if (!cbt_backup_check_interrupt(error))
      return FALSE;
    if (nbd_block_status(h, MIN(to - w.pos, STATUS_STEP), w.pos,
                         (nbd_extent_callback){ .callback = extent_cb, .user_data = &w },
                         0) == -1) {
      cbt_backup_nbd_error(error, "NBD_CMD_BLOCK_STATUS");
      return FALSE;
    }
    if (w.pos == before) {
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                  "the server sent no extent of '%s' at %" G_GUINT64_FORMAT, context, before);
      return FALSE;
    }
  }
  return TRUE;
}

static void
add_pieces(GArray *pieces, guint64 offset, guint64 length, CbtBackupKind kind, guint64 max)
{
  while (length) {
    guint64 n = MIN(length, max);
    CbtBackupPiece p = { .offset = offset, .length = n, .kind = kind };
    g_array_append_val(pieces, p);
    offset += n;
    length -= n;
  }
}

/* Append [from, to) of @kind to @runs (starts never decrease), merging with the last run. Where
 * a data run and a zero run would share a cluster the data run wins: reading the cluster from
 * the view is right whatever it holds. */
static void
add_run(GArray *runs, guint64 from, guint64 to, CbtBackupKind kind)
{
  if (from >= to)
    return;
  if (runs->len) {
    CbtBackupPiece *last = &g_array_index(runs, CbtBackupPiece, runs->len - 1);
    guint64 end = last->offset + last->length;
    if (from < end && kind != last->kind)
      kind = last->kind = CBT_BACKUP_DATA;
    if (from <= end && kind == last->kind) {
      last->length = MAX(end, to) - last->offset;
      return;
    }
  }
  CbtBackupPiece p = { .offset = from, .length = to - from, .kind = kind };
  g_array_append_val(runs, p);
}

/* @raw (disjoint, in order) in whole clusters of @cluster bytes (the last one ends at @size):
 * data grows out to the clusters it touches, zeroes shrink to the clusters they cover and
 * their edges become data. Then cut into pieces. */
static GArray *
in_clusters(GArray *raw, guint64 size, guint64 cluster, guint64 max_piece)
{
  g_autoptr(GArray) runs = g_array_new(FALSE, FALSE, sizeof(CbtBackupPiece));
  GArray *pieces = g_array_new(FALSE, FALSE, sizeof(CbtBackupPiece));

  for (guint i = 0; i < raw->len; i++) {
    const CbtBackupPiece *p = &g_array_index(raw, CbtBackupPiece, i);
    guint64 a = p->offset, b = p->offset + p->length;
    guint64 down_a = a / cluster * cluster, up_a = MIN((a + cluster - 1) / cluster * cluster, size);
    guint64 down_b = b == size ? size : b / cluster * cluster;
    guint64 up_b = MIN((b + cluster - 1) / cluster * cluster, size);
    if (p->kind == CBT_BACKUP_DATA || up_a >= down_b) {
      add_run(runs, down_a, up_b, CBT_BACKUP_DATA);
      continue;
    }
    add_run(runs, down_a, up_a, CBT_BACKUP_DATA);
    add_run(runs, up_a, down_b, CBT_BACKUP_ZERO);
    add_run(runs, down_b, up_b, CBT_BACKUP_DATA);
  }
  for (guint i = 0; i < runs->len; i++) {
    const CbtBackupPiece *r = &g_array_index(runs, CbtBackupPiece, i);
    add_pieces(pieces, r->offset, r->length, r->kind,
               r->kind == CBT_BACKUP_DATA ? max_piece : MAX_ZERO_PIECE);
  }
  return pieces;
}

/* The segments of @context over the whole export: hit where (flags & mask) (or not). */
static GArray *
walk_all(struct nbd_handle *h, const char *context, guint32 mask, gboolean invert, GError **error)
{
  g_autoptr(GArray) segs = g_array_new(FALSE, FALSE, sizeof(Segment));
  int64_t size = nbd_get_size(h);

  if (size < 0) {
    cbt_backup_nbd_error(error, "export size");
    return NULL;
  }
  return walk(h, context, mask, invert, 0, size, segs, error) ? g_steal_pointer(&segs) : NULL;
}

static GArray *raw_map(struct nbd_handle *h, const char *dirty_context, GError **error);

GArray *
cbt_backup_map(struct nbd_handle *h, const char *dirty_context, guint64 max_piece, GError **error)
{
  g_autoptr(GArray) raw = raw_map(h, dirty_context, error);
  int64_t size = nbd_get_size(h);

  return raw ? in_clusters(raw, (guint64)size, cbt_backup_qcow2_cluster(), max_piece) : NULL;
}

/* The extents as block status gives them, not yet in clusters nor cut. */
static GArray *
raw_map(struct nbd_handle *h, const char *dirty_context, GError **error)
{
  g_autoptr(GArray) pieces = g_array_new(FALSE, FALSE, sizeof(CbtBackupPiece));
  g_autoptr(GArray) top = NULL;

  if (!dirty_context) {
    if (!(top = walk_all(h, "base:allocation", NBD_STATE_ZERO, TRUE, error)))
      return NULL;
    for (guint i = 0; i < top->len; i++) {
      const Segment *s = &g_array_index(top, Segment, i);
      if (s->hit)
        add_pieces(pieces, s->offset, s->length, CBT_BACKUP_DATA, G_MAXUINT64);
    }
    return g_steal_pointer(&pieces);
  }
  if (!(top = walk_all(h, dirty_context, NBD_STATE_DIRTY, FALSE, error)))
    return NULL;
  for (guint i = 0; i < top->len; i++) {
    const Segment *s = &g_array_index(top, Segment, i);
    if (!s->hit)
      continue;
    g_autoptr(GArray) alloc = g_array_new(FALSE, FALSE, sizeof(Segment));
    if (!walk(h, "base:allocation", NBD_STATE_ZERO, FALSE, s->offset, s->offset + s->length, alloc,
              error))
      return NULL;
    for (guint j = 0; j < alloc->len; j++) {
      const Segment *a = &g_array_index(alloc, Segment, j);
      if (a->hit)
        add_pieces(pieces, a->offset, a->length, CBT_BACKUP_ZERO, G_MAXUINT64);
      else
        add_pieces(pieces, a->offset, a->length, CBT_BACKUP_DATA, G_MAXUINT64);
    }
  }
  return g_steal_pointer(&pieces);
}

guint64
cbt_backup_map_bytes(GArray *pieces)
{
  guint64 n = 0;
  for (guint i = 0; i < pieces->len; i++)
    n += g_array_index(pieces, CbtBackupPiece, i).length;
  return n;
}

GArray *
cbt_backup_map_clean(struct nbd_handle *h, const char *dirty_context, guint64 max_piece,
                     guint64 *dirty_bytes, GError **error)
{
  g_autoptr(GArray) pieces = g_array_new(FALSE, FALSE, sizeof(CbtBackupPiece));
  g_autoptr(GArray) segs = walk_all(h, dirty_context, NBD_STATE_DIRTY, TRUE, error);

  if (!segs)
    return NULL;
  *dirty_bytes = 0;
  for (guint i = 0; i < segs->len; i++) {
    const Segment *s = &g_array_index(segs, Segment, i);
    if (s->hit)
      add_pieces(pieces, s->offset, s->length, CBT_BACKUP_DATA, max_piece);
    else
      *dirty_bytes += s->length;
  }
  return g_steal_pointer(&pieces);
}
