/* dirty-bitmaps/persist.c — binds bitmap stores (bitmap/store/store.h) to block nodes: which
 * store a node has, loading it when the node opens, closing it when the node goes, the write
 * observer through which the store marks its bitmaps, and the durable step of every command on
 * a persistent bitmap (docs/bitmaps.md, "Persistence").
 *
 * Rules kept here:
 * - One store per path, owned by one node: a raw node and its file node cannot both keep a
 *   store at one path. A store's identity names the device and the layer (a raw node's window
 *   offset), so the store of a raw node is refused by its file node and the other way round.
 * - A store that cannot be attached (corrupt, foreign, held by another process, unreadable)
 *   never stops the node from opening: a warning names the store and the reason, and adding a
 *   persistent bitmap then fails with that reason. Nothing it held is adopted, so nothing can
 *   silently miss writes.
 * - A persistent bitmap is never tracked by its node: the store marks it (in memory, then in
 *   the store) through the node's write observer, installed while the store has a recording
 *   bitmap.
 */
#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "bitmap/store/store.h"
#include "dirty-bitmaps/dirty-bitmaps-private.h"
#include "schemas/qmp-events.h"

typedef struct {
  CbtBlockdev *bd; /* not referenced: the binding goes at the node's CLOSING */
  char *path;      /* the store's path, or NULL when @refusal says why there is none */
  char *refusal;   /* why persistent bitmaps are refused on this node, or NULL */
  char *identity;
  guint32 sync_interval_ms;
  guint64 region_size;
  CbtStore *store; /* NULL until opened (at open when the file exists, or at the first add) */
  gboolean observing;
} Binding;

/* What the load found for a bitmap, shown by the query (BlockDirtyInfo's recovery members). */
typedef struct {
  CbtStoreStop stop;
  guint64 widened;
  char *reason;
} Recovery;

static GHashTable *bindings;   /* CbtBlockdev * -> Binding * (owned) */
static GHashTable *recoveries; /* CbtDirtyBitmap * -> Recovery * (owned) */
static char *state_dir;

void
cbt_dirty_bitmaps_set_state_dir(const char *dir)
{
  g_free(state_dir);
  state_dir = g_strdup(dir);
}

static Binding *
binding_of(CbtBlockdev *bd)
{
  return bindings ? g_hash_table_lookup(bindings, bd) : NULL;
}

/* The binding whose open store lives at @path, or NULL. */
static Binding *
store_owner(const char *path)
{
  GHashTableIter it;
  gpointer value;

  if (!bindings)
    return NULL;
  g_hash_table_iter_init(&it, bindings);
  while (g_hash_table_iter_next(&it, NULL, &value)) {
    Binding *b = value;
    if (b->store && g_strcmp0(b->path, path) == 0)
      return b;
  }
  return NULL;
}

/* ---- identity and place ------------------------------------------------------------------ */

/* The first of @names (a file under @dir or @dir/device) that holds a non-empty line. */
static char *
sysfs_attr(const char *dir, const char *const *names)
{
  for (const char *const *n = names; *n; n++) {
    const char *subdirs[] = { "", "device" };
    for (gsize i = 0; i < G_N_ELEMENTS(subdirs); i++) {
      g_autofree char *path = g_build_filename(dir, subdirs[i], *n, NULL);
      g_autofree char *text = NULL;
      if (!g_file_get_contents(path, &text, NULL, NULL))
        continue;
      g_strstrip(text);
      if (text[0])
        return g_strdup_printf("%s=%s", *n, text);
    }
  }
  return NULL;
}

/* A block device's identity: its wwid or serial (of the whole disk, plus the partition number,
 * for a partition), so a store follows the disk when its device number changes; otherwise the
 * device number. */
static char *
block_identity(dev_t rdev)
{
  static const char *const names[] = { "wwid", "serial", NULL };
  g_autofree char *dir = g_strdup_printf("/sys/dev/block/%u:%u", major(rdev), minor(rdev));
  g_autofree char *part_path = g_build_filename(dir, "partition", NULL);
  g_autofree char *part = NULL;
  g_autofree char *id = NULL;

  if (g_file_get_contents(part_path, &part, NULL, NULL)) {
    g_autofree char *parent = g_build_filename(dir, "..", NULL);
    g_strstrip(part);
    id = sysfs_attr(parent, names);
    if (id)
      return g_strdup_printf("blockdev:%s:part=%s", id, part);
  } else if ((id = sysfs_attr(dir, names))) {
    return g_strdup_printf("blockdev:%s", id);
  }
  return g_strdup_printf("blockdev:%u:%u", major(rdev), minor(rdev));
}

/* The identity a store checks: the device, and for a raw node the layer and its offset. */
static char *
device_identity(const CbtBlockdevStoreInfo *info, GError **error)
{
  g_autofree char *dev = NULL;
  struct stat st;

  if (fstat(info->fd, &st) < 0) {
    cbt_dirty_bitmaps_error(error, "Could not stat '%s': %s", info->filename, g_strerror(errno));
    return NULL;
  }
  if (S_ISREG(st.st_mode))
    dev = g_strdup_printf("file:dev=%" G_GUINT64_FORMAT ":ino=%" G_GUINT64_FORMAT,
                          (guint64)st.st_dev, (guint64)st.st_ino);
  else if (S_ISBLK(st.st_mode))
    dev = block_identity(st.st_rdev);
  else
    dev = g_strdup_printf("chardev:%u:%u", major(st.st_rdev), minor(st.st_rdev));
  if (!info->via_format)
    return g_steal_pointer(&dev);
  return g_strdup_printf("raw:offset=%" G_GUINT64_FORMAT ";%s", info->offset, dev);
}

/* Where the store of a node with @info lives, or NULL with the reason in @refusal. */
static char *
store_path(const CbtBlockdevStoreInfo *info, char **refusal)
{
  if (info->store)
    return g_canonicalize_filename(info->store, NULL);
  if (!info->is_device) {
    g_autofree char *sidecar = g_strconcat(info->filename, ".cbt", NULL);
    return g_canonicalize_filename(sidecar, NULL);
  }
  if (!state_dir) {
    *refusal = g_strdup_printf("host device '%s' has no place for a bitmap store: set the node "
                               "option bitmap-store (or run cbtd with --state-dir)",
                               info->filename);
    return NULL;
  }
  /* A generated name ("#block123") is not stable across restarts. */
  if (info->node_name[0] == '#') {
    *refusal = g_strdup_printf("host device '%s' has no node-name to name its bitmap store "
                               "after: set the node option bitmap-store",
                               info->filename);
    return NULL;
  }
  g_autofree char *name = g_strconcat(info->node_name, ".cbt", NULL);
  g_autofree char *path = g_build_filename(state_dir, "bitmaps", name, NULL);
  return g_canonicalize_filename(path, NULL);
}

/* ---- the store's callbacks ----------------------------------------------------------------- */

static void
observe_write(gpointer opaque, guint64 offset, guint64 len)
{
  cbt_store_mark(opaque, offset, len);
}

/* Any thread: the store degraded. The event is thread-safe (cbt_rpc_broadcast_event). */
static void
store_error(CbtStore *store, const char *what, int err, gpointer data)
{
  Binding *b = data;
  const char *node = cbt_blockdev_get_node_name(b->bd);

  g_warning("node %s: bitmap store %s: %s failed: %s; writes go on, and recovery after an "
            "unclean stop will widen its bitmaps",
            node, b->path, what, g_strerror(err));
  cbt_qmp_event_block_dirty_bitmap_store_error(node, b->path, what, g_strerror(err));
}

/* The observer is installed while a persistent bitmap of the node records. */
static void
refresh_observer(Binding *b)
{
  GPtrArray *arr = cbt_dirty_bitmaps_list(b->bd);
  gboolean want = FALSE;

  for (guint i = 0; b->store && arr && i < arr->len && !want; i++) {
    CbtDirtyBitmap *dbm = g_ptr_array_index(arr, i);
    want = cbt_dirty_bitmap_is_persistent(dbm) && cbt_dirty_bitmap_is_recording(dbm);
  }
  if (want == b->observing)
    return;
  if (want)
    cbt_blockdev_add_write_observer(b->bd, observe_write, b->store);
  else
    cbt_blockdev_remove_write_observer(b->bd, observe_write, b->store);
  b->observing = want;
}

static void
attached(Binding *b, CbtStore *store)
{
  b->store = store;
  /* The store syncs itself every sync_interval_ms (its own thread). */
  cbt_store_set_error_func(store, store_error, b);
}

static CbtStore *
open_store(Binding *b, gboolean create, GError **error)
{
  CbtStoreConfig config = {
    .size = cbt_blockdev_get_size(b->bd),
    .identity = b->identity,
    .region_size = b->region_size,
    .sync_interval_ms = b->sync_interval_ms,
    .create = create,
  };

  return cbt_store_open(b->path, &config, NULL, error);
}

/* ---- loading ------------------------------------------------------------------------------- */

static const char *
stop_name(CbtStoreStop stop)
{
  switch (stop) {
  case CBT_STORE_STOP_PROCESS:
    return "process";
  case CBT_STORE_STOP_SYSTEM:
    return "system";
  default:
    return "clean";
  }
}

static CbtQmpBlockDirtyBitmapRecovery
stop_kind(CbtStoreStop stop)
{
  switch (stop) {
  case CBT_STORE_STOP_PROCESS:
    return CBT_QMP_BLOCK_DIRTY_BITMAP_RECOVERY_PROCESS;
  case CBT_STORE_STOP_SYSTEM:
    return CBT_QMP_BLOCK_DIRTY_BITMAP_RECOVERY_SYSTEM;
  default:
    return CBT_QMP_BLOCK_DIRTY_BITMAP_RECOVERY_CLEAN;
  }
}

static void
recovery_free(gpointer p)
{
  Recovery *r = p;

  g_free(r->reason);
  g_free(r);
}

/* Report one loaded bitmap: a log line and the event, never silently. */
static void
report_loaded(Binding *b, const CbtStoreBitmap *sb, CbtStoreStop stop)
{
  const char *node = cbt_blockdev_get_node_name(b->bd);
  const char *reason = sb->reason ? sb->reason : "";

  if (sb->inconsistent)
    g_warning("node %s: bitmap %s from %s is inconsistent (only remove works): %s", node, sb->name,
              b->path, reason);
  else
    g_message("node %s: bitmap %s loaded from %s after a %s stop, widened by %" G_GUINT64_FORMAT
              " bytes%s%s",
              node, sb->name, b->path, stop_name(stop), sb->widened, sb->reason ? ": " : "",
              reason);
  cbt_qmp_event_block_dirty_bitmap_loaded(node, sb->name, sb->recording && !sb->inconsistent,
                                          sb->inconsistent, sb->widened, stop_kind(stop),
                                          sb->reason);
}

/* One bitmap the load found, as a persistent bitmap of the node (drained). */
static void
adopt(Binding *b, const CbtStoreBitmap *sb, CbtStoreStop stop)
{
  CbtDirtyBitmap *dbm =
    cbt_dirty_bitmap_new(sb->name, cbt_blockdev_get_size(b->bd), sb->granularity);

  cbt_dirty_bitmap_set_persistent(dbm, TRUE);
  cbt_dirty_bitmap_set_identity(dbm, sb->id.uuid, sb->id.created, sb->id.broken);
  if (sb->inconsistent) {
    cbt_dirty_bitmap_set_inconsistent(dbm);
  } else {
    CbtBitmap *bits = cbt_store_take_bitmap(b->store, sb->name);
    g_assert(bits);
    cbt_bitmap_free(cbt_dirty_bitmap_swap_bitmap(dbm, bits));
    cbt_dirty_bitmap_set_recording(dbm, sb->recording);
  }
  cbt_dirty_bitmaps_attach(b->bd, dbm);

  Recovery *r = g_new0(Recovery, 1);
  r->stop = stop;
  r->widened = sb->widened;
  r->reason = g_strdup(sb->reason);
  if (!recoveries)
    recoveries = g_hash_table_new_full(NULL, NULL, NULL, recovery_free);
  g_hash_table_insert(recoveries, dbm, r);
  report_loaded(b, sb, stop);
}

/* The node opened and its store file exists: attach it and adopt its bitmaps, or say why not. */
static void
load(Binding *b, gboolean protocol_below_format)
{
  g_autoptr(GError) error = NULL;
  const char *node = cbt_blockdev_get_node_name(b->bd);
  Binding *owner = store_owner(b->path);

  if (owner) {
    b->refusal = g_strdup_printf("bitmap store '%s' is used by node '%s'", b->path,
                                 cbt_blockdev_get_node_name(owner->bd));
    return;
  }
  CbtStore *store = open_store(b, FALSE, &error);
  if (!store) {
    b->refusal = g_strdup_printf("bitmap store '%s' not attached: %s", b->path, error->message);
    /* A store made for a raw node above is foreign to its file node: expected, not alarming. */
    if (g_error_matches(error, CBT_STORE_ERROR, CBT_STORE_ERROR_FOREIGN) && protocol_below_format)
      g_message("node %s: %s (the store of a raw node above this one, if one opens)", node,
                b->refusal);
    else
      g_warning("node %s: %s; its bitmaps are not loaded and persistent bitmaps are refused", node,
                b->refusal);
    return;
  }
  attached(b, store);
  GPtrArray *loaded = cbt_store_loaded(store);
  CbtStoreStop stop = cbt_store_last_stop(store);
  cbt_blockdev_drain_begin(b->bd);
  for (guint i = 0; loaded && i < loaded->len; i++)
    adopt(b, g_ptr_array_index(loaded, i), stop);
  refresh_observer(b);
  cbt_blockdev_drain_end(b->bd);
}

static void
binding_free(gpointer p)
{
  Binding *b = p;

  g_free(b->path);
  g_free(b->refusal);
  g_free(b->identity);
  g_free(b);
}

static void
node_opened(CbtBlockdev *bd, gpointer data, gpointer user_data)
{
  CbtBlockdevStoreInfo info;
  g_autoptr(GError) error = NULL;

  if (!cbt_blockdev_get_store_info(bd, &info))
    return;
  Binding *b = g_new0(Binding, 1);
  b->bd = bd;
  b->sync_interval_ms = info.sync_interval_ms;
  b->region_size = info.region_size;
  if (!bindings)
    bindings = g_hash_table_new_full(NULL, NULL, NULL, binding_free);
  g_hash_table_insert(bindings, bd, b);

  if (cbt_blockdev_is_read_only(bd)) {
    b->refusal = g_strdup("the node is read-only (its bitmap store is not loaded)");
    return;
  }
  b->path = store_path(&info, &b->refusal);
  if (!b->path)
    return;
  b->identity = device_identity(&info, &error);
  if (!b->identity) {
    b->refusal = g_strdup(error->message);
    g_warning("node %s: %s", cbt_blockdev_get_node_name(bd), b->refusal);
    return;
  }
  if (g_file_test(b->path, G_FILE_TEST_EXISTS))
    load(b, !info.via_format);
}

/* ---- closing ------------------------------------------------------------------------------- */

void
cbt_dirty_bitmaps_persist_node_closing(CbtBlockdev *bd)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) error = NULL;

  if (!b)
    return;
  if (b->observing)
    cbt_blockdev_remove_write_observer(bd, observe_write, b->store);
  /* Before the table frees the bitmaps: the store borrows their bits. */
  if (b->store && !cbt_store_close(g_steal_pointer(&b->store), &error))
    g_warning("node %s: bitmap store %s was not closed cleanly (the next start recovers it as "
              "after a crash): %s",
              cbt_blockdev_get_node_name(bd), b->path, error->message);
  g_hash_table_remove(bindings, bd);
}

/* ---- resize ---------------------------------------------------------------------------------- */

/* The same path as an open that finds the device resized (load.c's settle): each bitmap's bits
 * first (replace_bitmap writes what fits the old area), then every area fitted to the new size
 * and written, then the directory. The node is drained throughout, so no mark runs between the
 * steps; a failing step demotes the bitmaps it concerns, which go on recording in memory. */
void
cbt_dirty_bitmaps_persist_resized(CbtBlockdev *bd)
{
  Binding *b = binding_of(bd);
  GPtrArray *arr = cbt_dirty_bitmaps_list(bd);
  g_autoptr(GPtrArray) failed = g_ptr_array_new();
  g_autoptr(GError) error = NULL;

  if (!b || !b->store)
    return;
  for (guint i = 0; arr && i < arr->len; i++) {
    CbtDirtyBitmap *dbm = g_ptr_array_index(arr, i);
    g_autoptr(GError) local = NULL;
    if (!cbt_dirty_bitmap_is_persistent(dbm) || cbt_dirty_bitmap_is_inconsistent(dbm))
      continue;
    if (!cbt_store_replace_bitmap(b->store, cbt_dirty_bitmap_get_name(dbm),
                                  cbt_dirty_bitmap_get_bitmap(dbm), &local)) {
      g_ptr_array_add(failed, dbm);
      if (!error)
        error = g_steal_pointer(&local);
    }
  }
  g_autoptr(GError) resize_error = NULL;
  if (!cbt_store_resize(b->store, cbt_blockdev_get_size(bd), &resize_error)) {
    for (guint i = 0; arr && i < arr->len; i++) {
      CbtDirtyBitmap *dbm = g_ptr_array_index(arr, i);
      if (cbt_dirty_bitmap_is_persistent(dbm) && !g_ptr_array_find(failed, dbm, NULL))
        g_ptr_array_add(failed, dbm);
    }
    if (!error)
      error = g_steal_pointer(&resize_error);
  }
  for (guint i = 0; i < failed->len; i++)
    cbt_dirty_bitmaps_persist_demote(bd, g_ptr_array_index(failed, i), error);
}

/* ---- the commands' durable steps ----------------------------------------------------------- */

gboolean
cbt_dirty_bitmaps_persist_check(CbtBlockdev *bd, GError **error)
{
  Binding *b = binding_of(bd);
  const char *node = cbt_blockdev_get_node_name(bd);

  if (!b) {
    cbt_dirty_bitmaps_error(error, "Can't store persistent bitmaps to %s: Operation not supported",
                            node);
    return FALSE;
  }
  if (b->refusal) {
    cbt_dirty_bitmaps_error(error, "Can't store persistent bitmaps to %s: %s", node, b->refusal);
    return FALSE;
  }
  return TRUE;
}

/* The store of @b, created with its directory on the first persistent bitmap. */
static CbtStore *
ensure_store(Binding *b, GError **error)
{
  g_autoptr(GError) local = NULL;
  const char *node = cbt_blockdev_get_node_name(b->bd);

  if (b->store)
    return b->store;
  Binding *owner = store_owner(b->path);
  if (owner) {
    cbt_dirty_bitmaps_error(error,
                            "Can't store persistent bitmaps to %s: bitmap store '%s' is used by "
                            "node '%s'",
                            node, b->path, cbt_blockdev_get_node_name(owner->bd));
    return NULL;
  }
  g_autofree char *dir = g_path_get_dirname(b->path);
  if (g_mkdir_with_parents(dir, 0700) < 0) {
    cbt_dirty_bitmaps_error(error,
                            "Can't store persistent bitmaps to %s: Could not create '%s': %s", node,
                            dir, g_strerror(errno));
    return NULL;
  }
  CbtStore *store = open_store(b, TRUE, &local);
  if (!store) {
    cbt_dirty_bitmaps_error(error, "Can't store persistent bitmaps to %s: %s", node,
                            local->message);
    return NULL;
  }
  attached(b, store);
  return store;
}

/* A store call's error, named for the bitmap. */
static void
store_failed(GError **error, CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError *local)
{
  cbt_dirty_bitmaps_error(error, "Bitmap '%s' of node '%s': %s", cbt_dirty_bitmap_get_name(dbm),
                          cbt_blockdev_get_node_name(bd), local->message);
}

gboolean
cbt_dirty_bitmaps_persist_add(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) local = NULL;

  if (!cbt_dirty_bitmaps_persist_check(bd, error))
    return FALSE;
  CbtStore *store = ensure_store(b, error);
  if (!store)
    return FALSE;
  CbtStoreIdentity id = { .created = cbt_dirty_bitmap_get_created(dbm),
                          .broken = cbt_dirty_bitmap_get_break(dbm) };
  memcpy(id.uuid, cbt_dirty_bitmap_get_uuid(dbm), 16);
  if (!cbt_store_add_full(store, cbt_dirty_bitmap_get_name(dbm), cbt_dirty_bitmap_get_bitmap(dbm),
                          cbt_dirty_bitmap_is_recording(dbm), &id, &local)) {
    store_failed(error, bd, dbm, local);
    return FALSE;
  }
  refresh_observer(b);
  return TRUE;
}

gboolean
cbt_dirty_bitmaps_persist_remove(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) local = NULL;

  g_return_val_if_fail(b && b->store, FALSE);
  if (!cbt_store_remove(b->store, cbt_dirty_bitmap_get_name(dbm), &local)) {
    store_failed(error, bd, dbm, local);
    return FALSE;
  }
  /* The store no longer marks it; the caller detaches it, or demotes it (then it is tracked). */
  return TRUE;
}

gboolean
cbt_dirty_bitmaps_persist_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording,
                                        GError **error)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) local = NULL;

  g_return_val_if_fail(b && b->store, FALSE);
  if (!cbt_dirty_bitmap_is_recording(dbm) == !recording)
    return TRUE;
  if (!cbt_store_set_recording(b->store, cbt_dirty_bitmap_get_name(dbm), recording, &local)) {
    store_failed(error, bd, dbm, local);
    return FALSE;
  }
  cbt_dirty_bitmap_set_recording(dbm, recording);
  refresh_observer(b);
  return TRUE;
}

gboolean
cbt_dirty_bitmaps_persist_set_break(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) local = NULL;

  g_return_val_if_fail(b && b->store, FALSE);
  if (!cbt_store_set_broken(b->store, cbt_dirty_bitmap_get_name(dbm),
                            cbt_dirty_bitmap_get_break(dbm), &local)) {
    store_failed(error, bd, dbm, local);
    return FALSE;
  }
  return TRUE;
}

gboolean
cbt_dirty_bitmaps_persist_rewrite(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error)
{
  Binding *b = binding_of(bd);
  g_autoptr(GError) local = NULL;

  g_return_val_if_fail(b && b->store, FALSE);
  if (!cbt_store_rewrite(b->store, cbt_dirty_bitmap_get_name(dbm), &local)) {
    store_failed(error, bd, dbm, local);
    return FALSE;
  }
  return TRUE;
}

/* A store call for @dbm failed (@why) after memory was put back: memory and store may now
 * disagree (a failed rewrite leaves the store's entry inconsistent, and the store stops marking
 * it). The safe side is a bitmap the store no longer brings back (the next backup is a full one)
 * and that goes on recording in memory; if the store cannot even let go of it, the bitmap is
 * inconsistent in memory too, as it will be after a restart. TRUE when it stays usable. */
gboolean
cbt_dirty_bitmaps_persist_demote(CbtBlockdev *bd, CbtDirtyBitmap *dbm, const GError *why)
{
  g_autoptr(GError) error = NULL;
  const char *node = cbt_blockdev_get_node_name(bd), *name = cbt_dirty_bitmap_get_name(dbm);

  if (!cbt_dirty_bitmaps_persist_remove(bd, dbm, &error)) {
    g_warning("node %s: bitmap %s is inconsistent: the store failed (%s) and could not drop it "
              "(%s)",
              node, name, why->message, error->message);
    cbt_dirty_bitmap_set_inconsistent(dbm);
    cbt_dirty_bitmaps_persist_refresh(bd);
    return FALSE;
  }
  g_warning("node %s: bitmap %s is no longer persistent (it goes on in memory): %s", node, name,
            why->message);
  cbt_dirty_bitmaps_persist_untie(bd, dbm);
  return TRUE;
}

/* @dbm is out of its store (drained): from now on the node tracks it like any other bitmap. */
void
cbt_dirty_bitmaps_persist_untie(CbtBlockdev *bd, CbtDirtyBitmap *dbm)
{
  cbt_dirty_bitmap_set_persistent(dbm, FALSE);
  if (cbt_dirty_bitmap_is_recording(dbm))
    cbt_blockdev_track_bitmap(bd, cbt_dirty_bitmap_get_bitmap(dbm));
  cbt_dirty_bitmaps_persist_refresh(bd);
}

void
cbt_dirty_bitmaps_persist_refresh(CbtBlockdev *bd)
{
  Binding *b = binding_of(bd);

  if (b)
    refresh_observer(b);
}

/* ---- the query ------------------------------------------------------------------------------ */

/* The binding whose node has @dbm, or NULL. */
static Binding *
binding_having(const CbtDirtyBitmap *dbm)
{
  GHashTableIter it;
  gpointer value;

  if (!bindings)
    return NULL;
  g_hash_table_iter_init(&it, bindings);
  while (g_hash_table_iter_next(&it, NULL, &value)) {
    GPtrArray *arr = cbt_dirty_bitmaps_list(((Binding *)value)->bd);
    if (arr && g_ptr_array_find(arr, dbm, NULL))
      return value;
  }
  return NULL;
}

void
cbt_dirty_bitmaps_persist_fill_info(const CbtDirtyBitmap *dbm, CbtQmpBlockDirtyInfo *info)
{
  Recovery *r = recoveries ? g_hash_table_lookup(recoveries, dbm) : NULL;

  if (cbt_dirty_bitmap_is_persistent(dbm)) {
    Binding *b = binding_having(dbm);
    info->has_store_degraded = info->store_degraded =
      b && b->store && cbt_store_is_degraded(b->store);
  }
  if (!r)
    return;
  info->has_recovery = TRUE;
  info->recovery = stop_kind(r->stop);
  info->has_recovered_widening = TRUE;
  info->recovered_widening = r->widened;
  info->recovery_reason = g_strdup(r->reason);
}

void
cbt_dirty_bitmaps_persist_forget(CbtDirtyBitmap *dbm)
{
  if (recoveries)
    g_hash_table_remove(recoveries, dbm);
}

void
cbt_dirty_bitmaps_persist_init(void)
{
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_OPENED, node_opened, NULL);
}
