/* tools/backup/chain.c — the proof that a checkpoint still continues the chain of a point.
 *
 * A point's manifest names the checkpoint that started at its instant and, on cbtd, that
 * bitmap's identity (docs/bitmaps.md, "Identity"). The chain continues only while that bitmap
 * is present, recording and consistent, has the same identity and no break in its record; and,
 * since a QMP answer is only true when it was given, the identity is checked again over NBD
 * at the instant of the frozen view (the export names it in the `cbtd:bitmap-identity:`
 * context as it was when the export was made).
 */
#include "backup.h"

#include <string.h>

const char *
cbt_backup_manifest_str(JsonObject *m, const char *name)
{
  return m && json_object_has_member(m, name) && !json_object_get_null_member(m, name)
           ? json_object_get_string_member(m, name)
           : NULL;
}

char *
cbt_backup_chain_refusal(CbtBackupServer *s, CbtBackupRepo *r, const char *node, guint64 size,
                         JsonObject *base, CbtBackupBitmapInfo *info, GError **error)
{
  const char *cp = cbt_backup_manifest_str(base, "checkpoint");
  const char *uuid = cbt_backup_manifest_str(base, "checkpoint-uuid");
  guint seq = json_object_get_int_member(base, "seq");
  g_autofree char *image = cbt_backup_repo_file(r, cbt_backup_manifest_str(base, "file"));

  if (!g_file_test(image, G_FILE_TEST_EXISTS))
    return g_strdup_printf("the image of point %u is missing (%s)", seq, image);
  if ((guint64)json_object_get_int_member(base, "size") != size)
    return g_strdup_printf("node '%s' is %" G_GUINT64_FORMAT
                           " bytes, point %u was %" G_GINT64_FORMAT,
                           node, size, seq, json_object_get_int_member(base, "size"));
  if (!cbt_backup_server_bitmap(s, node, cp, info, error))
    return NULL;
  if (!info->exists)
    return g_strdup_printf("checkpoint '%s' of point %u is missing on node '%s'", cp, seq, node);
  if (info->inconsistent)
    return g_strdup_printf("checkpoint '%s' is inconsistent", cp);
  if (!info->recording)
    return g_strdup_printf("checkpoint '%s' is not recording", cp);
  if (uuid && !info->uuid)
    return g_strdup_printf("point %u was proven by a bitmap identity, and %s has none", seq,
                           cbt_backup_server_name(s));
  if (uuid && strcmp(uuid, info->uuid) != 0)
    return g_strdup_printf("checkpoint '%s' was replaced: its identity is %s, point %u "
                           "started %s",
                           cp, info->uuid, seq, uuid);
  if (info->has_unbroken && !info->unbroken)
    return g_strdup_printf("checkpoint '%s' has a break in its record: %s", cp,
                           info->broken_reason ? info->broken_reason : "broken");
  return NULL;
}

char *
cbt_backup_instant_refusal(const CbtBackupNbdAddr *nbd, const CbtBackupView *view, JsonObject *base,
                           GError **error)
{
  const char *uuid = cbt_backup_manifest_str(base, "checkpoint-uuid");
  const char *cp = cbt_backup_manifest_str(base, "checkpoint");
  if (!view->identity_context || !uuid)
    return NULL;
  g_autoptr(GPtrArray) names =
    cbt_backup_nbd_list_contexts(nbd, view->export_name, view->identity_context, error);
  if (!names)
    return NULL;
  g_autofree char *want = g_strdup_printf("%s:%s:unbroken", view->identity_context, uuid);
  for (guint i = 0; i < names->len; i++)
    if (strcmp(g_ptr_array_index(names, i), want) == 0)
      return NULL;
  return g_strdup_printf("checkpoint '%s' changed before the instant of the view (%s)", cp,
                         names->len ? (char *)g_ptr_array_index(names, 0) : "not published");
}
