/* tools/backup/take.c — one backup: prove the chain, freeze a view, copy, commit, release.
 *
 * Invariants (each survives a failure or a kill at any instant):
 *   1. A point exists only once its manifest exists; the manifest is written last, atomically,
 *      after its image is complete and durable. An image without a manifest (N.qcow2.part) is
 *      a failed run's leftover and is deleted by the next run.
 *   2. The checkpoint the last point's manifest names is never removed before a newer point is
 *      committed: a failed, killed or refused backup leaves the chain as it was.
 *   3. An incremental is taken only from a checkpoint proven to be the one the last point
 *      started: present, recording, consistent and, on cbtd, the same identity with no break
 *      (docs/bitmaps.md, "Identity"), checked again over NBD at the instant of the view.
 */
#include "backup.h"

#include <glib/gstdio.h>
#include <string.h>

#define MAX_PIECE (4u << 20)

typedef struct {
  const CbtBackupRunArgs *a;
  CbtBackupRepo *repo;
  CbtBackupServer *server;
  JsonObject *base; /* the last point (incremental) */
  guint seq;
  guint64 size;
  CbtBackupFreezeArgs fz;
  char *new_checkpoint;
  CbtBackupView view;
  char *part, *image, *started, *fallback;
  guint64 tables; /* where the point's tables begin (qcow2.c) */
  struct nbd_handle *map;
} Take;

static gboolean
freeze(Take *t, GError **error)
{
  g_autoptr(GError) local = NULL;

  if (cbt_backup_server_freeze(t->server, &t->fz, &t->view, &local))
    return TRUE;
  /* No store for persistent bitmaps on this node: a checkpoint in memory still works while
   * the daemon runs (docs/backup-vendors.md). */
  if (t->a->persistent < 0 && t->fz.persistent && strstr(local->message, "persistent")) {
    g_printerr("cbt-backup: note: %s; the checkpoint is kept in memory only\n", local->message);
    t->fz.persistent = FALSE;
    return cbt_backup_server_freeze(t->server, &t->fz, &t->view, error);
  }
  g_propagate_error(error, g_steal_pointer(&local));
  return FALSE;
}

static gboolean
open_map(Take *t, GError **error)
{
  const char *contexts[] = { "base:allocation", t->view.dirty_context, NULL };

  t->map = cbt_backup_nbd_connect(&t->a->nbd, t->view.export_name, contexts, error);
  if (!t->map)
    return FALSE;
  for (guint i = 0; contexts[i]; i++)
    if (nbd_can_meta_context(t->map, contexts[i]) != 1) {
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "the view does not publish '%s'",
                  contexts[i]);
      return FALSE;
    }
  return TRUE;
}

static gboolean
copy_into_part(Take *t, GArray *pieces, CbtBackupCopyStats *st, GError **error)
{
  const char *backing = t->base ? cbt_backup_manifest_str(t->base, "file") : NULL;
  CbtBackupQcow2 *img = cbt_backup_qcow2_create(t->part, backing, t->size, error);
  if (!img)
    return FALSE;
  guint conns = nbd_can_multi_conn(t->map) == 1 ? MAX(t->a->connections, 1) : 1;
  g_autoptr(CbtBackupProgress) prog = NULL;
  prog = cbt_backup_progress_new(t->a->progress, "copy", cbt_backup_map_bytes(pieces));
  CbtBackupCopyArgs ca = { .source = &t->a->nbd,
                           .source_export = t->view.export_name,
                           .target = img,
                           .connections = conns,
                           .write_zeroes = t->base != NULL,
                           .max_rate = t->a->max_rate,
                           .progress = prog };
  gboolean ok = cbt_backup_copy(&ca, pieces, st, error) && cbt_backup_qcow2_finish(img, error);
  t->tables = cbt_backup_qcow2_tables_offset(img);
  cbt_backup_qcow2_free(img);
  return ok;
}

static JsonObject *
manifest(Take *t, GArray *pieces, const CbtBackupCopyStats *st, const CbtBackupBitmapInfo *cp)
{
  JsonObject *m = json_object_new();
  g_autofree char *file = cbt_backup_point_name(t->seq, ".qcow2");
  g_autofree char *finished = cbt_backup_now_iso();

  json_object_set_string_member(m, "format", "cbt-backup-point/1");
  json_object_set_int_member(m, "seq", t->seq);
  json_object_set_string_member(m, "kind", t->base ? "incremental" : "full");
  json_object_set_string_member(m, "file", file);
  if (t->base)
    json_object_set_string_member(m, "backing", cbt_backup_manifest_str(t->base, "file"));
  else
    json_object_set_null_member(m, "backing");
  json_object_set_string_member(m, "node", t->a->node);
  json_object_set_string_member(m, "server", cbt_backup_server_name(t->server));
  json_object_set_string_member(m, "checkpoint", t->new_checkpoint);
  if (cp->uuid)
    json_object_set_string_member(m, "checkpoint-uuid", cp->uuid);
  json_object_set_int_member(m, "checkpoint-granularity", cp->granularity);
  json_object_set_boolean_member(m, "checkpoint-persistent", cp->persistent);
  if (t->base) {
    JsonObject *b = json_object_new();
    json_object_set_int_member(b, "seq", json_object_get_int_member(t->base, "seq"));
    json_object_set_string_member(b, "checkpoint", cbt_backup_manifest_str(t->base, "checkpoint"));
    if (cbt_backup_manifest_str(t->base, "checkpoint-uuid"))
      json_object_set_string_member(b, "checkpoint-uuid",
                                    cbt_backup_manifest_str(t->base, "checkpoint-uuid"));
    json_object_set_object_member(m, "based-on", b);
  }
  if (t->fallback)
    json_object_set_string_member(m, "fallback-reason", t->fallback);
  json_object_set_int_member(m, "size", t->size);
  json_object_set_int_member(m, "bytes-read", st->read);
  json_object_set_int_member(m, "bytes-written", st->written);
  json_object_set_int_member(m, "bytes-zeroed", st->zeroed);
  json_object_set_string_member(m, "started", t->started);
  json_object_set_string_member(m, "frozen", t->view.frozen_at);
  json_object_set_string_member(m, "finished", finished);
  json_object_set_array_member(m, "pieces", cbt_backup_pieces_to_json(pieces));
  return m;
}

/* Invariant 1: the image complete and durable under its final name, then the manifest. */
static gboolean
commit(Take *t, GArray *pieces, const CbtBackupCopyStats *st, GError **error)
{
  CbtBackupBitmapInfo cp;
  if (!cbt_backup_fsync_path(t->part, error) ||
      !cbt_backup_server_bitmap(t->server, t->a->node, t->new_checkpoint, &cp, error))
    return FALSE;
  gboolean ok = FALSE;
  if (!cp.exists) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                "the new checkpoint '%s' is gone from node '%s'", t->new_checkpoint, t->a->node);
  } else if (g_rename(t->part, t->image) < 0) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "rename %s: %s", t->part,
                g_strerror(errno));
  } else if (!cbt_backup_fsync_path(t->repo->path, error)) {
    g_unlink(t->image); /* the name must be durable before a manifest can point at it */
  } else {
    g_autofree char *name = cbt_backup_point_name(t->seq, ".json");
    g_autoptr(JsonObject) m = manifest(t, pieces, st, &cp);
    ok = cbt_backup_image_describe(m, t->image, t->tables, error) &&
         cbt_backup_repo_write_json(t->repo, name, m, error);
    if (ok)
      g_ptr_array_add(t->repo->points, json_object_ref(m));
    else
      g_unlink(t->image);
  }
  cbt_backup_bitmap_info_clear(&cp);
  return ok;
}

static void
report(Take *t, const CbtBackupCopyStats *st)
{
  JsonObject *m = cbt_backup_repo_last(t->repo);
  g_autoptr(JsonObject) o = json_object_new();

  json_object_set_int_member(o, "seq", t->seq);
  json_object_set_string_member(o, "kind", t->base ? "incremental" : "full");
  json_object_set_string_member(o, "checkpoint", t->new_checkpoint);
  json_object_set_int_member(o, "bytes-read", st->read);
  json_object_set_int_member(o, "bytes-written", st->written);
  json_object_set_int_member(o, "bytes-zeroed", st->zeroed);
  json_object_set_string_member(o, "image", cbt_backup_manifest_str(m, "file"));
  if (t->fallback)
    json_object_set_string_member(o, "fallback-reason", t->fallback);
  if (t->a->progress == CBT_BACKUP_PROGRESS_JSON) {
    cbt_backup_progress_event(t->a->progress, "result", o);
    return;
  }
  g_print("point %u: %s backup of node '%s', %" G_GUINT64_FORMAT " bytes copied, %" G_GUINT64_FORMAT
          " zeroed, checkpoint %s%s%s\n",
          t->seq, t->base ? "incremental" : "full", t->a->node, st->written, st->zeroed,
          t->new_checkpoint, t->fallback ? "; a full because " : "",
          t->fallback ? t->fallback : "");
}

/* Choose full or incremental, the names and the checkpoint's properties. */
static gboolean
prepare(Take *t, gboolean incremental, GError **error)
{
  CbtBackupBitmapInfo old = { 0 };
  JsonObject *last = cbt_backup_repo_last(t->repo);
  g_autofree char *why = NULL;

  if (incremental && !last)
    why = g_strdup_printf("the repository %s has no point yet", t->repo->path);
  if (incremental && last) {
    t->base = last;
    why = cbt_backup_chain_refusal(t->server, t->repo, t->a->node, t->size, last, &old, error);
    if (!why && error && *error)
      return FALSE;
  }
  if (why && !t->a->auto_full) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_CHAIN,
                "cannot take an incremental backup: %s", why);
    cbt_backup_bitmap_info_clear(&old);
    return FALSE;
  }
  if (why) {
    t->base = NULL;
    t->fallback = g_steal_pointer(&why);
  }
  t->seq = last ? (guint)json_object_get_int_member(last, "seq") + 1 : 1;
  t->new_checkpoint = g_strdup_printf("%s-%u", t->repo->prefix, t->seq);
  t->fz.node = t->a->node;
  t->fz.file_node = t->a->file_node;
  t->fz.old_checkpoint = t->base ? cbt_backup_manifest_str(t->base, "checkpoint") : NULL;
  t->fz.new_checkpoint = t->new_checkpoint;
  t->fz.persistent = t->a->persistent >= 0 ? t->a->persistent : t->base ? old.persistent : TRUE;
  t->fz.granularity = t->a->granularity ? t->a->granularity : t->base ? old.granularity : 0;
  t->fz.scratch_dir = t->a->scratch_dir;
  t->fz.size = t->size;
  g_autofree char *pname = cbt_backup_point_name(t->seq, ".qcow2.part");
  g_autofree char *iname = cbt_backup_point_name(t->seq, ".qcow2");
  t->part = cbt_backup_repo_file(t->repo, pname);
  t->image = cbt_backup_repo_file(t->repo, iname);
  cbt_backup_bitmap_info_clear(&old);
  return TRUE;
}

static int
take(Take *t, gboolean incremental, GError **error)
{
  JsonObject *last;

  t->size = cbt_backup_server_node_size(t->server, t->a->node, error);
  if (!t->size)
    return CBT_BACKUP_EXIT_FAILED;
  last = cbt_backup_repo_last(t->repo);
  cbt_backup_server_clean_stale(t->server, t->a->node,
                                last ? cbt_backup_manifest_str(last, "checkpoint") : NULL);
  if (!prepare(t, incremental, error))
    return (*error)->code;
  if (!freeze(t, error))
    return CBT_BACKUP_EXIT_FAILED;
  g_autofree char *why = NULL;
  g_autoptr(GArray) pieces = NULL;
  CbtBackupCopyStats st = { 0 };
  gboolean ok = open_map(t, error) &&
                !(why = cbt_backup_instant_refusal(&t->a->nbd, &t->view, t->base, error)) &&
                !(error && *error) &&
                (pieces = cbt_backup_map(t->map, t->view.dirty_context, MAX_PIECE, error)) &&
                copy_into_part(t, pieces, &st, error) && commit(t, pieces, &st, error);
  if (why)
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_CHAIN,
                "cannot take an incremental backup: %s", why);
  if (t->map) {
    nbd_shutdown(t->map, 0);
    g_clear_pointer(&t->map, nbd_close);
  }
  g_unlink(t->part);
  cbt_backup_server_release(t->server, &t->fz, ok);
  if (!ok)
    return (*error)->code;
  /* Older checkpoints of this repository (a full restarts the chain) cost writes: remove. */
  cbt_backup_server_clean_stale(t->server, t->a->node, t->new_checkpoint);
  report(t, &st);
  return CBT_BACKUP_EXIT_OK;
}

int
cbt_backup_take(const CbtBackupRunArgs *a, gboolean incremental, GError **error)
{
  Take t = { .a = a };
  int rc;

  t.repo = cbt_backup_repo_open(a->repo, a->node, TRUE, TRUE, error);
  if (!t.repo)
    return (*error)->code;
  t.server = cbt_backup_server_connect(a->qmp, t.repo->prefix, error);
  if (!t.server) {
    cbt_backup_repo_free(t.repo);
    return CBT_BACKUP_EXIT_FAILED;
  }
  t.started = cbt_backup_now_iso();
  rc = take(&t, incremental, error);
  cbt_backup_view_clear(&t.view);
  cbt_backup_server_free(t.server);
  cbt_backup_repo_free(t.repo);
  g_free(t.new_checkpoint);
  g_free(t.part);
  g_free(t.image);
  g_free(t.started);
  g_free(t.fallback);
  return rc;
}
