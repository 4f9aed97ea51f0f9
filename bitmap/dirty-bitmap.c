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
  guint8 uuid[16];
  guint64 created;
  CbtDirtyBitmapBreak broken;
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
  /* RFC 4122 version 4: random but for the version and variant bits. */
  for (guint i = 0; i < 16; i += 4) {
    guint32 r = g_random_int();
    memcpy(dbm->uuid + i, &r, 4);
  }
  dbm->uuid[6] = (dbm->uuid[6] & 0x0f) | 0x40;
  dbm->uuid[8] = (dbm->uuid[8] & 0x3f) | 0x80;
  dbm->created = (guint64)(g_get_real_time() / G_USEC_PER_SEC);
  return dbm;
}

const guint8 *
cbt_dirty_bitmap_get_uuid(const CbtDirtyBitmap *dbm)
{
  return dbm->uuid;
}

char *
cbt_dirty_bitmap_get_uuid_string(const CbtDirtyBitmap *dbm)
{
  const guint8 *u = dbm->uuid;
  return g_strdup_printf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                         u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
                         u[12], u[13], u[14], u[15]);
}

guint64
cbt_dirty_bitmap_get_created(const CbtDirtyBitmap *dbm)
{
  return dbm->created;
}

CbtDirtyBitmapBreak
cbt_dirty_bitmap_get_break(const CbtDirtyBitmap *dbm)
{
  return dbm->broken;
}

const char *
cbt_dirty_bitmap_break_text(CbtDirtyBitmapBreak why)
{
  switch (why) {
  case CBT_DIRTY_BITMAP_BROKEN_CREATED_DISABLED:
    return "created disabled";
  case CBT_DIRTY_BITMAP_BROKEN_CLEARED:
    return "cleared";
  case CBT_DIRTY_BITMAP_BROKEN_DISABLED:
    return "disabled";
  case CBT_DIRTY_BITMAP_BROKEN_INCONSISTENT:
    return "inconsistent: its bits could not be read back";
  default:
    return NULL;
  }
}

void
cbt_dirty_bitmap_set_identity(CbtDirtyBitmap *dbm, const guint8 uuid[16], guint64 created,
                              CbtDirtyBitmapBreak broken)
{
  memcpy(dbm->uuid, uuid, 16);
  dbm->created = created;
  dbm->broken = broken;
}

void
cbt_dirty_bitmap_set_break(CbtDirtyBitmap *dbm, CbtDirtyBitmapBreak why)
{
  if (!dbm->broken)
    dbm->broken = why;
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

static gboolean
copy_run(guint64 offset, guint64 len, gpointer dst)
{
  cbt_bitmap_mark_range(dst, offset, len);
  return TRUE;
}

CbtBitmap *
cbt_dirty_bitmap_truncate(CbtDirtyBitmap *dbm, guint64 size)
{
  CbtBitmap *bm = cbt_bitmap_new(size, dbm->granularity);
  CbtBitmap *old = dbm->bits;

  /* Chunk for chunk: a run clipped to the shorter size marks exactly the chunks it overlaps. */
  cbt_bitmap_foreach_dirty_run(old, 0, MIN(size, dbm->size), copy_run, bm);
  dbm->bits = bm;
  dbm->size = size;
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
  cbt_dirty_bitmap_set_break(dbm, CBT_DIRTY_BITMAP_BROKEN_INCONSISTENT);
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
