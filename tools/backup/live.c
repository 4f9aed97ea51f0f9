/* tools/backup/live.c — verify --live: the last point against the disk as it is now.
 *
 * The last point's checkpoint has recorded every write since the point's instant. So in a
 * frozen view of the node taken now, every extent the checkpoint does not mark must read
 * exactly as the point does: a difference is a damaged point or a write the bitmap missed
 * (a write that went around the daemon, to the image file itself, is the usual one). Extents
 * the checkpoint marks changed since and are not compared. The view publishes the checkpoint as
 * it was at the view's instant and starts no new one; the chain stays as it was, whatever
 * happens here.
 */
#include "backup.h"

#include <string.h>

#define STEP (4u << 20)

typedef struct {
  const CbtBackupRunArgs *a;
  const char *node; /* --node, or the repository's */
  CbtBackupRepo *repo;
  CbtBackupServer *server;
  JsonObject *point;
  CbtBackupFreezeArgs fz;
  CbtBackupView view;
  struct nbd_handle *live, *saved;
  CbtBackupServe *serve;
  guint64 compared, changed;
  char *problem;
} Live;

/* Whether [off, off + len) reads the same in the view and in the point. */
static gboolean
same(Live *l, guint8 *x, guint8 *y, guint64 off, guint64 len, GError **error)
{
  if (nbd_pread(l->live, x, len, off, 0) == -1) {
    cbt_backup_nbd_error(error, "reading the view");
    return FALSE;
  }
  if (nbd_pread(l->saved, y, len, off, 0) == -1) {
    cbt_backup_nbd_error(error, "reading the point");
    return FALSE;
  }
  if (memcmp(x, y, len) == 0)
    return TRUE;
  guint64 at = 0;
  while (x[at] == y[at])
    at++;
  l->problem = g_strdup_printf("the data at offset %" G_GUINT64_FORMAT " differs from the live "
                               "disk, where checkpoint '%s' says nothing changed since the point",
                               off + at, l->fz.old_checkpoint);
  return FALSE;
}

static gboolean
compare(Live *l, GArray *clean, GError **error)
{
  g_autofree guint8 *x = g_malloc(STEP), *y = g_malloc(STEP);
  g_autoptr(CbtBackupProgress) prog =
    cbt_backup_progress_new(l->a->progress, "live", cbt_backup_map_bytes(clean));

  for (guint i = 0; i < clean->len; i++) {
    const CbtBackupPiece *p = &g_array_index(clean, CbtBackupPiece, i);
    if (!cbt_backup_check_interrupt(error) || !same(l, x, y, p->offset, p->length, error))
      return FALSE;
    l->compared += p->length;
    cbt_backup_progress_add(prog, p->length);
    cbt_backup_progress_tick(prog, i + 1 == clean->len);
  }
  return TRUE;
}

static gboolean
connect_both(Live *l, GError **error)
{
  const char *contexts[] = { l->view.dirty_context, NULL };
  g_autofree char *image = cbt_backup_repo_file(l->repo, cbt_backup_manifest_str(l->point, "file"));

  l->live = cbt_backup_nbd_connect(&l->a->nbd, l->view.export_name, contexts, error);
  if (!l->live)
    return FALSE;
  if (nbd_can_meta_context(l->live, l->view.dirty_context) != 1) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "the view does not publish '%s'",
                l->view.dirty_context);
    return FALSE;
  }
  l->serve = cbt_backup_serve(image, 1, error);
  if (!l->serve)
    return FALSE;
  l->saved = nbd_create();
  if (!l->saved || nbd_connect_uri(l->saved, cbt_backup_serve_uri(l->serve)) == -1) {
    cbt_backup_nbd_error(error, "serving the point");
    return FALSE;
  }
  return TRUE;
}

/* Prove the chain, freeze the view and compare. */
static int
run(Live *l, GError **error)
{
  CbtBackupBitmapInfo info = { 0 };
  gint64 seq = json_object_get_int_member(l->point, "seq");
  guint64 size = cbt_backup_server_node_size(l->server, l->node, error);
  g_autofree char *why =
    size ? cbt_backup_chain_refusal(l->server, l->repo, l->node, size, l->point, &info, error)
         : NULL;

  l->fz = (CbtBackupFreezeArgs){ .node = l->node,
                                 .file_node = l->a->file_node,
                                 .old_checkpoint = cbt_backup_manifest_str(l->point, "checkpoint"),
                                 .granularity = info.granularity,
                                 .scratch_dir = l->a->scratch_dir,
                                 .size = size };
  cbt_backup_bitmap_info_clear(&info);
  if (!why && error && *error)
    return (*error)->code;
  if (why) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_CHAIN,
                "cannot compare point %" G_GINT64_FORMAT " with the live disk: %s", seq, why);
    return CBT_BACKUP_EXIT_CHAIN;
  }
  if (!cbt_backup_server_freeze(l->server, &l->fz, &l->view, error))
    return CBT_BACKUP_EXIT_FAILED;
  g_autoptr(GArray) clean = NULL;
  gboolean ok =
    connect_both(l, error) &&
    !(why = cbt_backup_instant_refusal(&l->a->nbd, &l->view, l->point, error)) &&
    !(error && *error) &&
    (clean = cbt_backup_map_clean(l->live, l->view.dirty_context, STEP, &l->changed, error)) &&
    compare(l, clean, error);
  if (why)
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_CHAIN,
                "cannot compare point %" G_GINT64_FORMAT " with the live disk: %s", seq, why);
  if (ok || l->problem)
    return CBT_BACKUP_EXIT_OK;
  return (*error)->code;
}

static void
report(Live *l)
{
  gint64 seq = json_object_get_int_member(l->point, "seq");
  g_autoptr(JsonObject) o = json_object_new();

  json_object_set_int_member(o, "seq", seq);
  json_object_set_boolean_member(o, "live", TRUE);
  json_object_set_boolean_member(o, "ok", l->problem == NULL);
  json_object_set_int_member(o, "bytes-compared", l->compared);
  json_object_set_int_member(o, "bytes-changed-since", l->changed);
  if (l->problem)
    json_object_set_string_member(o, "problem", l->problem);
  if (l->a->progress == CBT_BACKUP_PROGRESS_JSON)
    cbt_backup_progress_event(l->a->progress, "verify", o);
  else if (l->problem)
    g_print("point %" G_GINT64_FORMAT ": DAMAGED: %s\n", seq, l->problem);
  else
    g_print("point %" G_GINT64_FORMAT ": ok against the live disk (%" G_GUINT64_FORMAT
            " bytes compared, %" G_GUINT64_FORMAT " changed since)\n",
            seq, l->compared, l->changed);
}

static void
close_all(Live *l)
{
  if (l->live) {
    nbd_shutdown(l->live, 0);
    nbd_close(l->live);
  }
  if (l->saved) {
    nbd_shutdown(l->saved, 0);
    nbd_close(l->saved);
  }
  if (l->serve)
    cbt_backup_serve_stop(l->serve, NULL);
  if (l->server)
    cbt_backup_server_release(l->server, &l->fz, FALSE);
}

int
cbt_backup_verify_live(const CbtBackupRunArgs *a, int point, GError **error)
{
  /* A writer's lock: the view's names are the repository's, as a backup's are. */
  g_autoptr(CbtBackupRepo) r = cbt_backup_repo_open(a->repo, a->node, TRUE, FALSE, error);
  Live l = { .a = a, .repo = r };
  int rc;

  if (!r)
    return (*error)->code;
  l.node = a->node ? a->node : r->node;
  l.point = cbt_backup_repo_last(r);
  if (!l.point || (point >= 0 && point != json_object_get_int_member(l.point, "seq"))) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE,
                "verify --live compares the last point of %s with the disk%s", a->repo,
                l.point ? " (only its checkpoint still records)" : ", and it has none");
    return CBT_BACKUP_EXIT_USAGE;
  }
  l.server = cbt_backup_server_connect(a->qmp, r->prefix, error);
  if (!l.server)
    return CBT_BACKUP_EXIT_FAILED;
  cbt_backup_server_clean_stale(l.server, l.node, cbt_backup_manifest_str(l.point, "checkpoint"));
  rc = run(&l, error);
  close_all(&l);
  if (rc == CBT_BACKUP_EXIT_OK)
    report(&l);
  if (rc == CBT_BACKUP_EXIT_OK && l.problem) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_DAMAGED,
                "point %" G_GINT64_FORMAT " does not match the live disk",
                json_object_get_int_member(l.point, "seq"));
    rc = CBT_BACKUP_EXIT_DAMAGED;
  }
  cbt_backup_view_clear(&l.view);
  cbt_backup_server_free(l.server);
  g_free(l.problem);
  return rc;
}
