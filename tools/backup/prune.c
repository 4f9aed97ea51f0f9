/* tools/backup/prune.c — keep the newest points: the older ones merge into one full.
 *
 * With points 1..n and --keep k, point m = n-k+1 becomes a full holding the disk as at m (its
 * chain flattened with the same copy a backup does, so its manifest has checksums), and
 * points 1..m-1 go. The order survives a crash at any instant:
 *   1. m's new image is written as m.qcow2.part and made durable (a crash: the next writer
 *      deletes the .part);
 *   2. m's new manifest is written durably as m.json.new;
 *   3. the new image replaces m.qcow2 (rename: the same view, so m+1's backing file reads the
 *      same);
 *   4. m.json.new replaces m.json (a crash between 3 and 4: the next writer finds m.json.new
 *      matching the image and finishes the rename, see cbt_backup_prune_recover());
 *   5. the older points' manifests, then their images, are removed.
 */
#include "backup.h"

#include <errno.h>
#include <glib/gstdio.h>
#include <string.h>
#include <unistd.h>

#define MAX_PIECE (4u << 20)

gboolean
cbt_backup_flatten(const char *image, const char *out, guint64 size, CbtBackupProgressMode mode,
                   GArray **pieces, guint64 *tables, GError **error)
{
  CbtBackupServe *src = cbt_backup_serve(image, 2, error);
  if (!src)
    return FALSE;
  CbtBackupQcow2 *dst = NULL;
  CbtBackupNbdAddr addr = { .unix_path = (char *)cbt_backup_serve_socket(src) };
  const char *ctx[] = { "base:allocation", NULL };
  struct nbd_handle *h = cbt_backup_nbd_connect(&addr, "", ctx, error);
  g_autoptr(GArray) p = h ? cbt_backup_map(h, NULL, MAX_PIECE, error) : NULL;
  gboolean ok = p && (dst = cbt_backup_qcow2_create(out, NULL, size, error));
  if (ok) {
    CbtBackupProgress *prog = cbt_backup_progress_new(mode, "prune", cbt_backup_map_bytes(p));
    CbtBackupCopyArgs a = {
      .source = &addr, .source_export = "", .target = dst, .connections = 2, .progress = prog
    };
    CbtBackupCopyStats st;
    ok = cbt_backup_copy(&a, p, &st, error) && cbt_backup_qcow2_finish(dst, error);
    *tables = cbt_backup_qcow2_tables_offset(dst);
    cbt_backup_progress_free(prog);
  }
  cbt_backup_qcow2_free(dst);
  if (h) {
    nbd_shutdown(h, 0);
    nbd_close(h);
  }
  cbt_backup_serve_stop(src, NULL);
  if (ok)
    *pieces = g_steal_pointer(&p);
  return ok;
}

/* Step 4 of a prune a crash interrupted, at the next open for writing. */
void
cbt_backup_prune_recover(CbtBackupRepo *r, const char *name)
{
  g_autofree char *path = cbt_backup_repo_file(r, name);
  g_autofree char *final = g_strndup(path, strlen(path) - strlen(".new"));
  g_autoptr(JsonParser) p = json_parser_new();
  JsonObject *m = NULL;

  if (json_parser_load_from_file(p, path, NULL) && JSON_NODE_HOLDS_OBJECT(json_parser_get_root(p)))
    m = json_node_get_object(json_parser_get_root(p));
  g_autofree char *image =
    m ? cbt_backup_repo_file(r, json_object_get_string_member_with_default(m, "file", "")) : NULL;
  g_autofree char *differs = NULL;
  g_autoptr(GError) err = NULL;
  if (image && !(differs = cbt_backup_image_check(m, image, &err)) && !err &&
      g_rename(path, final) == 0) {
    g_printerr("cbt-backup: finished the prune of %s a crash interrupted\n", final);
    return;
  }
  g_unlink(path); /* step 3 never happened: the old manifest describes the image */
}

static JsonObject *
merged_manifest(JsonObject *target, GArray *pieces, CbtBackupRepo *r, guint m)
{
  JsonObject *o = json_object_new();
  JsonObjectIter it;
  const char *k;
  JsonNode *v;
  guint64 written = 0;

  json_object_iter_init(&it, target);
  while (json_object_iter_next(&it, &k, &v))
    if (strcmp(k, "pieces") && strcmp(k, "based-on") && strcmp(k, "backing"))
      json_object_set_member(o, k, json_node_copy(v));
  for (guint i = 0; i < pieces->len; i++)
    if (g_array_index(pieces, CbtBackupPiece, i).kind == CBT_BACKUP_DATA)
      written += g_array_index(pieces, CbtBackupPiece, i).length;
  JsonArray *from = json_array_new();
  for (guint i = 0; i <= m; i++)
    json_array_add_int_element(from,
                               json_object_get_int_member(g_ptr_array_index(r->points, i), "seq"));
  json_object_set_string_member(o, "kind", "full");
  json_object_set_null_member(o, "backing");
  json_object_set_array_member(o, "merged-from", from);
  json_object_set_int_member(o, "bytes-written", written);
  json_object_set_array_member(o, "pieces", cbt_backup_pieces_to_json(pieces));
  return o;
}

/* Tests stop a prune here (CBT_BACKUP_TEST_CRASH=NAME) to check that the next writer finishes
 * or undoes it; a crash at that instant would leave the same files. */
static void
crash_point(const char *name)
{
  if (g_strcmp0(g_getenv("CBT_BACKUP_TEST_CRASH"), name) == 0)
    _exit(99);
}

static gboolean
prune_into(CbtBackupRepo *r, guint m, CbtBackupProgressMode mode, GError **error)
{
  JsonObject *target = g_ptr_array_index(r->points, m);
  guint seq = json_object_get_int_member(target, "seq");
  g_autofree char *image = cbt_backup_repo_file(r, json_object_get_string_member(target, "file"));
  g_autofree char *pname = cbt_backup_point_name(seq, ".qcow2.part");
  g_autofree char *part = cbt_backup_repo_file(r, pname);
  g_autofree char *jname = cbt_backup_point_name(seq, ".json");
  g_autofree char *jnew_name = g_strconcat(jname, ".new", NULL);
  g_autofree char *jnew = cbt_backup_repo_file(r, jnew_name),
                  *jpath = cbt_backup_repo_file(r, jname);
  g_autoptr(GArray) pieces = NULL;
  guint64 tables = 0;

  if (!cbt_backup_flatten(image, part, json_object_get_int_member(target, "size"), mode, &pieces,
                          &tables, error) ||
      !cbt_backup_fsync_path(part, error)) {
    g_unlink(part);
    return FALSE;
  }
  g_autoptr(JsonObject) nm = merged_manifest(target, pieces, r, m);
  if (!cbt_backup_image_describe(nm, part, tables, error) ||
      !cbt_backup_repo_write_json(r, jnew_name, nm, error)) {
    g_unlink(part);
    return FALSE;
  }
  crash_point("prune-manifest-new");
  /* Step 3 durable before step 4: a manifest must never name an image its directory does not
   * yet hold. */
  gboolean renamed = g_rename(part, image) == 0 && cbt_backup_fsync_path(r->path, error);
  if (renamed)
    crash_point("prune-image-renamed");
  if (!renamed || g_rename(jnew, jpath) < 0 || !cbt_backup_fsync_path(r->path, error)) {
    if (error && !*error)
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "rename: %s", g_strerror(errno));
    return FALSE;
  }
  for (guint i = 0; i < m; i++) {
    JsonObject *old = g_ptr_array_index(r->points, i);
    g_autofree char *oj = cbt_backup_point_name(json_object_get_int_member(old, "seq"), ".json");
    g_autofree char *ojp = cbt_backup_repo_file(r, oj);
    g_autofree char *oi = cbt_backup_repo_file(r, json_object_get_string_member(old, "file"));
    g_unlink(ojp);
    g_unlink(oi);
  }
  return cbt_backup_fsync_path(r->path, error);
}

int
cbt_backup_prune(const char *repo, guint keep, CbtBackupProgressMode mode, GError **error)
{
  if (keep < 1) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE, "--keep must be at least 1");
    return CBT_BACKUP_EXIT_USAGE;
  }
  g_autoptr(CbtBackupRepo) r = cbt_backup_repo_open(repo, NULL, TRUE, FALSE, error);
  if (!r)
    return (*error)->code;
  guint n = r->points->len;
  if (n <= keep) {
    g_print("%u point%s, nothing to prune\n", n, n == 1 ? "" : "s");
    return CBT_BACKUP_EXIT_OK;
  }
  guint m = n - keep;
  if (!prune_into(r, m, mode, error))
    return CBT_BACKUP_EXIT_FAILED;
  g_print("points %" G_GINT64_FORMAT "..%" G_GINT64_FORMAT " merged into point %" G_GINT64_FORMAT
          ", now a full; %u point%s kept\n",
          json_object_get_int_member(g_ptr_array_index(r->points, 0), "seq"),
          json_object_get_int_member(g_ptr_array_index(r->points, m), "seq"),
          json_object_get_int_member(g_ptr_array_index(r->points, m), "seq"), keep,
          keep == 1 ? "" : "s");
  return CBT_BACKUP_EXIT_OK;
}
