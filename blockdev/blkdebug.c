/* blkdebug.c — QEMU's error-injection filter over its `image` child: requests pass through
 * unless a rule fails them, so tests can provoke a failure in the middle of a job, a copy or a
 * store write (docs/user-guide.md, "Error injection").
 *
 * Rules follow QEMU 7.2's blkdebug. An event (BlkdebugEvent: where cbtd raises each is in the
 * schema's doc) runs the rules of that event whose state matches the node's: the inject-error
 * ones among them become the armed set (replacing the previous set), and the first matching
 * set-state rule picks the next state. A request then fails with the errno of the first armed
 * rule of its kind that covers its sector; a `once` rule is deleted after it failed one.
 * Requests are cut and padded as QEMU's block layer does it for this node (align, max-transfer,
 * the zero-write and discard limits), so the rules see the pieces QEMU's driver would see.
 *
 * Invariants:
 *  (1) rules, the armed set and the state change under `lock` only, and it is never held
 *      across I/O: a rule check or an event takes it for the look-up and lets go.
 *  (2) every rule is in the list of its event; the armed set borrows rules from those lists,
 *      and a `once` rule that fired leaves both in the same hold of `lock`, so it fails exactly
 *      one request.
 *  (3) a write or zero-write padded to `align` holds `rmw` exclusively from the read of the
 *      blocks it covers in part to the write of them; every other write holds it shared, so no
 *      write lands in a padded block between its read and its write.
 */
#include <errno.h>
#include <string.h>
#include "blockdev/blockdev-internal.h"

#define ANY_OFFSET G_MAXUINT64

typedef struct {
  gboolean inject; /* inject-error, else set-state */
  gint64 state;    /* 0: any */
  int err;
  gboolean once;
  guint64 offset; /* ANY_OFFSET: any */
  guint iotypes;  /* 1 << CbtQmpBlkdebugIOType */
  gint64 new_state;
} Rule;

typedef struct {
  guint64 align; /* request alignment, at least 1 */
  guint64 max_transfer, opt_write_zero, max_write_zero, opt_discard, max_discard; /* 0: none */
  guint64 take, unshare;                                                          /* perms */
  GMutex lock;
  gint64 state;
  GPtrArray *rules[CBT_QMP_BLKDEBUG_EVENT__MAX]; /* Rule * (owned), in the order given */
  GPtrArray *armed;                              /* Rule * (borrowed) */
  GRWLock rmw;
} BlkdebugState;

static BlkdebugState *
state(CbtBlockdev *bd)
{
  return bd->opaque;
}

static CbtBlockdev *
image(CbtBlockdev *bd)
{
  return bd->file->node;
}

/* ---- rules ------------------------------------------------------------------------------ */

static void
blkdebug_debug_event(CbtBlockdev *bd, CbtQmpBlkdebugEvent event)
{
  BlkdebugState *s = state(bd);
  GPtrArray *rules = s->rules[event];
  gboolean rearmed = FALSE, moved = FALSE;

  if (!rules)
    return;
  g_mutex_lock(&s->lock);
  gint64 next = s->state;
  for (guint i = 0; i < rules->len; i++) {
    Rule *r = g_ptr_array_index(rules, i);
    if (r->state && r->state != s->state)
      continue;
    if (r->inject) {
      if (!rearmed)
        g_ptr_array_set_size(s->armed, 0);
      rearmed = TRUE;
      g_ptr_array_add(s->armed, r);
    } else if (!moved) {
      next = r->new_state;
      moved = TRUE;
    }
  }
  s->state = next;
  g_mutex_unlock(&s->lock);
}

static gboolean
covers(const Rule *r, guint64 offset, guint64 len)
{
  return r->offset == ANY_OFFSET || (len && r->offset >= offset && r->offset - offset < len);
}

/* The error the node's armed rules give a request of @type over [offset, offset + len) (a
 * flush: len 0), or 0. */
static int
rule_check(BlkdebugState *s, guint64 offset, guint64 len, CbtQmpBlkdebugIOType type)
{
  Rule *hit = NULL;
  int err = 0;

  g_mutex_lock(&s->lock);
  for (guint i = 0; i < s->armed->len && !hit; i++) {
    Rule *r = g_ptr_array_index(s->armed, i);
    if ((r->iotypes & (1u << type)) && covers(r, offset, len))
      hit = r;
  }
  if (hit && hit->err) {
    err = hit->err;
    if (hit->once) {
      g_ptr_array_remove(s->armed, hit);
      for (guint e = 0; e < CBT_QMP_BLKDEBUG_EVENT__MAX; e++)
        if (s->rules[e] && g_ptr_array_remove(s->rules[e], hit))
          break;
    }
  }
  g_mutex_unlock(&s->lock);
  return -err;
}

/* ---- reads ------------------------------------------------------------------------------ */

static guint64
round_up(guint64 v, guint64 a)
{
  return (v + a - 1) / a * a;
}

/* The longest piece the driver takes (QEMU: 0 is no limit). */
static guint64
piece(guint64 limit, guint64 left)
{
  return limit ? MIN(limit, left) : left;
}

/* An aligned read in pieces of max-transfer, each checked; past the image's end, zeroes. */
static int
read_aligned(CbtBlockdev *bd, guint8 *buf, guint64 offset, guint64 len)
{
  BlkdebugState *s = state(bd);
  guint64 end = MIN(offset + len, round_up(bd->size, s->align));

  memset(buf + (end - offset), 0, offset + len - end);
  for (guint64 pos = offset; pos < end;) {
    guint64 n = piece(s->max_transfer, end - pos);
    guint64 in = pos < bd->size ? MIN(n, bd->size - pos) : 0;
    int r = rule_check(s, pos, n, CBT_QMP_BLKDEBUG_IO_TYPE_READ);
    if (r == 0 && in)
      r = cbt_blockdev_pread(image(bd), buf + (pos - offset), pos, in);
    if (r < 0)
      return r;
    memset(buf + (pos - offset) + in, 0, n - in);
    pos += n;
  }
  return 0;
}

static int
blkdebug_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  guint64 a = state(bd)->align, start = offset / a * a, end = round_up(offset + len, a);

  if (start == offset && end == offset + len)
    return read_aligned(bd, buf, offset, len);
  g_autofree guint8 *bounce = g_malloc(end - start);
  int r = read_aligned(bd, bounce, start, end - start);
  if (r == 0)
    memcpy(buf, bounce + (offset - start), len);
  return r;
}

/* ---- writes ----------------------------------------------------------------------------- */

/* An aligned data write: pwritev, the pieces of max-transfer, each checked, pwritev_done. */
static int
write_aligned(CbtBlockdev *bd, const guint8 *buf, guint64 offset, guint64 len, guint flags)
{
  BlkdebugState *s = state(bd);
  int r = 0;

  blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV);
  for (guint64 pos = offset; pos < offset + len && r == 0;) {
    guint64 n = piece(s->max_transfer, offset + len - pos);
    r = rule_check(s, pos, n, CBT_QMP_BLKDEBUG_IO_TYPE_WRITE);
    if (r == 0)
      r = cbt_blockdev_pwrite(image(bd), buf + (pos - offset), pos, n, flags);
    pos += n;
  }
  blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_DONE);
  return r;
}

/* Read the blocks [start, end) covers in part around [offset, offset + len) into @pad, as
 * QEMU's padding does: one read when the request lies in one block or two neighbouring ones
 * with both ends unaligned (the head's and the tail's events around it), else the head block
 * and the tail block, each between its events. The reads are the node's own, so read rules
 * fail them, and then the write. (qemu-storage-daemon 7.2 ignores such a failure and writes
 * the unread padding: the blocks around the data are corrupted. cbtd fails the write.) */
static int
pad_read(CbtBlockdev *bd, guint8 *pad, guint64 start, guint64 end, guint64 offset, guint64 len)
{
  guint64 a = state(bd)->align, head = offset - start, tail = end - (offset + len);
  guint64 whole = end - start, buf_len = whole > a && head && tail ? 2 * a : a;
  gboolean merge = whole == buf_len;
  int r;

  if (head || merge) {
    if (head)
      blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_HEAD);
    if (merge && tail)
      blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_TAIL);
    if ((r = read_aligned(bd, pad, start, merge ? whole : a)) < 0)
      return r;
    if (head)
      blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_AFTER_HEAD);
    if (merge && tail)
      blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_AFTER_TAIL);
    if (merge)
      return 0;
  }
  if (tail) {
    blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_TAIL);
    if ((r = read_aligned(bd, pad + (whole - a), end - a, a)) < 0)
      return r;
    blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_RMW_AFTER_TAIL);
  }
  return 0;
}

/* A write of @buf (NULL: zeroes) not aligned to `align`: the blocks it covers in part are read,
 * changed and written back whole, under `rmw` (invariant 3). */
static int
write_padded(CbtBlockdev *bd, const void *buf, guint64 offset, guint64 len, guint flags)
{
  BlkdebugState *s = state(bd);
  guint64 start = offset / s->align * s->align, end = round_up(offset + len, s->align);
  g_autofree guint8 *pad = g_malloc(end - start);

  g_rw_lock_writer_lock(&s->rmw);
  int r = pad_read(bd, pad, start, end, offset, len);
  if (r == 0) {
    if (buf)
      memcpy(pad + (offset - start), buf, len);
    else
      memset(pad + (offset - start), 0, len);
    r = write_aligned(bd, pad, start, end - start, flags);
  }
  g_rw_lock_writer_unlock(&s->rmw);
  return r;
}

static gboolean
aligned(BlkdebugState *s, guint64 offset, guint64 len)
{
  return offset % s->align == 0 && len % s->align == 0;
}

static int
blkdebug_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  BlkdebugState *s = state(bd);

  if (!aligned(s, offset, len))
    return write_padded(bd, buf, offset, len, flags);
  g_rw_lock_reader_lock(&s->rmw);
  int r = write_aligned(bd, buf, offset, len, flags);
  g_rw_lock_reader_unlock(&s->rmw);
  return r;
}

/* A piece of a zero-write shorter than the zero-write alignment: QEMU's driver refuses it
 * (ENOTSUP) and the block layer writes zeroes instead, unless the request must be cheap. */
static int
zero_fallback(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  BlkdebugState *s = state(bd);

  if (flags & CBT_BLOCKDEV_NO_FALLBACK)
    return -ENOTSUP;
  g_autofree guint8 *zeroes = g_malloc0(len);
  int r = rule_check(s, offset, len, CBT_QMP_BLKDEBUG_IO_TYPE_WRITE);
  return r ? r : cbt_blockdev_pwrite(image(bd), zeroes, offset, len, flags & CBT_BLOCKDEV_FUA);
}

/* The next piece of a zero-write or discard at @offset, as QEMU's block layer cuts them:
 * up to the next multiple of @a first, whole multiples of @a up to @max, then the tail. */
static guint64
next_piece(guint64 offset, guint64 left, guint64 a, guint64 max)
{
  guint64 head = offset % a, tail = (offset + left) % a, n = left;

  if (head)
    n = MIN(left, a - head);
  else if (tail && n > a)
    n -= tail;
  return MIN(n, max);
}

/* An aligned zero-write: pwritev_zero, its pieces, pwritev_done. */
static int
zero_aligned(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  BlkdebugState *s = state(bd);
  guint64 a = MAX(s->align, s->opt_write_zero);
  guint64 max = s->max_write_zero ? s->max_write_zero / a * a : G_MAXUINT64 / a * a;
  int r = 0;

  blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_ZERO);
  for (guint64 pos = offset, end = offset + len; pos < end && r == 0;) {
    guint64 n = next_piece(pos, end - pos, a, max);
    if (n < a) {
      n = piece(s->max_transfer, n);
      r = zero_fallback(bd, pos, n, flags);
    } else {
      r = rule_check(s, pos, n, CBT_QMP_BLKDEBUG_IO_TYPE_WRITE_ZEROES);
      if (r == 0)
        r = cbt_blockdev_write_zeroes(image(bd), pos, n, flags);
    }
    pos += n;
  }
  blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_PWRITEV_DONE);
  return r;
}

/* Unaligned ends are written as data after reading their blocks (QEMU pads a zero-write as it
 * pads a write); the aligned middle is a zero-write. */
static int
blkdebug_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  BlkdebugState *s = state(bd);
  guint64 a = s->align, first = round_up(offset, a), last = (offset + len) / a * a;
  int r = 0;

  if (aligned(s, offset, len)) {
    g_rw_lock_reader_lock(&s->rmw);
    r = zero_aligned(bd, offset, len, flags);
    g_rw_lock_reader_unlock(&s->rmw);
    return r;
  }
  if (first >= last) /* inside one block, or two neighbours with no aligned middle */
    return write_padded(bd, NULL, offset, len, flags & CBT_BLOCKDEV_FUA);
  if (first > offset &&
      (r = write_padded(bd, NULL, offset, first - offset, flags & CBT_BLOCKDEV_FUA)) < 0)
    return r;
  g_rw_lock_reader_lock(&s->rmw);
  r = zero_aligned(bd, first, last - first, flags);
  g_rw_lock_reader_unlock(&s->rmw);
  if (r == 0 && last < offset + len)
    r = write_padded(bd, NULL, last, offset + len - last, flags & CBT_BLOCKDEV_FUA);
  return r;
}

/* ---- discard, flush, block status ------------------------------------------------------- */

/* Discard is advisory: pieces shorter than `align` are dropped, as QEMU's driver does. */
static int
blkdebug_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  BlkdebugState *s = state(bd);
  guint64 a = MAX(s->align, s->opt_discard);
  guint64 max = s->max_discard ? s->max_discard / a * a : G_MAXUINT64 / a * a;

  for (guint64 pos = offset, end = offset + len; pos < end;) {
    guint64 n = next_piece(pos, end - pos, a, max);
    if (pos % a && n % s->align)
      n %= s->align; /* QEMU: reach the request alignment first */
    if (n >= s->align) {
      int r = rule_check(s, pos, n, CBT_QMP_BLKDEBUG_IO_TYPE_DISCARD);
      if (r == 0)
        r = cbt_blockdev_discard(image(bd), pos, n, 0);
      if (r < 0 && r != -ENOTSUP)
        return r;
    }
    pos += n;
  }
  return 0;
}

/* QEMU does not flush a node that was not written since its last flush: the check and the
 * flush of the image are skipped then (the image's own flush is idempotent, so it still goes). */
static int
blkdebug_flush(CbtBlockdev *bd)
{
  if (g_atomic_int_get(&bd->write_gen) != g_atomic_int_get(&bd->flushed_gen)) {
    int r = rule_check(state(bd), 0, 0, CBT_QMP_BLKDEBUG_IO_TYPE_FLUSH);
    if (r)
      return r;
  }
  return cbt_blockdev_flush(image(bd));
}

/* QEMU asks the driver about the range widened to `align`; the image answers. */
static int
blkdebug_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  BlkdebugState *s = state(bd);
  guint64 start = offset / s->align * s->align, end = round_up(offset + len, s->align);
  int r = rule_check(s, start, end - start, CBT_QMP_BLKDEBUG_IO_TYPE_BLOCK_STATUS);

  return r ? r : cbt_blockdev_block_status(image(bd), offset, len, pnum, status);
}

/* ---- graph -------------------------------------------------------------------------------- */

static void
blkdebug_child_perm(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
                    guint64 *ret_perm, guint64 *ret_shared)
{
  BlkdebugState *s = state(bd);

  *ret_perm = perm | (s ? s->take : 0);
  *ret_shared = shared & ~(s ? s->unshare : 0);
}

/* `align` replaces the request alignment (without it QEMU's filter has none of its own);
 * max-transfer merges with the image's as QEMU's bdrv_merge_limits does. */
static void
blkdebug_refresh_limits(CbtBlockdev *bd)
{
  BlkdebugState *s = state(bd);

  bd->min_io = s ? (guint32)s->align : 1;
  bd->max_transfer = s ? (guint32)s->max_transfer : 0;
  guint32 below = bd->file ? bd->file->node->max_transfer : 0;
  if (below && (!bd->max_transfer || below < bd->max_transfer))
    bd->max_transfer = below;
}

/* QEMU's blkdebug resizes its image and is as long as it. */
static gboolean
blkdebug_truncate(CbtBlockdev *bd, guint64 size, GError **error)
{
  return cbt_blockdev_truncate(image(bd), size, error);
}

static void
blkdebug_child_resized(CbtBlockdev *bd, CbtBlockdevChild *c)
{
  if (c == bd->file)
    bd->size = cbt_blockdev_get_size(c->node);
}

/* ---- open ------------------------------------------------------------------------------- */

/* The members QEMU reads with its option parser, which refuses negative numbers. */
static gboolean
get_size(gboolean has, gint64 v, const char *member, guint64 *out, GError **error)
{
  *out = has ? (guint64)v : 0;
  if (has && v < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Parameter '%s' expects a non-negative number below 2^64", member);
    return FALSE;
  }
  return TRUE;
}

static gboolean
get_sizes(const CbtQmpBlockdevOptionsBlkdebug *o, BlkdebugState *s, GError **error)
{
  return get_size(o->has_align, o->align, "align", &s->align, error) &&
         get_size(o->has_max_transfer, o->max_transfer, "max-transfer", &s->max_transfer, error) &&
         get_size(o->has_opt_write_zero, o->opt_write_zero, "opt-write-zero", &s->opt_write_zero,
                  error) &&
         get_size(o->has_max_write_zero, o->max_write_zero, "max-write-zero", &s->max_write_zero,
                  error) &&
         get_size(o->has_opt_discard, o->opt_discard, "opt-discard", &s->opt_discard, error) &&
         get_size(o->has_max_discard, o->max_discard, "max-discard", &s->max_discard, error);
}

/* QEMU's default: every kind but block-status. */
#define DEFAULT_IOTYPES                                                                            \
  (((1u << CBT_QMP_BLKDEBUG_IO_TYPE__MAX) - 1) & ~(1u << CBT_QMP_BLKDEBUG_IO_TYPE_BLOCK_STATUS))

static void
add_rule(BlkdebugState *s, CbtQmpBlkdebugEvent event, Rule *r)
{
  if (!s->rules[event])
    s->rules[event] = g_ptr_array_new_with_free_func(g_free);
  g_ptr_array_add(s->rules[event], r);
}

/* QEMU's strong options name each member of a rule as "inject-error.N.member". */
static void
record(CbtBlockdev *bd, const char *list, guint i, const char *member, JsonNode *value)
{
  g_autofree char *key = g_strdup_printf("%s.%u.%s", list, i, member);

  json_object_set_member(bd->full_opts, key, value);
}

static JsonNode *
int_node(gint64 v)
{
  return json_node_init_int(json_node_alloc(), v);
}

static gboolean
add_inject_rules(CbtBlockdev *bd, BlkdebugState *s, const CbtQmpBlkdebugInjectErrorOptionsList *l,
                 GError **error)
{
  for (guint i = 0; l && i < l->len; i++) {
    const CbtQmpBlkdebugInjectErrorOptions *o = g_ptr_array_index(l, i);
    if (o->q_errno < 0 || o->q_errno > G_MAXINT) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                  "blkdebug: inject-error errno must be between 0 and %d", G_MAXINT);
      return FALSE;
    }
    Rule *r = g_new0(Rule, 1);
    r->inject = TRUE;
    r->state = o->state;
    r->err = (int)o->q_errno;
    r->once = o->once;
    r->offset = o->sector == -1 ? ANY_OFFSET : (guint64)o->sector * 512u;
    r->iotypes = o->has_iotype ? 1u << o->iotype : DEFAULT_IOTYPES;
    add_rule(s, o->event, r);
    const char *ev = cbt_qmp_blkdebug_event_to_string(o->event);
    record(bd, "inject-error", i, "event", json_node_init_string(json_node_alloc(), ev));
    if (o->has_state)
      record(bd, "inject-error", i, "state", int_node(o->state));
    if (o->has_iotype)
      record(
        bd, "inject-error", i, "iotype",
        json_node_init_string(json_node_alloc(), cbt_qmp_blkdebug_io_type_to_string(o->iotype)));
    if (o->has_q_errno)
      record(bd, "inject-error", i, "errno", int_node(o->q_errno));
    if (o->has_sector)
      record(bd, "inject-error", i, "sector", int_node(o->sector));
    if (o->has_once)
      record(bd, "inject-error", i, "once", json_node_init_boolean(json_node_alloc(), o->once));
    if (o->has_immediately)
      record(bd, "inject-error", i, "immediately",
             json_node_init_boolean(json_node_alloc(), o->immediately));
  }
  return TRUE;
}

static void
add_state_rules(CbtBlockdev *bd, BlkdebugState *s, const CbtQmpBlkdebugSetStateOptionsList *l)
{
  for (guint i = 0; l && i < l->len; i++) {
    const CbtQmpBlkdebugSetStateOptions *o = g_ptr_array_index(l, i);
    Rule *r = g_new0(Rule, 1);
    r->state = o->state;
    r->new_state = o->new_state;
    add_rule(s, o->event, r);
    const char *ev = cbt_qmp_blkdebug_event_to_string(o->event);
    record(bd, "set-state", i, "event", json_node_init_string(json_node_alloc(), ev));
    if (o->has_state)
      record(bd, "set-state", i, "state", int_node(o->state));
    record(bd, "set-state", i, "new_state", int_node(o->new_state));
  }
}

static guint64
perm_bits(const CbtQmpBlockPermissionList *l)
{
  guint64 bits = 0;

  /* BlockPermission lists QEMU's bits in bit order. */
  for (guint i = 0; l && i < l->len; i++)
    bits |= 1u << g_array_index(l, CbtQmpBlockPermission, i);
  return bits;
}

/* QEMU's constraint checks, in its order, against the image's alignment. */
static gboolean
check_limits(BlkdebugState *s, guint64 image_align, GError **error)
{
  guint64 a = MAX(s->align, image_align);
  const struct {
    const char *name;
    guint64 v, multiple_of;
  } limits[] = {
    { "max-transfer", s->max_transfer, a },
    { "opt-write-zero", s->opt_write_zero, a },
    { "max-write-zero", s->max_write_zero, MAX(s->opt_write_zero, a) },
    { "opt-discard", s->opt_discard, a },
    { "max-discard", s->max_discard, MAX(s->opt_discard, a) },
  };

  if (s->align && (s->align >= G_MAXINT || (s->align & (s->align - 1)))) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Cannot meet constraints with align %" G_GUINT64_FORMAT, s->align);
    return FALSE;
  }
  for (gsize i = 0; i < G_N_ELEMENTS(limits); i++) {
    if (limits[i].v && (limits[i].v >= G_MAXINT || limits[i].v % limits[i].multiple_of)) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                  "Cannot meet constraints with %s %" G_GUINT64_FORMAT, limits[i].name,
                  limits[i].v);
      return FALSE;
    }
  }
  return TRUE;
}

static void
state_free(BlkdebugState *s)
{
  for (guint e = 0; e < CBT_QMP_BLKDEBUG_EVENT__MAX; e++)
    if (s->rules[e])
      g_ptr_array_unref(s->rules[e]);
  g_ptr_array_unref(s->armed);
  g_mutex_clear(&s->lock);
  g_rw_lock_clear(&s->rmw);
  g_free(s);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(BlkdebugState, state_free)

static void
record_limits(CbtBlockdev *bd, const CbtQmpBlockdevOptionsBlkdebug *o)
{
  const struct {
    const char *name;
    gboolean has;
    gint64 v;
  } m[] = {
    { "align", o->has_align, o->align },
    { "max-transfer", o->has_max_transfer, o->max_transfer },
    { "opt-write-zero", o->has_opt_write_zero, o->opt_write_zero },
    { "max-write-zero", o->has_max_write_zero, o->max_write_zero },
    { "opt-discard", o->has_opt_discard, o->opt_discard },
    { "max-discard", o->has_max_discard, o->max_discard },
  };

  for (gsize i = 0; i < G_N_ELEMENTS(m); i++)
    if (m[i].has)
      json_object_set_int_member(bd->full_opts, m[i].name, m[i].v);
}

/* QEMU names the node "blkdebug:CONFIG:IMAGE" while its options hold nothing but the image
 * (and a config file, which cbtd refuses); any rule or limit makes it json:{...}. */
static void
set_filename(CbtBlockdev *bd)
{
  const char *img = image(bd)->exact_filename;

  if (img && json_object_get_size(bd->full_opts) == 2) /* driver and image */
    bd->exact_filename = g_strconcat("blkdebug::", img, NULL);
}

/* In QEMU's order: the sizes, the rules, the permissions, then the image, then the limits. */
static gboolean
blkdebug_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  const CbtQmpBlockdevOptionsBlkdebug *o = &opts->u.blkdebug;
  g_autoptr(BlkdebugState) s = g_new0(BlkdebugState, 1);

  g_mutex_init(&s->lock);
  g_rw_lock_init(&s->rmw);
  s->armed = g_ptr_array_new();
  s->state = 1;
  if (!get_sizes(o, s, error))
    return FALSE;
  if (o->config) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "blkdebug: cbtd does not read config files; give the rules as inject-error "
                "and set-state");
    return FALSE;
  }
  if (!add_inject_rules(bd, s, o->inject_error, error))
    return FALSE;
  add_state_rules(bd, s, o->set_state);
  s->take = perm_bits(o->take_child_perms);
  s->unshare = perm_bits(o->unshare_child_perms);
  CbtBlockdevChild *c = cbt_blockdev_open_child(bd, o->image, "image", error);
  if (!c)
    return FALSE;
  bd->file = c; /* QEMU's bs->file: the filtered child, whatever its name */
  if (!check_limits(s, c->node->min_io, error))
    return FALSE;
  s->align = MAX(s->align, 1);
  record_limits(bd, o);
  bd->size = c->node->size;
  set_filename(bd);
  bd->opaque = g_steal_pointer(&s);
  cbt_blockdev_refresh_limits(bd);
  blkdebug_debug_event(bd, CBT_QMP_BLKDEBUG_EVENT_NONE);
  return TRUE;
}

/* QEMU's protocol drivers without a size of their own report none. */
static gint64
blkdebug_actual_size(CbtBlockdev *bd)
{
  return -1;
}

static void
blkdebug_close(CbtBlockdev *bd)
{
  g_clear_pointer(&bd->opaque, state_free);
}

static const CbtBlockdevChildSpec blkdebug_children[] = {
  { "image", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY | CBT_BLOCKDEV_CHILD_FILTERED },
  { NULL, 0 },
};

/* No get_data_fd: a read that went around the driver (zero-copy from the image's file) would
 * go around its rules. */
const CbtBlockdevDriver cbt_blockdev_blkdebug_driver = {
  .name = "blkdebug",
  .protocol = TRUE, /* QEMU opens it as a protocol: a raw node above borrows its file name */
  .is_filter = TRUE,
  .children = blkdebug_children,
  .supported_flags = CBT_BLOCKDEV_FUA | CBT_BLOCKDEV_MAY_UNMAP | CBT_BLOCKDEV_NO_FALLBACK,
  .open = blkdebug_open,
  .close = blkdebug_close,
  .child_perm = blkdebug_child_perm,
  .refresh_limits = blkdebug_refresh_limits,
  .pread = blkdebug_pread,
  .pwrite = blkdebug_pwrite,
  .flush = blkdebug_flush,
  .discard = blkdebug_discard,
  .write_zeroes = blkdebug_write_zeroes,
  .block_status = blkdebug_block_status,
  .actual_size = blkdebug_actual_size,
  .truncate = blkdebug_truncate,
  .child_resized = blkdebug_child_resized,
  .debug_event = blkdebug_debug_event,
};
