/* tools/backup/server.c — the QMP side of a backup: the daemon, the chain proof, the frozen view.
 *
 * On cbtd a view is one command: block-export-add with `snapshot`, the old checkpoint published
 * as it was at the instant and the new one started in the same instant (docs/user-guide.md).
 *
 * On qemu-storage-daemon 7.2 it is QEMU's fleecing, several commands that cannot be one step:
 *   1. the new checkpoint starts (block-dirty-bitmap-add): every later write is in it;
 *   2. a scratch node and a copy-before-write filter over the node's file child;
 *   3. blockdev-reopen puts the filter under the node: the instant of the view;
 *   4. a snapshot-access node reads the view; for an incremental, a frozen copy of the old
 *      checkpoint is taken now (after the instant) and published with the export.
 * A write between 1 and 3 is in the view and in the new checkpoint: the next incremental copies
 * it again (a widening, never a loss). The old checkpoint records all along, so its copy taken
 * after 3 holds every write up to the instant (and some after it, read from the view: harmless).
 *
 * Every name this file gives the daemon starts with the repository's prefix, so what a killed
 * run left behind is found and removed by the next one (cbt_backup_server_clean_stale()).
 */
#include "backup.h"

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <string.h>
#include <unistd.h>

#include "common/qmp-client.h"

struct CbtBackupServer {
  CbtQmpClient *qmp;
  char *prefix;
  char *name;
  gboolean cbtd;
  char *scratch_path; /* qemu-storage-daemon: the scratch file we made */
};

static char *
quote(const char *s)
{
  g_autoptr(JsonNode) n = json_node_init_string(json_node_alloc(), s);
  return json_to_string(n, FALSE);
}

/* Run @cmd with arguments given as JSON text (NULL: none). */
static JsonNode *
call(CbtBackupServer *s, const char *cmd, const char *args, GError **error)
{
  g_autoptr(JsonObject) obj = NULL;

  if (args) {
    g_autoptr(GError) local = NULL;
    g_autoptr(JsonNode) n = json_from_string(args, &local);
    g_assert(n && JSON_NODE_HOLDS_OBJECT(n)); /* our own text */
    obj = json_object_ref(json_node_get_object(n));
  }
  JsonNode *r = cbt_qmp_client_call(s->qmp, cmd, obj, error);
  if (!r)
    g_prefix_error(error, "%s: ", cmd);
  return r;
}

static gboolean
call_ok(CbtBackupServer *s, const char *cmd, const char *args, GError **error)
{
  g_autoptr(JsonNode) r = call(s, cmd, args, error);
  return r != NULL;
}

/* Best effort (teardown): a failure is logged, a missing object is what we wanted. */
static void
call_quiet(CbtBackupServer *s, const char *cmd, const char *args)
{
  g_autoptr(GError) err = NULL;
  if (!call_ok(s, cmd, args, &err) && !strstr(err->message, "not found") &&
      !strstr(err->message, "Cannot find") && !strstr(err->message, "Failed to find"))
    g_printerr("cbt-backup: warning: %s\n", err->message);
}

CbtBackupServer *
cbt_backup_server_connect(const char *qmp_path, const char *prefix, GError **error)
{
  g_autoptr(GError) local = NULL;
  CbtQmpClient *c = cbt_qmp_client_connect_unix(qmp_path, TRUE, 60000, &local);

  if (!c) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "QMP %s: %s", qmp_path,
                local->message);
    return NULL;
  }
  CbtBackupServer *s = g_new0(CbtBackupServer, 1);
  s->qmp = c;
  s->prefix = g_strdup(prefix);
  JsonObject *qmp = json_object_get_object_member(cbt_qmp_client_greeting(c), "QMP");
  JsonObject *ver = qmp ? json_object_get_object_member(qmp, "version") : NULL;
  const char *package = ver ? json_object_get_string_member_with_default(ver, "package", "") : "";
  JsonObject *q = ver ? json_object_get_object_member(ver, "qemu") : NULL;
  s->cbtd = g_str_has_prefix(package, "cbtd");
  if (s->cbtd)
    s->name = g_strdup(package);
  else
    s->name = g_strdup_printf("qemu-storage-daemon %" G_GINT64_FORMAT ".%" G_GINT64_FORMAT,
                              q ? json_object_get_int_member(q, "major") : 0,
                              q ? json_object_get_int_member(q, "minor") : 0);
  return s;
}

void
cbt_backup_server_free(CbtBackupServer *s)
{
  if (!s)
    return;
  cbt_qmp_client_free(s->qmp);
  g_free(s->prefix);
  g_free(s->name);
  g_free(s->scratch_path);
  g_free(s);
}

gboolean
cbt_backup_server_is_cbtd(CbtBackupServer *s)
{
  return s->cbtd;
}

const char *
cbt_backup_server_name(CbtBackupServer *s)
{
  return s->name;
}

static JsonObject *
find_node(JsonArray *nodes, const char *node)
{
  for (guint i = 0; nodes && i < json_array_get_length(nodes); i++) {
    JsonObject *n = json_array_get_object_element(nodes, i);
    if (g_strcmp0(json_object_get_string_member_with_default(n, "node-name", ""), node) == 0)
      return n;
  }
  return NULL;
}

static JsonNode *
query_nodes(CbtBackupServer *s, const char *node, JsonObject **found, GError **error)
{
  JsonNode *r = call(s, "query-named-block-nodes", NULL, error);
  if (!r)
    return NULL;
  *found = find_node(json_node_get_array(r), node);
  if (!*found) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "no node '%s' on %s", node,
                s->name);
    json_node_unref(r);
    return NULL;
  }
  return r;
}

guint64
cbt_backup_server_node_size(CbtBackupServer *s, const char *node, GError **error)
{
  JsonObject *n;
  g_autoptr(JsonNode) r = query_nodes(s, node, &n, error);
  if (!r)
    return 0;
  JsonObject *image = json_object_get_object_member(n, "image");
  return image ? (guint64)json_object_get_int_member(image, "virtual-size") : 0;
}

void
cbt_backup_bitmap_info_clear(CbtBackupBitmapInfo *info)
{
  g_clear_pointer(&info->uuid, g_free);
  g_clear_pointer(&info->broken_reason, g_free);
  memset(info, 0, sizeof(*info));
}

gboolean
cbt_backup_server_bitmap(CbtBackupServer *s, const char *node, const char *name,
                         CbtBackupBitmapInfo *out, GError **error)
{
  JsonObject *n;
  g_autoptr(JsonNode) r = query_nodes(s, node, &n, error);

  memset(out, 0, sizeof(*out));
  if (!r)
    return FALSE;
  JsonArray *bms = json_object_has_member(n, "dirty-bitmaps")
                     ? json_object_get_array_member(n, "dirty-bitmaps")
                     : NULL;
  for (guint i = 0; bms && i < json_array_get_length(bms); i++) {
    JsonObject *b = json_array_get_object_element(bms, i);
    if (g_strcmp0(json_object_get_string_member_with_default(b, "name", ""), name) != 0)
      continue;
    out->exists = TRUE;
    out->recording = json_object_get_boolean_member_with_default(b, "recording", FALSE);
    out->busy = json_object_get_boolean_member_with_default(b, "busy", FALSE);
    out->persistent = json_object_get_boolean_member_with_default(b, "persistent", FALSE);
    out->inconsistent = json_object_get_boolean_member_with_default(b, "inconsistent", FALSE);
    out->granularity = json_object_get_int_member_with_default(b, "granularity", 0);
    out->uuid = g_strdup(json_object_get_string_member_with_default(b, "bitmap-uuid", NULL));
    out->has_unbroken = json_object_has_member(b, "unbroken");
    out->unbroken = json_object_get_boolean_member_with_default(b, "unbroken", FALSE);
    out->broken_reason =
      g_strdup(json_object_get_string_member_with_default(b, "broken-reason", NULL));
  }
  return TRUE;
}

/* ---- names ------------------------------------------------------------------------------- */

static char *
name_of(CbtBackupServer *s, const char *what)
{
  return g_strdup_printf("%s-%s", s->prefix, what);
}

/* ---- cbtd: one call ---------------------------------------------------------------------- */

static gboolean
freeze_cbtd(CbtBackupServer *s, const CbtBackupFreezeArgs *a, CbtBackupView *v, GError **error)
{
  g_autofree char *id = name_of(s, "export");
  g_autofree char *qid = quote(id), *qnode = quote(a->node);
  g_autofree char *bitmaps = NULL, *extra = NULL;

  if (a->old_checkpoint) {
    g_autofree char *qold = quote(a->old_checkpoint);
    bitmaps = g_strdup_printf(", \"bitmaps\": [%s]", qold);
  }
  extra = g_strdup(bitmaps ? bitmaps : "");
  if (a->new_checkpoint) {
    g_autofree char *e = extra, *qnew = quote(a->new_checkpoint);
    extra = g_strdup_printf("%s, \"checkpoint\": %s, \"checkpoint-persistent\": %s", e, qnew,
                            a->persistent ? "true" : "false");
  }
  if (a->new_checkpoint && a->granularity) {
    g_autofree char *e = extra;
    extra = g_strdup_printf("%s, \"checkpoint-granularity\": %u", e, a->granularity);
  }
  if (a->scratch_dir) {
    g_autofree char *e = extra, *qdir = quote(a->scratch_dir);
    extra = g_strdup_printf("%s, \"scratch-dir\": %s", e, qdir);
  }
  /* auto-remove: if this process dies after its first connection, the view goes with it. */
  g_autofree char *args =
    g_strdup_printf("{\"type\": \"nbd\", \"id\": %s, \"name\": %s, \"node-name\": %s, "
                    "\"snapshot\": true, \"auto-remove\": true%s}",
                    qid, qid, qnode, extra);
  if (!call_ok(s, "block-export-add", args, error)) {
    if (strstr((*error)->message, "is a 'file' node"))
      g_prefix_error(error, "back up a raw node over the file node instead (blockdev-add "
                            "driver=raw,file=FILE-NODE; the workload writes through it): ");
    return FALSE;
  }
  v->export_name = g_steal_pointer(&id);
  if (a->old_checkpoint) {
    v->dirty_context = g_strconcat("qemu:dirty-bitmap:", a->old_checkpoint, NULL);
    v->identity_context = g_strconcat("cbtd:bitmap-identity:", a->old_checkpoint, NULL);
  }
  return TRUE;
}

/* ---- qemu-storage-daemon: QEMU's fleecing --------------------------------------------- */

static char *
file_child(CbtBackupServer *s, const char *node, GError **error)
{
  g_autoptr(JsonNode) r = call(s, "x-debug-query-block-graph", NULL, error);
  if (!r)
    return NULL;
  JsonObject *g = json_node_get_object(r);
  JsonArray *nodes = json_object_get_array_member(g, "nodes");
  JsonArray *edges = json_object_get_array_member(g, "edges");
  gint64 parent = -1;
  for (guint i = 0; i < json_array_get_length(nodes); i++) {
    JsonObject *n = json_array_get_object_element(nodes, i);
    if (g_strcmp0(json_object_get_string_member_with_default(n, "name", ""), node) == 0)
      parent = json_object_get_int_member(n, "id");
  }
  for (guint i = 0; i < json_array_get_length(edges); i++) {
    JsonObject *e = json_array_get_object_element(edges, i);
    if (json_object_get_int_member(e, "parent") != parent ||
        g_strcmp0(json_object_get_string_member(e, "name"), "file") != 0)
      continue;
    gint64 child = json_object_get_int_member(e, "child");
    for (guint j = 0; j < json_array_get_length(nodes); j++) {
      JsonObject *n = json_array_get_object_element(nodes, j);
      if (json_object_get_int_member(n, "id") == child)
        return g_strdup(json_object_get_string_member(n, "name"));
    }
  }
  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
              "node '%s' has no 'file' child to fleece (give --file-node)", node);
  return NULL;
}

static gboolean
make_scratch(CbtBackupServer *s, const CbtBackupFreezeArgs *a, GError **error)
{
  g_autofree char *base = name_of(s, "scratch.img");
  s->scratch_path = g_build_filename(a->scratch_dir ? a->scratch_dir : g_get_tmp_dir(), base, NULL);
  int fd = g_open(s->scratch_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate(fd, (off_t)a->size) < 0) {
    int err = errno;
    if (fd >= 0)
      close(fd);
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "scratch file %s: %s",
                s->scratch_path, g_strerror(err));
    return FALSE;
  }
  close(fd);
  return TRUE;
}

static gboolean
freeze_qsd(CbtBackupServer *s, const CbtBackupFreezeArgs *a, CbtBackupView *v, GError **error)
{
  g_autofree char *file = a->file_node ? g_strdup(a->file_node) : file_child(s, a->node, error);
  if (!file || !make_scratch(s, a, error))
    return FALSE;
  g_autofree char *scratch = name_of(s, "scratch"), *cbw = name_of(s, "cbw");
  g_autofree char *snap = name_of(s, "snap"), *frozen = name_of(s, "frozen");
  g_autofree char *id = name_of(s, "export");
  g_autofree char *qnode = quote(a->node), *qfile = quote(file), *qscratch = quote(scratch);
  g_autofree char *qcbw = quote(cbw), *qsnap = quote(snap), *qid = quote(id);
  g_autofree char *qpath = quote(s->scratch_path);
  g_autofree char *qnew = a->new_checkpoint ? quote(a->new_checkpoint) : NULL;
  g_autofree char *gran =
    a->granularity ? g_strdup_printf(", \"granularity\": %u", a->granularity) : g_strdup("");

  g_autofree char *add_cp =
    qnew ? g_strdup_printf("{\"node\": %s, \"name\": %s, \"persistent\": %s%s}", qnode, qnew,
                           a->persistent ? "true" : "false", gran)
         : NULL;
  g_autofree char *add_scratch =
    g_strdup_printf("{\"driver\": \"file\", \"node-name\": %s, \"filename\": %s}", qscratch, qpath);
  g_autofree char *add_cbw = g_strdup_printf(
    "{\"driver\": \"copy-before-write\", \"node-name\": %s, \"file\": %s, \"target\": %s, "
    "\"on-cbw-error\": \"break-snapshot\"}",
    qcbw, qfile, qscratch);
  g_autofree char *reopen = g_strdup_printf(
    "{\"options\": [{\"driver\": \"raw\", \"node-name\": %s, \"file\": %s}]}", qnode, qcbw);
  g_autofree char *add_snap = g_strdup_printf(
    "{\"driver\": \"snapshot-access\", \"node-name\": %s, \"file\": %s}", qsnap, qcbw);
  if ((a->new_checkpoint && !call_ok(s, "block-dirty-bitmap-add", add_cp, error)) ||
      !call_ok(s, "blockdev-add", add_scratch, error) ||
      !call_ok(s, "blockdev-add", add_cbw, error) || !call_ok(s, "blockdev-reopen", reopen, error))
    return FALSE;
  v->frozen_at = cbt_backup_now_iso();
  if (!call_ok(s, "blockdev-add", add_snap, error))
    return FALSE;

  g_autofree char *bitmaps = g_strdup("");
  if (a->old_checkpoint) {
    g_autofree char *qold = quote(a->old_checkpoint), *qfrozen = quote(frozen);
    g_autofree char *txn = g_strdup_printf(
      "{\"actions\": [{\"type\": \"block-dirty-bitmap-add\", \"data\": {\"node\": %s, "
      "\"name\": %s, \"disabled\": true, \"granularity\": %u}}, "
      "{\"type\": \"block-dirty-bitmap-merge\", \"data\": {\"node\": %s, \"target\": %s, "
      "\"bitmaps\": [%s]}}]}",
      qnode, qfrozen, a->granularity ? a->granularity : 65536, qnode, qfrozen, qold);
    if (!call_ok(s, "transaction", txn, error))
      return FALSE;
    g_free(bitmaps);
    bitmaps = g_strdup_printf(", \"bitmaps\": [{\"node\": %s, \"name\": %s}]", qnode, qfrozen);
    v->dirty_context = g_strconcat("qemu:dirty-bitmap:", frozen, NULL);
  }
  g_autofree char *add_export = g_strdup_printf(
    "{\"type\": \"nbd\", \"id\": %s, \"name\": %s, \"node-name\": %s%s}", qid, qid, qsnap, bitmaps);
  if (!call_ok(s, "block-export-add", add_export, error))
    return FALSE;
  v->export_name = g_steal_pointer(&id);
  return TRUE;
}

gboolean
cbt_backup_server_freeze(CbtBackupServer *s, const CbtBackupFreezeArgs *a, CbtBackupView *v,
                         GError **error)
{
  memset(v, 0, sizeof(*v));
  if (s->cbtd) {
    if (!freeze_cbtd(s, a, v, error))
      return FALSE;
    v->frozen_at = cbt_backup_now_iso();
    return TRUE;
  }
  if (freeze_qsd(s, a, v, error))
    return TRUE;
  cbt_backup_server_release(s, a, FALSE);
  return FALSE;
}

void
cbt_backup_view_clear(CbtBackupView *v)
{
  g_free(v->export_name);
  g_free(v->dirty_context);
  g_free(v->identity_context);
  g_free(v->frozen_at);
  memset(v, 0, sizeof(*v));
}

/* ---- teardown ------------------------------------------------------------------------------ */

/* The export, and once BLOCK_EXPORT_DELETED says it is gone, nothing reads the nodes. */
static void
del_export(CbtBackupServer *s)
{
  g_autofree char *id = name_of(s, "export"), *qid = quote(id);
  g_autofree char *args = g_strdup_printf("{\"id\": %s, \"mode\": \"hard\"}", qid);
  g_autoptr(GError) err = NULL;
  g_autoptr(JsonNode) r = call(s, "query-block-exports", NULL, &err);
  gboolean present = FALSE;

  for (guint i = 0; r && i < json_array_get_length(json_node_get_array(r)); i++) {
    JsonObject *e = json_array_get_object_element(json_node_get_array(r), i);
    present |= g_strcmp0(json_object_get_string_member(e, "id"), id) == 0;
  }
  if (!present || !call_ok(s, "block-export-del", args, NULL))
    return;
  for (int i = 0; i < 100; i++) {
    g_autoptr(JsonObject) ev = cbt_qmp_client_next_event(s->qmp, 100, NULL);
    if (ev && g_strcmp0(json_object_get_string_member(ev, "event"), "BLOCK_EXPORT_DELETED") == 0)
      return;
  }
}

static void
remove_bitmap(CbtBackupServer *s, const char *node, const char *name)
{
  g_autofree char *qnode = quote(node), *qname = quote(name);
  g_autofree char *args = g_strdup_printf("{\"node\": %s, \"name\": %s}", qnode, qname);
  CbtBackupBitmapInfo info;

  if (cbt_backup_server_bitmap(s, node, name, &info, NULL) && info.exists)
    call_quiet(s, "block-dirty-bitmap-remove", args);
  cbt_backup_bitmap_info_clear(&info);
}

static gboolean
node_exists(CbtBackupServer *s, const char *node)
{
  g_autoptr(JsonNode) r = call(s, "query-named-block-nodes", NULL, NULL);
  return r && find_node(json_node_get_array(r), node);
}

/* qemu-storage-daemon: the fleecing nodes in reverse, the node back on its file child. */
static void
unfleece(CbtBackupServer *s, const char *node, const char *file_node)
{
  g_autofree char *scratch = name_of(s, "scratch"), *cbw = name_of(s, "cbw");
  g_autofree char *snap = name_of(s, "snap");

  if (node_exists(s, snap)) {
    g_autofree char *qn = quote(snap), *args = g_strdup_printf("{\"node-name\": %s}", qn);
    call_quiet(s, "blockdev-del", args);
  }
  if (node_exists(s, cbw)) {
    g_autoptr(GError) err = NULL;
    g_autofree char *file = file_node ? g_strdup(file_node) : NULL;
    if (!file) {
      /* The filter's own file child is the node's original file node. */
      g_autofree char *f = file_child(s, cbw, &err);
      file = g_steal_pointer(&f);
    }
    if (file) {
      g_autofree char *qnode = quote(node), *qfile = quote(file);
      g_autofree char *reopen = g_strdup_printf(
        "{\"options\": [{\"driver\": \"raw\", \"node-name\": %s, \"file\": %s}]}", qnode, qfile);
      call_quiet(s, "blockdev-reopen", reopen);
    }
    g_autofree char *qcbw = quote(cbw), *args = g_strdup_printf("{\"node-name\": %s}", qcbw);
    call_quiet(s, "blockdev-del", args);
  }
  if (node_exists(s, scratch)) {
    g_autofree char *qs = quote(scratch), *args = g_strdup_printf("{\"node-name\": %s}", qs);
    call_quiet(s, "blockdev-del", args);
  }
  if (s->scratch_path)
    g_unlink(s->scratch_path);
}

void
cbt_backup_server_release(CbtBackupServer *s, const CbtBackupFreezeArgs *a, gboolean committed)
{
  del_export(s);
  if (!s->cbtd) {
    g_autofree char *frozen = name_of(s, "frozen");
    unfleece(s, a->node, a->file_node);
    remove_bitmap(s, a->node, frozen);
  }
  /* The point is safe: the new checkpoint covers everything since its instant. Otherwise the
   * old one still covers everything since the last point: the new one would only cost. */
  if (committed && a->old_checkpoint)
    remove_bitmap(s, a->node, a->old_checkpoint);
  else if (!committed && a->new_checkpoint)
    remove_bitmap(s, a->node, a->new_checkpoint);
}

void
cbt_backup_server_clean_stale(CbtBackupServer *s, const char *node, const char *keep)
{
  JsonObject *n;
  g_autoptr(JsonNode) r = NULL;
  g_autofree char *mine = g_strconcat(s->prefix, "-", NULL);

  del_export(s);
  if (!s->cbtd) {
    unfleece(s, node, NULL);
    g_autofree char *base = name_of(s, "scratch.img");
    g_autofree char *path = g_build_filename(g_get_tmp_dir(), base, NULL);
    g_unlink(path);
  }
  r = query_nodes(s, node, &n, NULL);
  if (!r)
    return;
  JsonArray *bms = json_object_has_member(n, "dirty-bitmaps")
                     ? json_object_get_array_member(n, "dirty-bitmaps")
                     : NULL;
  g_autoptr(GPtrArray) stale = g_ptr_array_new_with_free_func(g_free);
  for (guint i = 0; bms && i < json_array_get_length(bms); i++) {
    const char *name =
      json_object_get_string_member_with_default(json_array_get_object_element(bms, i), "name", "");
    if (g_str_has_prefix(name, mine) && g_strcmp0(name, keep) != 0)
      g_ptr_array_add(stale, g_strdup(name));
  }
  for (guint i = 0; i < stale->len; i++)
    remove_bitmap(s, node, g_ptr_array_index(stale, i));
}
