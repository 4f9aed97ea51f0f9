/* tools/backup/repo.c — the repository: its points, and list, verify, restore, prune.
 *
 * Layout (docs/backup-vendors.md, "cbt-backup"): repo.json (format, id, node); per point N
 * N.qcow2 (a full: standalone; an incremental: an overlay whose backing file is N-1.qcow2, by a
 * relative name, so the directory can move) and N.json, its manifest. A writer holds an flock
 * on `lock`. prune replaces the oldest points by one full in the place of the newest of them,
 * in an order where a crash leaves either the old points or the new one (see prune_into()).
 */
#include "backup.h"

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <gnutls/crypto.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#define REPO_FORMAT "cbt-backup/1"
#define POINT_FORMAT "cbt-backup-point/1"
#define MAX_PIECE (4u << 20)

char *
cbt_backup_point_name(guint seq, const char *suffix)
{
  return g_strdup_printf("%04u%s", seq, suffix);
}

char *
cbt_backup_repo_file(CbtBackupRepo *r, const char *name)
{
  return g_build_filename(r->path, name, NULL);
}

JsonObject *
cbt_backup_repo_last(CbtBackupRepo *r)
{
  return r->points->len ? g_ptr_array_index(r->points, r->points->len - 1) : NULL;
}

static JsonObject *
read_json(const char *path, GError **error)
{
  g_autoptr(JsonParser) p = json_parser_new();
  g_autoptr(GError) local = NULL;

  if (!json_parser_load_from_file(p, path, &local) || !json_parser_get_root(p) ||
      !JSON_NODE_HOLDS_OBJECT(json_parser_get_root(p))) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s: %s", path,
                local ? local->message : "not a JSON object");
    return NULL;
  }
  return json_object_ref(json_node_get_object(json_parser_get_root(p)));
}

gboolean
cbt_backup_repo_write_json(CbtBackupRepo *r, const char *name, JsonObject *obj, GError **error)
{
  g_autoptr(JsonNode) n = json_node_init_object(json_node_alloc(), obj);
  g_autofree char *text = json_to_string(n, TRUE);
  g_autofree char *path = cbt_backup_repo_file(r, name);
  g_autofree char *tmp = g_strconcat(path, ".tmp", NULL);
  g_autoptr(GError) local = NULL;

  if (!g_file_set_contents_full(tmp, text, -1, G_FILE_SET_CONTENTS_DURABLE, 0600, &local)) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s", local->message);
    return FALSE;
  }
  if (g_rename(tmp, path) < 0) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "rename %s: %s", tmp,
                g_strerror(errno));
    g_unlink(tmp);
    return FALSE;
  }
  return cbt_backup_fsync_path(r->path, error);
}

JsonArray *
cbt_backup_pieces_to_json(GArray *pieces)
{
  JsonArray *arr = json_array_new();

  for (guint i = 0; i < pieces->len; i++) {
    const CbtBackupPiece *p = &g_array_index(pieces, CbtBackupPiece, i);
    JsonArray *e = json_array_new();
    json_array_add_int_element(e, (gint64)p->offset);
    json_array_add_int_element(e, (gint64)p->length);
    if (p->kind == CBT_BACKUP_ZERO) {
      json_array_add_null_element(e);
    } else {
      char hex[65];
      for (int j = 0; j < 32; j++)
        snprintf(hex + 2 * j, 3, "%02x", p->sha256[j]);
      json_array_add_string_element(e, hex);
    }
    json_array_add_array_element(arr, e);
  }
  return arr;
}

static gint
by_seq(gconstpointer a, gconstpointer b)
{
  gint64 x = json_object_get_int_member(*(JsonObject **)a, "seq");
  gint64 y = json_object_get_int_member(*(JsonObject **)b, "seq");
  return x < y ? -1 : x > y;
}

static gboolean
is_point_manifest(const char *name)
{
  gsize n = strlen(name);
  if (n < 9 || !g_str_has_suffix(name, ".json"))
    return FALSE;
  for (gsize i = 0; i < n - 5; i++)
    if (!g_ascii_isdigit(name[i]))
      return FALSE;
  return TRUE;
}

/* A writer's leftovers: an image that never got its manifest, a temporary manifest. */
static void
remove_leftovers(CbtBackupRepo *r, const char *name)
{
  if (g_str_has_suffix(name, ".json.new")) {
    cbt_backup_prune_recover(r, name);
    return;
  }
  if (g_str_has_suffix(name, ".qcow2.part") || g_str_has_suffix(name, ".json.tmp")) {
    g_autofree char *p = cbt_backup_repo_file(r, name);
    g_printerr("cbt-backup: removing %s, left by a run that did not finish\n", p);
    g_unlink(p);
  }
}

/* A reader after a crash in a prune, before the next writer finished it (prune.c, step 4):
 * where N.json.new describes the image N.qcow2 now is, it is the manifest. */
static JsonObject *
finished_prune(CbtBackupRepo *r, const char *path, JsonObject *m)
{
  g_autofree char *newer = g_strconcat(path, ".new", NULL);
  g_autoptr(GError) err = NULL;
  JsonObject *n;

  if (!g_file_test(newer, G_FILE_TEST_EXISTS) || !(n = read_json(newer, &err)))
    return m;
  g_autofree char *image =
    cbt_backup_repo_file(r, json_object_get_string_member_with_default(n, "file", ""));
  g_autofree char *differs = cbt_backup_image_check(n, image, &err);
  if (differs || err) {
    json_object_unref(n);
    return m;
  }
  json_object_unref(m);
  return n;
}

static gboolean
load_points(CbtBackupRepo *r, gboolean write, GError **error)
{
  g_autoptr(GError) local = NULL;
  g_autoptr(GDir) dir = g_dir_open(r->path, 0, &local);
  const char *name;

  if (!dir) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s", local->message);
    return FALSE;
  }
  if (write) {
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    while ((name = g_dir_read_name(dir)))
      g_ptr_array_add(names, g_strdup(name));
    for (guint i = 0; i < names->len; i++)
      remove_leftovers(r, g_ptr_array_index(names, i));
    g_dir_rewind(dir);
  }
  while ((name = g_dir_read_name(dir))) {
    if (!is_point_manifest(name))
      continue;
    g_autofree char *p = cbt_backup_repo_file(r, name);
    JsonObject *m = read_json(p, error);
    if (!m)
      return FALSE;
    if (!write)
      m = finished_prune(r, p, m);
    if (g_strcmp0(json_object_get_string_member_with_default(m, "format", ""), POINT_FORMAT)) {
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                  "%s: not a cbt-backup point manifest", p);
      json_object_unref(m);
      return FALSE;
    }
    g_ptr_array_add(r->points, m);
  }
  g_ptr_array_sort(r->points, by_seq);
  return TRUE;
}

static gboolean
create_repo(const char *path, const char *node, GError **error)
{
  if (g_mkdir_with_parents(path, 0700) < 0) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s: %s", path, g_strerror(errno));
    return FALSE;
  }
  g_autoptr(JsonObject) o = json_object_new();
  g_autofree char *id = g_strdup_printf("%08x", g_random_int());
  g_autofree char *now = cbt_backup_now_iso();
  json_object_set_string_member(o, "format", REPO_FORMAT);
  json_object_set_string_member(o, "id", id);
  json_object_set_string_member(o, "node", node);
  json_object_set_string_member(o, "created", now);
  CbtBackupRepo tmp = { .path = (char *)path };
  return cbt_backup_repo_write_json(&tmp, "repo.json", o, error);
}

/* Writers exclude everyone; readers (list, verify, restore) exclude writers only, so none reads
 * a repository in the middle of a change. */
static gboolean
lock_repo(CbtBackupRepo *r, gboolean write, GError **error)
{
  g_autofree char *p = cbt_backup_repo_file(r, "lock");

  r->lock_fd = g_open(p, (write ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, 0600);
  if (r->lock_fd < 0 && !write && errno == ENOENT)
    return TRUE; /* never written: nobody is writing it */
  if (r->lock_fd < 0 || flock(r->lock_fd, (write ? LOCK_EX : LOCK_SH) | LOCK_NB) < 0) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                errno == EWOULDBLOCK ? "%s: another cbt-backup is writing this repository"
                                     : "%s: %s",
                r->path, g_strerror(errno));
    return FALSE;
  }
  return TRUE;
}

CbtBackupRepo *
cbt_backup_repo_open(const char *path, const char *node, gboolean write, gboolean create,
                     GError **error)
{
  g_autofree char *meta = g_build_filename(path, "repo.json", NULL);

  if (!g_file_test(meta, G_FILE_TEST_EXISTS)) {
    if (!create || !node) {
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                  "%s is not a cbt-backup repository (no repo.json)", path);
      return NULL;
    }
    if (!create_repo(path, node, error))
      return NULL;
  }
  g_autoptr(JsonObject) o = read_json(meta, error);
  if (!o)
    return NULL;
  g_autoptr(CbtBackupRepo) r = g_new0(CbtBackupRepo, 1);
  r->lock_fd = -1;
  r->path = g_strdup(path);
  r->points = g_ptr_array_new_with_free_func((GDestroyNotify)json_object_unref);
  r->id = g_strdup(json_object_get_string_member_with_default(o, "id", ""));
  r->node = g_strdup(json_object_get_string_member_with_default(o, "node", ""));
  r->prefix = g_strconcat("cbtbk-", r->id, NULL);
  if (g_strcmp0(json_object_get_string_member_with_default(o, "format", ""), REPO_FORMAT) ||
      !*r->id) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s: not a cbt-backup repository",
                meta);
    return NULL;
  }
  if (node && strcmp(node, r->node) != 0) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE,
                "%s holds backups of node '%s', not '%s'", path, r->node, node);
    return NULL;
  }
  if (!lock_repo(r, write, error) || !load_points(r, write, error))
    return NULL;
  return g_steal_pointer(&r);
}

void
cbt_backup_repo_free(CbtBackupRepo *r)
{
  if (!r)
    return;
  if (r->lock_fd >= 0)
    close(r->lock_fd);
  g_ptr_array_unref(r->points);
  g_free(r->path);
  g_free(r->id);
  g_free(r->prefix);
  g_free(r->node);
  g_free(r);
}

/* ---- list ---------------------------------------------------------------------------------- */

JsonObject *
cbt_backup_repo_point(CbtBackupRepo *r, int seq, GError **error)
{
  for (guint i = 0; i < r->points->len; i++) {
    JsonObject *m = g_ptr_array_index(r->points, i);
    if (seq < 0 ? i + 1 == r->points->len : json_object_get_int_member(m, "seq") == seq)
      return m;
  }
  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE,
              seq < 0 ? "%s has no point" : "%s has no point %d", r->path, seq);
  return NULL;
}

int
cbt_backup_list(const char *repo, gboolean json, GError **error)
{
  g_autoptr(CbtBackupRepo) r = cbt_backup_repo_open(repo, NULL, FALSE, FALSE, error);
  if (!r)
    return (*error)->code;
  if (json) {
    g_autoptr(JsonArray) arr = json_array_new();
    for (guint i = 0; i < r->points->len; i++) {
      JsonObject *m = g_ptr_array_index(r->points, i), *out = json_object_new();
      JsonObjectIter it;
      const char *k;
      JsonNode *v;
      json_object_iter_init(&it, m);
      while (json_object_iter_next(&it, &k, &v))
        if (strcmp(k, "pieces") != 0)
          json_object_set_member(out, k, json_node_copy(v));
      json_array_add_object_element(arr, out);
    }
    g_autoptr(JsonNode) n = json_node_init_array(json_node_alloc(), arr);
    g_autofree char *text = json_to_string(n, TRUE);
    g_print("%s\n", text);
    return CBT_BACKUP_EXIT_OK;
  }
  g_print("%-5s %-12s %-27s %-22s %14s  %s\n", "POINT", "KIND", "FROZEN", "CHECKPOINT", "WRITTEN",
          "IMAGE");
  for (guint i = 0; i < r->points->len; i++) {
    JsonObject *m = g_ptr_array_index(r->points, i);
    g_autofree char *img = cbt_backup_repo_file(r, json_object_get_string_member(m, "file"));
    g_print(
      "%-5" G_GINT64_FORMAT " %-12s %-27s %-22s %14" G_GINT64_FORMAT "  %s%s\n",
      json_object_get_int_member(m, "seq"), json_object_get_string_member(m, "kind"),
      json_object_get_string_member(m, "frozen"), json_object_get_string_member(m, "checkpoint"),
      json_object_get_int_member(m, "bytes-written"), json_object_get_string_member(m, "file"),
      g_file_test(img, G_FILE_TEST_EXISTS) ? "" : " (missing)");
  }
  return CBT_BACKUP_EXIT_OK;
}
