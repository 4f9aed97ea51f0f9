/* store-bench: the cost of persistence, in process, on the file system of the temp dir.
 *
 *   store-bench [--quick] [DIR]
 *
 * Rows: a write's mark with one persistent bitmap beside one in-memory bitmap, in steady state
 * (the chunk already dirty: the store adds no system call) and for a newly dirty chunk (one
 * pwrite of its word); the first write to a region new to the epoch (a slot write and an
 * fdatasync, group-committed); and start-up: opening a store of a 1 PiB device whose 64 KiB
 * bitmap holds 1 GiB of dirty chunks scattered 64 GiB apart (target < 1 s).
 */
#include <glib/gstdio.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "bitmap/store/store.h"

#define GiB (G_GUINT64_CONSTANT(1) << 30)
#define TiB (GiB << 10)
#define PiB (TiB << 10)

static double
now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static CbtStore *
open_store(const char *path, guint64 size)
{
  g_autoptr(GError) error = NULL;
  CbtStoreConfig c = {
    .size = size, .identity = "bench", .create = TRUE, .sync_interval_ms = 3600 * 1000
  };
  CbtStore *s = cbt_store_open(path, &c, NULL, &error);

  if (!s)
    g_error("%s", error->message);
  return s;
}

static void
row(const char *what, const char *unit, double store, double mem)
{
  printf("%-52s %-4s %12.3f %12.3f  %8.3f\n", what, unit, store, mem, mem > 0 ? store / mem : 0);
}

/* Marks of 4 KiB at @n offsets, through the store and straight into a bitmap. */
static void
bench_marks(const char *path, guint n, gboolean dirty_first)
{
  g_autoptr(GError) error = NULL;
  guint64 size = 64 * GiB;
  CbtStore *s = open_store(path, size);
  g_autoptr(CbtBitmap) pbm = cbt_bitmap_new(size, 65536);
  g_autoptr(CbtBitmap) mbm = cbt_bitmap_new(size, 65536);
  g_autofree guint64 *offs = g_new(guint64, n);
  g_autoptr(GRand) r = g_rand_new_with_seed(1);

  if (!cbt_store_add(s, "p", pbm, TRUE, &error))
    g_error("%s", error->message);
  /* Offsets in a few regions, so region intents are durable after the first pass. */
  for (guint i = 0; i < n; i++)
    offs[i] = (guint64)g_rand_int_range(r, 0, (gint32)(4 * GiB / 65536)) * 65536;
  if (dirty_first)
    for (guint i = 0; i < n; i++) {
      cbt_store_mark(s, offs[i], 4096);
      cbt_bitmap_mark_range(mbm, offs[i], 4096);
    }
  double t0 = now();
  for (guint i = 0; i < n; i++)
    cbt_store_mark(s, offs[i], 4096);
  double ts = now() - t0;
  t0 = now();
  for (guint i = 0; i < n; i++)
    cbt_bitmap_mark_range(mbm, offs[i], 4096);
  double tm = now() - t0;
  row(dirty_first ? "mark 4K, chunk already dirty (steady state)" : "mark 4K, newly dirty chunk",
      "ns", ts / n * 1e9, tm / n * 1e9);
  cbt_store_close(s, NULL);
  g_unlink(path);
}

static void
bench_fresh_regions(const char *path, guint n)
{
  g_autoptr(GError) error = NULL;
  guint64 size = 4 * PiB / 1024;
  CbtStore *s = open_store(path, size);
  g_autoptr(CbtBitmap) pbm = cbt_bitmap_new(size, 65536);

  if (!cbt_store_add(s, "p", pbm, TRUE, &error))
    g_error("%s", error->message);
  double t0 = now();
  for (guint i = 0; i < n; i++)
    cbt_store_mark(s, (guint64)i * CBT_STORE_DEFAULT_REGION_SIZE * 3, 4096);
  double t = now() - t0;
  row("first write to a fresh 64 MiB region (one thread)", "us", t / n * 1e6, 0);
  cbt_store_close(s, NULL);
  g_unlink(path);
}

static void
bench_startup(const char *path, gboolean quick)
{
  g_autoptr(GError) error = NULL;
  guint64 chunks = quick ? 2048 : 16384; /* 16384 x 64 KiB = 1 GiB */
  CbtStore *s = open_store(path, PiB);
  CbtBitmap *bm = cbt_bitmap_new(PiB, 65536);

  /* Marked before it is added (one area write), not one fresh region at a time. */
  for (guint64 i = 0; i < chunks; i++)
    cbt_bitmap_mark_range(bm, i * (PiB / chunks), 65536);
  if (!cbt_store_add(s, "p", bm, TRUE, &error))
    g_error("%s", error->message);
  if (!cbt_store_close(s, &error))
    g_error("%s", error->message);
  cbt_bitmap_free(bm);

  double t0 = now();
  s = open_store(path, PiB);
  double t = now() - t0;
  CbtStoreBitmap *b = g_ptr_array_index(cbt_store_loaded(s), 0);
  gboolean same = cbt_bitmap_count(b->bitmap) == chunks;
  for (guint64 i = 0; same && i < chunks; i++)
    same = cbt_bitmap_get(b->bitmap, i * (PiB / chunks));
  if (!same)
    g_error("store-bench: the loaded bitmap differs");
  g_autofree char *what = g_strdup_printf(
    "start-up: 1 PiB/64 KiB, %" G_GUINT64_FORMAT " MiB dirty, scattered", chunks * 64 / 1024);
  row(what, "s", t, 0);
  cbt_store_close(s, NULL);
  g_unlink(path);
}

int
main(int argc, char **argv)
{
  gboolean quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  const char *dir = argc > 1 + quick ? argv[1 + quick] : g_get_tmp_dir();
  g_autofree char *path = g_build_filename(dir, "store-bench.cbt", NULL);

  printf("%-52s %-4s %12s %12s  %8s\n", "row", "unit", "persistent", "in-memory", "ratio");
  bench_marks(path, quick ? 20000 : 200000, TRUE);
  bench_marks(path, quick ? 2000 : 20000, FALSE);
  bench_fresh_regions(path, quick ? 20 : 100);
  bench_startup(path, quick);
  return 0;
}
