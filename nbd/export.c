/* nbd/export.c — the export registry: creation with qsd's checks, deletion (safe/hard), clients
 * attaching and leaving, and BLOCK_EXPORT_DELETED once an export is really gone.
 *
 * Lifetime: the registry holds one reference per export; every attached connection and every
 * meta-context selection holds another. An export is "deleted" (event emitted, node released,
 * id reusable) on the main thread when it is shutting down and its last client has detached.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>

#include "common/assert.h"
#include "dirty-bitmaps/dirty-bitmaps.h"
#include "schemas/qmp-events.h"

static GPtrArray *exports; /* CbtNbdExport, creation order; under cbt_nbd_lock */

/* Give the bits back: a looked-up bitmap is released, a frozen copy freed. */
static void
export_bitmap_clear(CbtNbdExportBitmap *eb)
{
  if (eb->bm && eb->frozen)
    cbt_bitmap_free(eb->bm);
  else if (eb->bm)
    cbt_dirty_bitmaps_export_release(eb->bm);
  eb->bm = NULL;
}

static void
export_bitmap_free(gpointer p)
{
  CbtNbdExportBitmap *eb = p;
  export_bitmap_clear(eb);
  g_free(eb->name);
  g_free(eb->identity);
  g_free(eb);
}

CbtNbdExport *
cbt_nbd_export_ref(CbtNbdExport *exp)
{
  g_atomic_int_inc(&exp->ref);
  return exp;
}

void
cbt_nbd_export_unref(CbtNbdExport *exp)
{
  if (!exp || !g_atomic_int_dec_and_test(&exp->ref))
    return;
  g_ptr_array_unref(exp->conns);
  g_clear_pointer(&exp->bitmaps, g_ptr_array_unref);
  g_free(exp->id);
  g_free(exp->name);
  g_free(exp->description);
  g_free(exp);
}

/* The same rule as node names and QEMU ids: a letter, then letters, digits, '-', '.', '_'. */
static gboolean
id_wellformed(const char *id)
{
  if (!g_ascii_isalpha(id[0]))
    return FALSE;
  for (const char *p = id + 1; *p; p++) {
    if (!g_ascii_isalnum(*p) && *p != '-' && *p != '.' && *p != '_')
      return FALSE;
  }
  return TRUE;
}

/* Called with cbt_nbd_lock held. */
static CbtNbdExport *
find_id_locked(const char *id)
{
  CBT_ASSERT_HELD(&cbt_nbd_lock);
  for (guint i = 0; exports && i < exports->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(exports, i);
    if (!exp->deleted && strcmp(exp->id, id) == 0)
      return exp;
  }
  return NULL;
}

/* Called with cbt_nbd_lock held. */
static CbtNbdExport *
find_name_locked(const char *name)
{
  CBT_ASSERT_HELD(&cbt_nbd_lock);
  for (guint i = 0; exports && i < exports->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(exports, i);
    if (!exp->shutting_down && strcmp(exp->name, name) == 0)
      return exp;
  }
  return NULL;
}

CbtNbdExport *
cbt_nbd_export_find_name(const char *name)
{
  cbt_mutex_lock(&cbt_nbd_lock);
  CbtNbdExport *exp = find_name_locked(name);
  if (exp)
    cbt_nbd_export_ref(exp);
  cbt_mutex_unlock(&cbt_nbd_lock);
  return exp;
}

GPtrArray *
cbt_nbd_export_list(void)
{
  GPtrArray *out = g_ptr_array_new_with_free_func(g_free);

  cbt_mutex_lock(&cbt_nbd_lock);
  for (guint i = 0; exports && i < exports->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(exports, i);
    if (exp->shutting_down)
      continue;
    g_ptr_array_add(out, g_strdup(exp->name));
    g_ptr_array_add(out, g_strdup(exp->description ? exp->description : ""));
  }
  cbt_mutex_unlock(&cbt_nbd_lock);
  return out;
}

GPtrArray *
cbt_nbd_export_query(void)
{
  CBT_ASSERT_MAIN_THREAD();
  GPtrArray *out = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_nbd_export_unref);

  cbt_mutex_lock(&cbt_nbd_lock);
  for (guint i = exports ? exports->len : 0; i > 0; i--) {
    CbtNbdExport *exp = g_ptr_array_index(exports, i - 1);
    if (!exp->deleted)
      g_ptr_array_add(out, cbt_nbd_export_ref(exp));
  }
  cbt_mutex_unlock(&cbt_nbd_lock);
  return out;
}

guint16
cbt_nbd_export_eflags(CbtNbdExport *exp, gboolean structured)
{
  guint16 f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;

  if (structured)
    f |= NBD_FLAG_SEND_DF;
  if (exp->multi_conn)
    f |= NBD_FLAG_CAN_MULTI_CONN;
  if (exp->writable)
    f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  else
    f |= NBD_FLAG_READ_ONLY;
  return f;
}

/* Main thread: the export is gone for good. */
static void
export_finalize(CbtNbdExport *exp)
{
  cbt_mutex_lock(&cbt_nbd_lock);
  if (exp->deleted || exp->conns->len > 0) {
    cbt_mutex_unlock(&cbt_nbd_lock);
    return;
  }
  exp->deleted = TRUE;
  g_ptr_array_remove(exports, exp); /* drops the registry's reference later, below */
  cbt_mutex_unlock(&cbt_nbd_lock);

  /* Handshaking clients may still hold @exp and read its names: keep the array, give the
   * bitmaps back. */
  for (guint i = 0; i < exp->bitmaps->len; i++)
    export_bitmap_clear(g_ptr_array_index(exp->bitmaps, i));
  if (exp->writable)
    cbt_blockdev_release_write(exp->bd);
  cbt_blockdev_remove_export_stats(exp->bd, g_steal_pointer(&exp->stats));
  cbt_blockdev_remove_user(exp->bd);
  g_clear_pointer(&exp->bd, cbt_blockdev_unref);
  g_clear_pointer(&exp->snapshot, cbt_blockdev_snapshot_free);
  cbt_qmp_event_block_export_deleted(exp->id);
  g_debug("export '%s' deleted", exp->id);
  cbt_nbd_export_unref(exp);
}

static gboolean
finalize_idle(gpointer data)
{
  export_finalize(data);
  return G_SOURCE_REMOVE;
}

CbtNbdAttach
cbt_nbd_export_attach(CbtNbdExport *exp, CbtNbdConn *conn)
{
  CbtNbdAttach r = CBT_NBD_ATTACH_OK;

  cbt_mutex_lock(&cbt_nbd_lock);
  if (exp->shutting_down || conn->closing)
    r = CBT_NBD_ATTACH_GONE;
  else if (exp->max_clients && exp->conns->len >= exp->max_clients)
    r = CBT_NBD_ATTACH_FULL;
  if (r == CBT_NBD_ATTACH_OK) {
    g_ptr_array_add(exp->conns, conn);
    exp->had_client = TRUE;
  }
  cbt_mutex_unlock(&cbt_nbd_lock);
  return r;
}

/* Main thread: an auto-remove export lost its last client. A client that came since, or a
 * delete (and maybe a new export of the same id), makes this a no-op. */
static gboolean
auto_remove_idle(gpointer data)
{
  CbtNbdExport *exp = data;
  g_autoptr(GError) error = NULL;

  cbt_mutex_lock(&cbt_nbd_lock);
  gboolean still = find_id_locked(exp->id) == exp && !exp->shutting_down && exp->conns->len == 0;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (still && !cbt_nbd_export_del(exp->id, FALSE, &error))
    g_debug("auto-remove of export '%s': %s", exp->id, error->message);
  return G_SOURCE_REMOVE;
}

void
cbt_nbd_export_detach(CbtNbdExport *exp, CbtNbdConn *conn)
{
  gboolean last, unused;

  cbt_mutex_lock(&cbt_nbd_lock);
  g_ptr_array_remove(exp->conns, conn);
  last = exp->shutting_down && !exp->deleted && exp->conns->len == 0;
  unused = exp->auto_remove && exp->had_client && !exp->shutting_down && exp->conns->len == 0;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (last)
    g_idle_add_full(G_PRIORITY_DEFAULT, finalize_idle, cbt_nbd_export_ref(exp),
                    (GDestroyNotify)cbt_nbd_export_unref);
  if (unused)
    g_idle_add_full(G_PRIORITY_DEFAULT, auto_remove_idle, cbt_nbd_export_ref(exp),
                    (GDestroyNotify)cbt_nbd_export_unref);
}

/* Called with cbt_nbd_lock held: no new clients, and the attached ones are told to leave. */
static void
begin_shutdown_locked(CbtNbdExport *exp)
{
  CBT_ASSERT_HELD(&cbt_nbd_lock);
  exp->shutting_down = TRUE;
  for (guint i = 0; i < exp->conns->len; i++)
    cbt_nbd_conn_kick_locked(g_ptr_array_index(exp->conns, i));
}

/* Resolve the `bitmaps` list; on failure the ones found so far are released with @out. */
static gboolean
resolve_bitmaps(const CbtQmpBlockExportOptions *o, CbtBlockdev *bd, GPtrArray *out, GError **error)
{
  GPtrArray *list = o->u.nbd.bitmaps;

  for (guint i = 0; list && i < list->len; i++) {
    const CbtQmpBlockDirtyBitmapOrStr *ref = g_ptr_array_index(list, i);
    gboolean local = ref->type == CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_LOCAL;
    const char *node_name = local ? NULL : ref->u.external->node;
    const char *name = local ? ref->u.local : ref->u.external->name;
    CbtBlockdev *node = bd;

    if (node_name) {
      node = cbt_blockdev_find(node_name);
      if (!node) {
        g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Node '%s' not found", node_name);
        return FALSE;
      }
    }
    CbtBitmap *bm = cbt_dirty_bitmaps_export_lookup(node, node_name, name, !o->writable, error);
    if (!bm)
      return FALSE;
    /* qsd 7.2 accepts a {node, name} bitmap of another size and maps garbage; refuse it. */
    if (cbt_bitmap_get_size(bm) != cbt_blockdev_get_size(bd)) {
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                  "Bitmap '%s' covers %" G_GUINT64_FORMAT
                  " bytes but the export's node '%s' has %" G_GUINT64_FORMAT,
                  name, cbt_bitmap_get_size(bm), cbt_blockdev_get_node_name(bd),
                  cbt_blockdev_get_size(bd));
      cbt_dirty_bitmaps_export_release(bm);
      return FALSE;
    }
    CbtNbdExportBitmap *eb = g_new0(CbtNbdExportBitmap, 1);
    eb->name = g_strdup(name);
    eb->identity = cbt_dirty_bitmaps_identity_text(node, name);
    eb->bm = bm;
    g_ptr_array_add(out, eb);
  }
  return TRUE;
}

/* The checks of qsd 7.2's block-export-add that come before the NBD driver runs, in its order. */
static CbtBlockdev *
check_common(const CbtQmpBlockExportOptions *o, GError **error)
{
  if (!id_wellformed(o->id)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Invalid block export id");
    return NULL;
  }
  cbt_mutex_lock(&cbt_nbd_lock);
  gboolean used = find_id_locked(o->id) != NULL;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (used) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "Block export id '%s' is already in use", o->id);
    return NULL;
  }
  CbtBlockdev *bd = cbt_blockdev_find(o->node_name);
  if (!bd) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "Cannot find device='' nor node-name='%s'", o->node_name);
    return NULL;
  }
  if (o->writable && cbt_blockdev_is_read_only(bd)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "Cannot export read-only node as writable");
    return NULL;
  }
  if (o->iothread) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "iothread \"%s\" not found",
                o->iothread);
    return NULL;
  }
  if (!cbt_nbd_server_running()) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "NBD server not running");
    return NULL;
  }
  return bd;
}

static gboolean
check_nbd(const CbtQmpBlockExportOptions *o, const char *name, GError **error)
{
  if (strlen(name) > NBD_MAX_STRING) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "export name '%s' too long", name);
    return FALSE;
  }
  const char *desc = o->u.nbd.description;
  if (desc && strlen(desc) > NBD_MAX_STRING) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "description '%s' too long", desc);
    return FALSE;
  }
  cbt_mutex_lock(&cbt_nbd_lock);
  gboolean dup = find_name_locked(name) != NULL;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (dup) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "NBD server already has export named '%s'", name);
    return FALSE;
  }
  return TRUE;
}

static CbtNbdExport *
export_new(const CbtQmpBlockExportOptions *o, const char *name, CbtBlockdev *bd)
{
  CbtNbdExport *exp = g_new0(CbtNbdExport, 1);

  exp->ref = 1;
  exp->id = g_strdup(o->id);
  exp->name = g_strdup(name);
  exp->description = g_strdup(o->u.nbd.description);
  exp->writable = o->writable;
  exp->writethrough = o->writethrough;
  exp->allocation_depth = o->u.nbd.allocation_depth;
  exp->auto_remove = o->u.nbd.auto_remove;
  exp->max_clients = o->u.nbd.has_max_clients ? o->u.nbd.max_clients : 0;
  exp->min_block = MAX(cbt_blockdev_get_min_io(bd), 1u);
  exp->pref_block = MAX(exp->min_block, 4096u);
  exp->max_payload = CBT_NBD_MAX_PAYLOAD;
  /* As qsd: the node's max transfer is advertised, but longer requests are still served (the
   * node cuts them), so the payload bound stays. */
  guint32 max_transfer = cbt_blockdev_get_max_transfer(bd);
  exp->max_block = max_transfer ? MIN(max_transfer, exp->max_payload) : exp->max_payload;
  /* Advertise only whole minimum blocks (docs/nbd-server.md, "Limits"). */
  exp->size = cbt_blockdev_get_size(bd) / exp->min_block * exp->min_block;
  /* Connections are consistent with each other (NBD_FLAG_CAN_MULTI_CONN) when nothing is cached
   * per connection: every connection of an export reaches the same node, and every cbtd node
   * keeps one state for all its users (a file node one descriptor, one page cache), so a flush
   * on one connection covers writes acknowledged on the others. A single-connection server
   * gains nothing by advertising it. */
  exp->multi_conn = cbt_nbd_server_max_connections() != 1 && exp->max_clients != 1;
  exp->conns = g_ptr_array_new();
  return exp;
}

/* Make @exp, reading @bd, visible to clients. */
static void
publish(CbtNbdExport *exp, CbtBlockdev *bd)
{
  exp->bd = cbt_blockdev_ref(bd);
  exp->stats = cbt_blockdev_add_export_stats(bd, exp->id);
  cbt_blockdev_add_user(bd);
  cbt_mutex_lock(&cbt_nbd_lock);
  if (!exports)
    exports = g_ptr_array_new();
  g_ptr_array_add(exports, exp);
  cbt_mutex_unlock(&cbt_nbd_lock);
  g_debug("export '%s' (name '%s', node '%s', %s) added", exp->id, exp->name,
          cbt_blockdev_get_node_name(bd), exp->writable ? "writable" : "read-only");
}

/* What a snapshot export does at the instant of its view. */
typedef struct {
  const CbtQmpBlockExportOptions *o;
  GPtrArray *bitmaps; /* CbtNbdExportBitmap, frozen */
} AtInstant;

/* The `bitmaps` entries as they are at the instant; they must be the node's own, the one
 * drained node (another node's bits could be changing). */
static gboolean
freeze_bitmaps(CbtBlockdev *bd, AtInstant *a, gboolean *persistent, GError **error)
{
  GPtrArray *list = a->o->u.nbd.bitmaps;

  for (guint i = 0; list && i < list->len; i++) {
    const CbtQmpBlockDirtyBitmapOrStr *ref = g_ptr_array_index(list, i);
    gboolean local = ref->type == CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_LOCAL;
    const char *bname = local ? ref->u.local : ref->u.external->name;
    gboolean p = FALSE;

    if (!local && strcmp(ref->u.external->node, cbt_blockdev_get_node_name(bd)) != 0) {
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                  "A snapshot export publishes bitmaps of node '%s' only, not of '%s'",
                  cbt_blockdev_get_node_name(bd), ref->u.external->node);
      return FALSE;
    }
    CbtBitmap *bm = cbt_dirty_bitmaps_freeze(bd, bname, &p, error);
    if (!bm)
      return FALSE;
    CbtNbdExportBitmap *eb = g_new0(CbtNbdExportBitmap, 1);
    eb->name = g_strdup(bname);
    eb->identity = cbt_dirty_bitmaps_identity_text(bd, bname); /* the instant's: drained */
    eb->bm = bm;
    eb->frozen = TRUE;
    g_ptr_array_add(a->bitmaps, eb);
    *persistent |= p;
  }
  return TRUE;
}

/* Copies first, the checkpoint last: nothing after it can fail, so it needs no undo here. The
 * checkpoint records at the granularity of the first published bitmap, the chain it continues:
 * the next incremental then reads no more than this one's bitmap would have made it read. */
static gboolean
at_instant(CbtBlockdev *bd, gpointer opaque, GError **error)
{
  AtInstant *a = opaque;
  gboolean persistent = FALSE;
  guint32 granularity = 0;

  if (!freeze_bitmaps(bd, a, &persistent, error))
    return FALSE;
  if (a->bitmaps->len > 0) {
    const CbtNbdExportBitmap *first = g_ptr_array_index(a->bitmaps, 0);
    granularity = cbt_bitmap_get_granularity(first->bm);
  }
  if (a->o->u.nbd.has_checkpoint_granularity)
    granularity = a->o->u.nbd.checkpoint_granularity;
  if (a->o->u.nbd.has_checkpoint_persistent)
    persistent = a->o->u.nbd.checkpoint_persistent;
  return !a->o->u.nbd.checkpoint ||
         cbt_dirty_bitmaps_checkpoint(bd, a->o->u.nbd.checkpoint, granularity, persistent, error);
}

/* Any thread (the writer whose copy failed): the export's reads fail from now on. */
static void
snapshot_broken(int err, gpointer data)
{
  CbtNbdExport *exp = data;

  cbt_qmp_event_block_export_snapshot_broken(exp->id, g_strerror(-err));
}

/* The one-call point-in-time export: a read-only export of a view cbtd builds for it. */
static gboolean
add_snapshot(const CbtQmpBlockExportOptions *o, const char *name, CbtBlockdev *bd, GError **error)
{
  g_autoptr(GPtrArray) bitmaps = g_ptr_array_new_with_free_func(export_bitmap_free);
  AtInstant a = { o, bitmaps };
  CbtBlockdevSnapshot *snap =
    cbt_blockdev_snapshot_new(bd, o->u.nbd.scratch_dir, at_instant, &a, error);

  if (!snap)
    return FALSE;
  CbtBlockdev *view = cbt_blockdev_snapshot_get_view(snap);
  CbtNbdExport *exp = export_new(o, name, view);
  exp->bitmaps = g_steal_pointer(&bitmaps);
  exp->snapshot = snap;
  /* The export outlives the filter: teardown frees the snapshot (drained) before the export. */
  cbt_blockdev_snapshot_set_limit(snap, o->u.nbd.has_scratch_size ? o->u.nbd.scratch_size : 0,
                                  snapshot_broken, exp);
  publish(exp, view);
  return TRUE;
}

/* snapshot: true (cbtd's own): what it cannot be combined with, before anything is built. */
static gboolean
check_snapshot(const CbtQmpBlockExportOptions *o, GError **error)
{
  const char *what = NULL;

  if (!o->u.nbd.snapshot) {
    if (o->u.nbd.scratch_dir)
      what = "'scratch-dir' needs 'snapshot': true";
    else if (o->u.nbd.has_scratch_size)
      what = "'scratch-size' needs 'snapshot': true";
    else if (o->u.nbd.checkpoint)
      what = "'checkpoint' needs 'snapshot': true";
  } else if (o->writable) {
    what = "A snapshot export cannot be writable";
  } else if (o->u.nbd.has_scratch_size && o->u.nbd.scratch_size == 0) {
    /* 0 would read as "unbounded" below: refuse it rather than guess. */
    what = "'scratch-size' must be at least 1 byte";
  }
  if (!what && !o->u.nbd.checkpoint) {
    if (o->u.nbd.has_checkpoint_persistent)
      what = "'checkpoint-persistent' needs 'checkpoint'";
    else if (o->u.nbd.has_checkpoint_granularity)
      what = "'checkpoint-granularity' needs 'checkpoint'";
  }
  if (what)
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, what);
  return what == NULL;
}

gboolean
cbt_nbd_export_add(const CbtQmpBlockExportOptions *o, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  CbtBlockdev *bd = check_common(o, error);
  if (!bd)
    return FALSE;
  const char *name = o->u.nbd.name ? o->u.nbd.name : o->node_name;
  if (!check_nbd(o, name, error) || !check_snapshot(o, error))
    return FALSE;
  if (o->u.nbd.snapshot)
    return add_snapshot(o, name, bd, error);

  g_autoptr(GPtrArray) bitmaps = g_ptr_array_new_with_free_func(export_bitmap_free);
  if (!resolve_bitmaps(o, bd, bitmaps, error))
    return FALSE;
  if (o->writable && !cbt_blockdev_acquire_write(bd, error))
    return FALSE;

  CbtNbdExport *exp = export_new(o, name, bd);
  exp->bitmaps = g_steal_pointer(&bitmaps);
  publish(exp, bd);
  return TRUE;
}

gboolean
cbt_nbd_export_del(const char *id, gboolean hard, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  cbt_mutex_lock(&cbt_nbd_lock);
  CbtNbdExport *exp = find_id_locked(id);
  g_autofree char *fail = NULL;

  if (!exp)
    fail = g_strdup_printf("Export '%s' is not found", id);
  else if (exp->shutting_down)
    fail = g_strdup_printf("Export '%s' is already shutting down", id);
  else if (!hard && exp->conns->len > 0)
    fail = g_strdup_printf("export '%s' still in use", id);
  if (fail) {
    cbt_mutex_unlock(&cbt_nbd_lock);
    g_set_error_literal(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, fail);
    return FALSE;
  }
  cbt_nbd_export_ref(exp);
  begin_shutdown_locked(exp);
  cbt_mutex_unlock(&cbt_nbd_lock);

  export_finalize(exp); /* at once when idle; otherwise when the last client detaches */
  cbt_nbd_export_unref(exp);
  return TRUE;
}

void
cbt_nbd_export_shutdown_all(gboolean wait_for_clients)
{
  CBT_ASSERT_MAIN_THREAD();
  g_autoptr(GPtrArray) all = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_nbd_export_unref);

  cbt_mutex_lock(&cbt_nbd_lock);
  for (guint i = 0; exports && i < exports->len; i++) {
    CbtNbdExport *exp = g_ptr_array_index(exports, i);
    if (!exp->shutting_down)
      begin_shutdown_locked(exp);
    g_ptr_array_add(all, cbt_nbd_export_ref(exp));
  }
  cbt_mutex_unlock(&cbt_nbd_lock);

  /* Clients were kicked; their threads leave within milliseconds unless stuck in backend I/O.
   * Waiting a little keeps the events in creation order in the common case. */
  cbt_nbd_server_wait_idle(wait_for_clients ? 10 * G_USEC_PER_SEC : G_USEC_PER_SEC / 2);
  for (guint i = 0; i < all->len; i++)
    export_finalize(g_ptr_array_index(all, i));
}
