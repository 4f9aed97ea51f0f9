/* nbd/meta.c — meta-context queries: which of an export's contexts a LIST or SET names.
 *
 * Contexts: base:allocation (always), qemu:allocation-depth (when the export enables it),
 * qemu:dirty-bitmap:NAME (one per published bitmap). LIST also takes the wildcards `base:`,
 * `qemu:`, `qemu:dirty-bitmap:` and an empty query list (everything); SET takes exact names only.
 * LIST of `cbtd:` or `cbtd:bitmap-identity:[NAME]` answers, for each published bitmap (NAME
 * only), `cbtd:bitmap-identity:NAME:UUID:unbroken` (or `:broken`): its identity when the
 * export was made (docs/bitmaps.md, "Identity"). Those names cannot be selected.
 * Unknown namespaces and leaves are skipped, not errors (docs/nbd-server.md, "Meta contexts").
 */
#include "nbd/nbd-internal.h"

void
cbt_nbd_meta_match_clear(gpointer p)
{
  CbtNbdMetaMatch *m = p;
  g_free(m->name);
}

static void
add_match(GArray *out, CbtNbdMetaKind kind, guint bitmap, const char *name)
{
  for (guint i = 0; i < out->len; i++) {
    CbtNbdMetaMatch *m = &g_array_index(out, CbtNbdMetaMatch, i);
    if (m->kind == kind && m->bitmap == bitmap)
      return;
  }
  CbtNbdMetaMatch m = { .kind = kind, .bitmap = bitmap, .name = g_strdup(name) };
  g_array_append_val(out, m);
}

static void
add_bitmaps(CbtNbdExport *exp, GArray *out, const char *only)
{
  for (guint i = 0; i < exp->bitmaps->len; i++) {
    CbtNbdExportBitmap *eb = g_ptr_array_index(exp->bitmaps, i);
    if (only && strcmp(only, eb->name) != 0)
      continue;
    g_autofree char *name = g_strconcat(NBD_CONTEXT_QEMU_BITMAP, eb->name, NULL);
    add_match(out, CBT_NBD_META_DIRTY_BITMAP, i, name);
    if (only)
      return;
  }
}

static void
add_identities(CbtNbdExport *exp, GArray *out, const char *only)
{
  for (guint i = 0; i < exp->bitmaps->len; i++) {
    CbtNbdExportBitmap *eb = g_ptr_array_index(exp->bitmaps, i);
    if (!eb->identity || (only && strcmp(only, eb->name) != 0))
      continue;
    g_autofree char *name =
      g_strconcat(NBD_CONTEXT_CBTD_IDENTITY, eb->name, ":", eb->identity, NULL);
    add_match(out, CBT_NBD_META_IDENTITY, i, name);
  }
}

static void
add_qemu(CbtNbdExport *exp, GArray *out)
{
  if (exp->allocation_depth)
    add_match(out, CBT_NBD_META_ALLOCATION_DEPTH, 0, NBD_CONTEXT_QEMU_DEPTH);
  add_bitmaps(exp, out, NULL);
}

static void
match_query(CbtNbdExport *exp, gboolean list, const char *q, GArray *out)
{
  if (strcmp(q, NBD_CONTEXT_BASE_ALLOCATION) == 0 || (list && strcmp(q, "base:") == 0))
    add_match(out, CBT_NBD_META_BASE_ALLOCATION, 0, NBD_CONTEXT_BASE_ALLOCATION);
  else if (list && strcmp(q, "qemu:") == 0)
    add_qemu(exp, out);
  else if (strcmp(q, NBD_CONTEXT_QEMU_DEPTH) == 0 && exp->allocation_depth)
    add_match(out, CBT_NBD_META_ALLOCATION_DEPTH, 0, NBD_CONTEXT_QEMU_DEPTH);
  else if (list && (strcmp(q, "cbtd:") == 0 || strcmp(q, NBD_CONTEXT_CBTD_IDENTITY) == 0))
    add_identities(exp, out, NULL);
  else if (list && g_str_has_prefix(q, NBD_CONTEXT_CBTD_IDENTITY))
    add_identities(exp, out, q + strlen(NBD_CONTEXT_CBTD_IDENTITY));
  else if (g_str_has_prefix(q, NBD_CONTEXT_QEMU_BITMAP)) {
    const char *leaf = q + strlen(NBD_CONTEXT_QEMU_BITMAP);
    if (*leaf)
      add_bitmaps(exp, out, leaf);
    else if (list)
      add_bitmaps(exp, out, NULL);
  }
}

gboolean
cbt_nbd_meta_parse(CbtNbdExport *exp, gboolean list, const guint8 *buf, gsize len, GArray *out,
                   const char **why)
{
  if (len < 4) {
    *why = "missing query count";
    return FALSE;
  }
  guint32 n = cbt_nbd_get32(buf);
  gsize pos = 4;

  /* Check the whole payload before matching anything: no context is sent for a bad request. */
  for (guint32 i = 0; i < n; i++) {
    if (len - pos < 4) {
      *why = "query count exceeds the payload";
      return FALSE;
    }
    guint32 ql = cbt_nbd_get32(buf + pos);
    if (ql > len - pos - 4) {
      *why = "query length exceeds the payload";
      return FALSE;
    }
    pos += 4 + ql;
  }
  if (pos != len) {
    *why = "trailing bytes after the queries";
    return FALSE;
  }
  if (!exp)
    return TRUE;

  if (n == 0 && list) {
    add_match(out, CBT_NBD_META_BASE_ALLOCATION, 0, NBD_CONTEXT_BASE_ALLOCATION);
    add_qemu(exp, out);
    return TRUE;
  }
  pos = 4;
  for (guint32 i = 0; i < n; i++) {
    guint32 ql = cbt_nbd_get32(buf + pos);
    g_autofree char *q = g_strndup((const char *)buf + pos + 4, ql);
    pos += 4 + ql;
    if (ql > NBD_MAX_STRING || strlen(q) != ql)
      continue; /* not a valid string: it names nothing (qemu skips such queries too) */
    match_query(exp, list, q, out);
  }
  return TRUE;
}
