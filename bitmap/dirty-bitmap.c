/* bitmap/dirty-bitmap.c — the named dirty bitmap object and QEMU's rules for it (see
 * dirty-bitmap.h for the state model and the operation matrix). */
#include "bitmap/dirty-bitmap.h"

#include <string.h>

struct CbtDirtyBitmap {
  char *name; /* NULL when anonymous */
  guint64 size;
  guint32 granularity;
  CbtBitmap *bits;
  guint busy;
  gboolean disabled;
  gboolean persistent;
  gboolean read_only;
  gboolean inconsistent;
};

G_DEFINE_QUARK(cbt - bitmap - error - quark, cbt_bitmap_error)

gboolean
cbt_dirty_bitmap_check_name_present(const char *name, GError **error)
{
  if (name && *name)
    return TRUE;
  g_set_error_literal(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED,
                      "Bitmap name cannot be empty");
  return FALSE;
}

gboolean
cbt_dirty_bitmap_check_name_length(const char *name, GError **error)
{
  if (strlen(name) <= CBT_DIRTY_BITMAP_MAX_NAME)
    return TRUE;
  g_set_error(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED, "Bitmap name too long: %s", name);
  return FALSE;
}

gboolean
cbt_dirty_bitmap_check_granularity(guint64 granularity, GError **error)
{
  if (granularity >= CBT_BITMAP_MIN_GRANULARITY && granularity <= CBT_BITMAP_MAX_GRANULARITY &&
      (granularity & (granularity - 1)) == 0)
    return TRUE;
  g_set_error_literal(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED,
                      "Granularity must be power of 2 and at least 512");
  return FALSE;
}

guint32
cbt_dirty_bitmap_default_granularity(guint64 cluster_size)
{
  if (cluster_size == 0)
    return CBT_DIRTY_BITMAP_DEFAULT_GRANULARITY;
  return CLAMP(cluster_size, 4096, 65536);
}

CbtDirtyBitmap *
cbt_dirty_bitmap_new(const char *name, guint64 size, guint32 granularity)
{
  CbtBitmap *bits = cbt_bitmap_new(size, granularity);

  g_return_val_if_fail(bits != NULL, NULL);
  CbtDirtyBitmap *dbm = g_new0(CbtDirtyBitmap, 1);
  dbm->name = g_strdup(name);
  dbm->size = size;
  dbm->granularity = granularity;
  dbm->bits = bits;
  return dbm;
}

void
cbt_dirty_bitmap_free(CbtDirtyBitmap *dbm)
{
  if (!dbm)
    return;
  cbt_bitmap_free(dbm->bits);
  g_free(dbm->name);
  g_free(dbm);
}

const char *
cbt_dirty_bitmap_get_name(const CbtDirtyBitmap *dbm)
{
  return dbm->name;
}

guint32
cbt_dirty_bitmap_get_granularity(const CbtDirtyBitmap *dbm)
{
  return dbm->granularity;
}

guint64
cbt_dirty_bitmap_get_size(const CbtDirtyBitmap *dbm)
{
  return dbm->size;
}

CbtBitmap *
cbt_dirty_bitmap_get_bitmap(const CbtDirtyBitmap *dbm)
{
  return dbm->bits;
}

CbtBitmap *
cbt_dirty_bitmap_swap_bitmap(CbtDirtyBitmap *dbm, CbtBitmap *bm)
{
  g_return_val_if_fail(cbt_bitmap_get_size(bm) == dbm->size, NULL);
  g_return_val_if_fail(cbt_bitmap_get_granularity(bm) == dbm->granularity, NULL);
  CbtBitmap *old = dbm->bits;
  dbm->bits = bm;
  return old;
}

guint64
cbt_dirty_bitmap_get_count(const CbtDirtyBitmap *dbm)
{
  return cbt_bitmap_count(dbm->bits) * dbm->granularity;
}

gboolean
cbt_dirty_bitmap_is_recording(const CbtDirtyBitmap *dbm)
{
  return !dbm->disabled;
}

void
cbt_dirty_bitmap_set_recording(CbtDirtyBitmap *dbm, gboolean recording)
{
  g_return_if_fail(!recording || !dbm->inconsistent);
  dbm->disabled = !recording;
}

gboolean
cbt_dirty_bitmap_is_busy(const CbtDirtyBitmap *dbm)
{
  return dbm->busy > 0;
}

void
cbt_dirty_bitmap_busy_ref(CbtDirtyBitmap *dbm)
{
  dbm->busy++;
}

void
cbt_dirty_bitmap_busy_unref(CbtDirtyBitmap *dbm)
{
  g_return_if_fail(dbm->busy > 0);
  dbm->busy--;
}

gboolean
cbt_dirty_bitmap_is_persistent(const CbtDirtyBitmap *dbm)
{
  return dbm->persistent;
}

void
cbt_dirty_bitmap_set_persistent(CbtDirtyBitmap *dbm, gboolean persistent)
{
  dbm->persistent = persistent;
}

gboolean
cbt_dirty_bitmap_is_read_only(const CbtDirtyBitmap *dbm)
{
  return dbm->read_only;
}

void
cbt_dirty_bitmap_set_read_only(CbtDirtyBitmap *dbm, gboolean read_only)
{
  dbm->read_only = read_only;
}

gboolean
cbt_dirty_bitmap_is_inconsistent(const CbtDirtyBitmap *dbm)
{
  return dbm->inconsistent;
}

void
cbt_dirty_bitmap_set_inconsistent(CbtDirtyBitmap *dbm)
{
  dbm->inconsistent = TRUE;
  dbm->disabled = TRUE;
  cbt_bitmap_clear_all(dbm->bits);
}

gboolean
cbt_dirty_bitmap_check(const CbtDirtyBitmap *dbm, CbtDirtyBitmapCheckFlags flags, GError **error)
{
  const char *name = dbm->name ? dbm->name : "";

  if ((flags & CBT_DIRTY_BITMAP_CHECK_BUSY) && dbm->busy) {
    g_set_error(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED,
                "Bitmap '%s' is currently in use by another operation and cannot be used", name);
    return FALSE;
  }
  if ((flags & CBT_DIRTY_BITMAP_CHECK_READ_ONLY) && dbm->read_only) {
    g_set_error(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED,
                "Bitmap '%s' is readonly and cannot be modified", name);
    return FALSE;
  }
  if ((flags & CBT_DIRTY_BITMAP_CHECK_INCONSISTENT) && dbm->inconsistent) {
    g_set_error(error, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED,
                "Bitmap '%s' is inconsistent and cannot be used", name);
    return FALSE;
  }
  return TRUE;
}
