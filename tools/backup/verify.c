/* tools/backup/verify.c — does each point still hold what its manifest says?
 *
 * Two checks per point: the image file itself (its size, and the SHA-256 of its header and
 * tables: bit rot, truncation, an edit of what maps the data), and the data: the point's chain
 * is served read-only by qemu-nbd and every piece the manifest lists is read back, its SHA-256
 * compared (or, for zeroes, that it reads as zeroes). Verifying every point checks each image
 * of every chain.
 */
#include "backup.h"

#include <gnutls/crypto.h>
#include <stdio.h>
#include <string.h>

#define ZERO_STEP (4u << 20)

static gboolean
zero_ok(struct nbd_handle *h, guint8 *buf, guint64 off, guint64 len, GError **error)
{
  for (guint64 done = 0; done < len; done += ZERO_STEP) {
    guint64 n = MIN(len - done, ZERO_STEP);
    if (nbd_pread(h, buf, n, off + done, 0) == -1) {
      cbt_backup_nbd_error(error, "reading the point");
      return FALSE;
    }
    if (buf[0] || memcmp(buf, buf + 1, n - 1))
      return FALSE;
  }
  return TRUE;
}

static gboolean
piece_ok(struct nbd_handle *h, guint8 *buf, JsonArray *e, GError **error)
{
  guint64 off = json_array_get_int_element(e, 0), len = json_array_get_int_element(e, 1);
  JsonNode *sum = json_array_get_element(e, 2);

  if (JSON_NODE_HOLDS_NULL(sum))
    return zero_ok(h, buf, off, len, error);
  if (len > ZERO_STEP || nbd_pread(h, buf, len, off, 0) == -1) {
    if (len <= ZERO_STEP)
      cbt_backup_nbd_error(error, "reading the point");
    return FALSE;
  }
  guint8 digest[32];
  char hex[65];
  gnutls_hash_fast(GNUTLS_DIG_SHA256, buf, len, digest);
  for (int j = 0; j < 32; j++)
    snprintf(hex + 2 * j, 3, "%02x", digest[j]);
  return strcmp(hex, json_node_get_string(sum)) == 0;
}

/* The pieces of @m read back from @image's chain; the first bad one in @bad. */
static gboolean
data_ok(const char *image, JsonObject *m, CbtBackupProgress *prog, char **bad, GError **error)
{
  CbtBackupServe *sv = cbt_backup_serve(image, 1, error);
  if (!sv)
    return FALSE;
  struct nbd_handle *h = nbd_create();
  g_autofree guint8 *buf = g_malloc(ZERO_STEP);
  JsonArray *pieces = json_object_get_array_member(m, "pieces");
  gboolean ok = h && nbd_connect_uri(h, cbt_backup_serve_uri(sv)) != -1;

  if (!ok)
    cbt_backup_nbd_error(error, "serving the point");
  for (guint i = 0; ok && !*bad && i < json_array_get_length(pieces); i++) {
    JsonArray *e = json_array_get_array_element(pieces, i);
    g_autoptr(GError) local = NULL;
    if (!cbt_backup_check_interrupt(error))
      ok = FALSE;
    else if (!piece_ok(h, buf, e, &local) && !local)
      *bad = g_strdup_printf("the data at offset %" G_GINT64_FORMAT " (%" G_GINT64_FORMAT
                             " bytes) differs from the manifest",
                             json_array_get_int_element(e, 0), json_array_get_int_element(e, 1));
    else if (local)
      ok = (g_propagate_error(error, g_steal_pointer(&local)), FALSE);
    cbt_backup_progress_add(prog, json_array_get_int_element(e, 1));
    cbt_backup_progress_tick(prog, FALSE);
  }
  if (h) {
    nbd_shutdown(h, 0);
    nbd_close(h);
  }
  cbt_backup_serve_stop(sv, NULL);
  return ok;
}

static guint64
pieces_bytes(JsonObject *m)
{
  JsonArray *pieces = json_object_get_array_member(m, "pieces");
  guint64 n = 0;
  for (guint i = 0; i < json_array_get_length(pieces); i++)
    n += json_array_get_int_element(json_array_get_array_element(pieces, i), 1);
  return n;
}

/* NULL when @m's point is sound; otherwise what is wrong (or @error: could not tell). */
static char *
check_point(CbtBackupRepo *r, JsonObject *m, CbtBackupProgressMode mode, GError **error)
{
  g_autofree char *image = cbt_backup_repo_file(r, json_object_get_string_member(m, "file"));
  char *bad = NULL;

  if (!g_file_test(image, G_FILE_TEST_EXISTS))
    return g_strdup_printf("its image %s is missing", image);
  if ((bad = cbt_backup_image_check(m, image, error)) || (error && *error))
    return bad;
  g_autofree char *phase =
    g_strdup_printf("verify %04" G_GINT64_FORMAT, json_object_get_int_member(m, "seq"));
  CbtBackupProgress *prog = cbt_backup_progress_new(mode, phase, pieces_bytes(m));
  if (data_ok(image, m, prog, &bad, error) && !bad)
    cbt_backup_progress_tick(prog, TRUE);
  cbt_backup_progress_free(prog);
  return bad;
}

int
cbt_backup_verify(const char *repo, int point, CbtBackupProgressMode mode, GError **error)
{
  g_autoptr(CbtBackupRepo) r = cbt_backup_repo_open(repo, NULL, FALSE, FALSE, error);
  guint damaged = 0, checked = 0;

  if (!r)
    return (*error)->code;
  for (guint i = 0; i < r->points->len; i++) {
    JsonObject *m = g_ptr_array_index(r->points, i);
    gint64 seq = json_object_get_int_member(m, "seq");
    if (point >= 0 && seq != point)
      continue;
    checked++;
    g_autofree char *bad = check_point(r, m, mode, error);
    if (!bad && error && *error)
      return (*error)->code;
    damaged += bad != NULL;
    g_autoptr(JsonObject) o = json_object_new();
    json_object_set_int_member(o, "seq", seq);
    json_object_set_boolean_member(o, "ok", bad == NULL);
    if (bad)
      json_object_set_string_member(o, "problem", bad);
    if (mode == CBT_BACKUP_PROGRESS_JSON)
      cbt_backup_progress_event(mode, "verify", o);
    else
      g_print("point %" G_GINT64_FORMAT ": %s%s\n", seq, bad ? "DAMAGED: " : "ok", bad ? bad : "");
  }
  if (point >= 0 && !checked) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE, "%s has no point %d", repo, point);
    return CBT_BACKUP_EXIT_USAGE;
  }
  if (damaged) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_DAMAGED, "%u damaged point%s", damaged,
                damaged > 1 ? "s" : "");
    return CBT_BACKUP_EXIT_DAMAGED;
  }
  return CBT_BACKUP_EXIT_OK;
}
