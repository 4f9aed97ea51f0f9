/* tests/bitmap/test-dirty-bitmap.c — QEMU's rules and texts for named dirty bitmaps. */
#include <string.h>

#include "bitmap/dirty-bitmap.h"

#define GiB (G_GUINT64_CONSTANT(1) << 30)

static void
test_name(void)
{
  g_autoptr(GError) err = NULL;
  g_autofree char *ok = g_strnfill(1023, 'n');
  g_autofree char *long_name = g_strnfill(1024, 'n');

  g_assert_false(cbt_dirty_bitmap_check_name_present("", &err));
  g_assert_error(err, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED);
  g_assert_cmpstr(err->message, ==, "Bitmap name cannot be empty");
  g_clear_error(&err);
  g_assert_false(cbt_dirty_bitmap_check_name_present(NULL, &err));
  g_assert_cmpstr(err->message, ==, "Bitmap name cannot be empty");
  g_clear_error(&err);
  g_assert_true(cbt_dirty_bitmap_check_name_present("b0", &err));
  g_assert_no_error(err);

  g_assert_true(cbt_dirty_bitmap_check_name_length(ok, &err));
  g_assert_no_error(err);
  g_assert_false(cbt_dirty_bitmap_check_name_length(long_name, &err));
  g_autofree char *want = g_strdup_printf("Bitmap name too long: %s", long_name);
  g_assert_cmpstr(err->message, ==, want);
}

static void
test_granularity(void)
{
  static const guint64 bad[] = { 0,     1,        256,
                                 511,   1000,     513,
                                 65535, 3u << 20, G_GUINT64_CONSTANT(1) << 32 };
  static const guint64 good[] = { 512, 1024, 4096, 65536, 1u << 20, 1u << 31 };

  for (guint i = 0; i < G_N_ELEMENTS(bad); i++) {
    g_autoptr(GError) err = NULL;
    g_assert_false(cbt_dirty_bitmap_check_granularity(bad[i], &err));
    g_assert_cmpstr(err->message, ==, "Granularity must be power of 2 and at least 512");
  }
  for (guint i = 0; i < G_N_ELEMENTS(good); i++)
    g_assert_true(cbt_dirty_bitmap_check_granularity(good[i], NULL));

  /* QEMU: cluster size clamped to [4 KiB, 64 KiB], 64 KiB without clusters (raw, file, null). */
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(0), ==, 65536);
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(512), ==, 4096);
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(4096), ==, 4096);
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(16384), ==, 16384);
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(65536), ==, 65536);
  g_assert_cmpuint(cbt_dirty_bitmap_default_granularity(2u << 20), ==, 65536);
}

static void
expect_refusal(const CbtDirtyBitmap *dbm, CbtDirtyBitmapCheckFlags flags, const char *text)
{
  g_autoptr(GError) err = NULL;
  gboolean ok = cbt_dirty_bitmap_check(dbm, flags, &err);

  if (!text) {
    g_assert_no_error(err);
    g_assert_true(ok);
    return;
  }
  g_assert_false(ok);
  g_assert_error(err, CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED);
  g_assert_cmpstr(err->message, ==, text);
}

#define BUSY "Bitmap 'b0' is currently in use by another operation and cannot be used"
#define RO "Bitmap 'b0' is readonly and cannot be modified"
#define INCONS "Bitmap 'b0' is inconsistent and cannot be used"

static void
test_check_order(void)
{
  g_autoptr(CbtDirtyBitmap) dbm = cbt_dirty_bitmap_new("b0", GiB, 65536);

  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, NULL);
  cbt_dirty_bitmap_set_inconsistent(dbm);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, INCONS);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_BUSY | CBT_DIRTY_BITMAP_CHECK_READ_ONLY, NULL);
  cbt_dirty_bitmap_set_read_only(dbm, TRUE);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, RO);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, INCONS);
  cbt_dirty_bitmap_busy_ref(dbm);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, BUSY);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_READ_ONLY | CBT_DIRTY_BITMAP_CHECK_INCONSISTENT, RO);
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_INCONSISTENT, INCONS);
  expect_refusal(dbm, 0, NULL); /* sha256 works on anything */

  /* Busy is a count: two holders, both must let go. */
  cbt_dirty_bitmap_busy_ref(dbm);
  cbt_dirty_bitmap_busy_unref(dbm);
  g_assert_true(cbt_dirty_bitmap_is_busy(dbm));
  cbt_dirty_bitmap_busy_unref(dbm);
  g_assert_false(cbt_dirty_bitmap_is_busy(dbm));
  expect_refusal(dbm, CBT_DIRTY_BITMAP_CHECK_ALL, RO);
}

/* The matrix of docs/bitmaps.md ("States"), row by row, through the flag presets callers use. */
static void
test_matrix(void)
{
  struct {
    CbtDirtyBitmapCheckFlags flags;
    gboolean busy, ro, incons; /* TRUE: allowed in that state */
  } rows[] = {
    /* remove */
    { CBT_DIRTY_BITMAP_CHECK_BUSY | CBT_DIRTY_BITMAP_CHECK_READ_ONLY, FALSE, FALSE, TRUE },
    { CBT_DIRTY_BITMAP_CHECK_ALL, FALSE, FALSE, FALSE },     /* clear, merge target */
    { CBT_DIRTY_BITMAP_CHECK_ALLOW_RO, FALSE, TRUE, FALSE }, /* enable/disable, source, export */
    { 0, TRUE, TRUE, TRUE },                                 /* sha256 */
  };
  for (guint i = 0; i < G_N_ELEMENTS(rows); i++) {
    g_autoptr(CbtDirtyBitmap) busy = cbt_dirty_bitmap_new("b0", GiB, 65536);
    g_autoptr(CbtDirtyBitmap) ro = cbt_dirty_bitmap_new("b0", GiB, 65536);
    g_autoptr(CbtDirtyBitmap) incons = cbt_dirty_bitmap_new("b0", GiB, 65536);
    cbt_dirty_bitmap_busy_ref(busy);
    cbt_dirty_bitmap_set_read_only(ro, TRUE);
    cbt_dirty_bitmap_set_inconsistent(incons);
    expect_refusal(busy, rows[i].flags, rows[i].busy ? NULL : BUSY);
    expect_refusal(ro, rows[i].flags, rows[i].ro ? NULL : RO);
    expect_refusal(incons, rows[i].flags, rows[i].incons ? NULL : INCONS);
    cbt_dirty_bitmap_busy_unref(busy);
  }
}

static void
test_swap(void)
{
  g_autoptr(CbtDirtyBitmap) dbm = cbt_dirty_bitmap_new("b0", GiB, 65536);
  cbt_bitmap_mark_range(cbt_dirty_bitmap_get_bitmap(dbm), 0, 3 * 65536);

  /* A transaction's clear: keep the old bits for the undo. */
  g_autoptr(CbtBitmap) old = cbt_dirty_bitmap_swap_bitmap(dbm, cbt_bitmap_new(GiB, 65536));
  g_assert_cmpuint(cbt_dirty_bitmap_get_count(dbm), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(old), ==, 3);
  g_autoptr(CbtBitmap) cleared = cbt_dirty_bitmap_swap_bitmap(dbm, g_steal_pointer(&old));
  g_assert_cmpuint(cbt_dirty_bitmap_get_count(dbm), ==, 3 * 65536);
  g_assert_cmpuint(cbt_dirty_bitmap_get_size(dbm), ==, GiB);
  g_assert_cmpuint(cbt_dirty_bitmap_get_granularity(dbm), ==, 65536);
  g_assert_cmpstr(cbt_dirty_bitmap_get_name(dbm), ==, "b0");
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  g_test_add_func("/dirty-bitmap/name", test_name);
  g_test_add_func("/dirty-bitmap/granularity", test_granularity);
  g_test_add_func("/dirty-bitmap/check-order", test_check_order);
  g_test_add_func("/dirty-bitmap/matrix", test_matrix);
  g_test_add_func("/dirty-bitmap/swap", test_swap);
  return g_test_run();
}
