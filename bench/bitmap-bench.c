/* bench/bitmap-bench.c — CbtBitmap against a flat bitmap of QEMU's layout (one bit per chunk in
 * a plain word array, as the lowest level of util/hbitmap.c; plain ORs without the lock QEMU
 * takes, plus one row with an atomic OR), on the workloads of the bitmap issue. The flat
 * bitmap is implemented here; its array is mmap()ed with MAP_NORESERVE, so a 1 PiB device
 * really gets its 2 GiB of address space and only touched pages cost RAM. Its "memory" is the
 * array size (what QEMU allocates), its RSS the pages it touched. The sparse bitmap's memory
 * is cbt_bitmap_get_memory(), cross-checked with what malloc handed out.
 *
 * Usage: bitmap-bench [--quick]   (--quick: a tenth of the work, for smoke runs)
 */
#include <malloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bitmap/bitmap.h"

#define KiB (G_GUINT64_CONSTANT(1) << 10)
#define MiB (G_GUINT64_CONSTANT(1) << 20)
#define GiB (G_GUINT64_CONSTANT(1) << 30)
#define TiB (G_GUINT64_CONSTANT(1) << 40)
#define PiB (G_GUINT64_CONSTANT(1) << 50)

static guint scale = 10; /* tenths of the full workload */

/* ---- the flat reference ---- */

typedef struct {
  guint64 size, nbits;
  guint shift;
  gsize bytes;
  guint64 *w;
} Flat;

static Flat *
flat_new(guint64 size, guint32 gran)
{
  Flat *f = g_new0(Flat, 1);
  f->size = size;
  f->shift = g_bit_nth_lsf(gran, -1);
  f->nbits = (size + gran - 1) >> f->shift;
  f->bytes = (f->nbits + 63) / 64 * 8;
  f->w = mmap(NULL, f->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
              -1, 0);
  g_assert(f->w != MAP_FAILED);
  return f;
}

static void
flat_free(Flat *f)
{
  munmap(f->w, f->bytes);
  g_free(f);
}

static void
flat_mark(Flat *f, guint64 offset, guint64 len)
{
  guint64 end = MIN(offset + len, f->size);
  guint64 a = offset >> f->shift, b = (end - 1) >> f->shift;

  for (guint64 i = a; i <= b; i++)
    f->w[i / 64] |= G_GUINT64_CONSTANT(1) << (i % 64);
}

/* First set (or clear) bit at or after @i, or nbits. A plain array can only scan (QEMU's
 * HBitmap adds summary levels above this one to skip; the reference is the flat
 * layout, so that is what is measured). */
static guint64
flat_next(const Flat *f, guint64 i, gboolean clean)
{
  while (i < f->nbits) {
    guint64 w = clean ? ~f->w[i / 64] : f->w[i / 64];
    w &= G_MAXUINT64 << (i % 64);
    if (w)
      return MIN(i / 64 * 64 + __builtin_ctzll(w), f->nbits);
    i = i / 64 * 64 + 64;
  }
  return f->nbits;
}

/* Runs of set bits, found as QEMU finds them: next set, then next clear. */
static guint64
flat_count_runs(const Flat *f)
{
  guint64 n = 0;

  for (guint64 at = 0;;) {
    guint64 d = flat_next(f, at, FALSE);
    if (d >= f->nbits)
      return n;
    at = flat_next(f, d, TRUE);
    n++;
  }
}

/* ---- measuring ---- */

static gsize
rss(void)
{
  long pages = 0, resident = 0;
  FILE *fp = fopen("/proc/self/statm", "r");
  if (fp) {
    if (fscanf(fp, "%ld %ld", &pages, &resident) != 2)
      resident = 0;
    fclose(fp);
  }
  return (gsize)resident * sysconf(_SC_PAGESIZE);
}

/* Bytes malloc() hands out now: the heap the sparse bitmap really uses, independent of its own
 * accounting (RSS cannot show it once freed memory gets reused). */
static gsize
heap(void)
{
  struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

static double
now(void)
{
  return g_get_monotonic_time() / 1e6;
}

static void
row(const char *what, const char *unit, double cbt, double flat)
{
  printf("%-48s %14.3f %14.3f  %-8s %8.3f\n", what, cbt, flat, unit, flat > 0 ? cbt / flat : 0);
}

/* @n bytes for a table cell, in B, KiB or MiB (into @buf). */
static const char *
human(char *buf, gsize len, gsize n)
{
  if (n < KiB)
    g_snprintf(buf, len, "%" G_GSIZE_FORMAT " B", n);
  else if (n < MiB)
    g_snprintf(buf, len, "%.2f KiB", n / (double)KiB);
  else
    g_snprintf(buf, len, "%.2f MiB", n / (double)MiB);
  return buf;
}

static void
row_mem(const char *what, gsize cbt, gsize cbt_heap, gsize flat, gsize flat_rss)
{
  char a[32], b[32], c[32], d[32];
  printf("%-48s %14s %14s  %-8s %8.5f (malloc'd %s; flat RSS %s)\n", what, human(a, sizeof(a), cbt),
         human(b, sizeof(b), flat), "memory", flat ? (double)cbt / flat : 0,
         human(c, sizeof(c), cbt_heap), human(d, sizeof(d), flat_rss));
}

static guint64
rand64(GRand *r)
{
  return (guint64)g_rand_int(r) << 32 | g_rand_int(r);
}

/* ---- workloads ---- */

/* Random 4 KiB writes over 1 TiB at 64 KiB granularity. */
static void
bench_mark(void)
{
  guint n = 400000 * scale;
  g_autofree guint64 *offs = g_new(guint64, n);
  g_autoptr(GRand) r = g_rand_new_with_seed(1);
  for (guint i = 0; i < n; i++)
    offs[i] = rand64(r) % (TiB / 4096) * 4096;

  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(TiB, 65536);
  double t0 = now();
  for (guint i = 0; i < n; i++)
    cbt_bitmap_mark_range(bm, offs[i], 4096);
  double tc = now() - t0;

  Flat *f = flat_new(TiB, 65536);
  t0 = now();
  for (guint i = 0; i < n; i++)
    flat_mark(f, offs[i], 4096);
  double tf = now() - t0;
  flat_free(f);

  /* A flat bitmap safe for concurrent writers needs an atomic OR too: */
  f = flat_new(TiB, 65536);
  t0 = now();
  for (guint i = 0; i < n; i++)
    __atomic_fetch_or(&f->w[offs[i] >> 16 >> 6], G_GUINT64_CONSTANT(1) << (offs[i] >> 16 & 63),
                      __ATOMIC_ACQ_REL);
  double ta = now() - t0;
  flat_free(f);

  g_autofree char *what = g_strdup_printf("mark: %u random 4 KiB writes, 1 TiB/64 KiB", n);
  row(what, "ns/write", tc / n * 1e9, tf / n * 1e9);
  row("mark: same, flat with atomic OR (thread-safe)", "ns/write", tc / n * 1e9, ta / n * 1e9);
}

typedef struct {
  CbtBitmap *bm;
  const guint64 *offs;
  guint n;
} MarkJob;

static gpointer
mark_thread(gpointer data)
{
  MarkJob *j = data;
  for (guint i = 0; i < j->n; i++)
    cbt_bitmap_mark_range(j->bm, j->offs[i], 4096);
  return NULL;
}

/* Two threads marking at once (the flat one would need a lock; not compared): on the same
 * region, where they share leaves, and on disjoint halves of the device. */
static void
bench_mark_threads(gboolean disjoint)
{
  guint n = 400000 * scale;
  g_autofree guint64 *offs = g_new(guint64, n);
  g_autoptr(GRand) r = g_rand_new_with_seed(1);
  for (guint i = 0; i < n; i++) {
    guint64 span = disjoint ? TiB / 2 : TiB;
    offs[i] = rand64(r) % (span / 4096) * 4096 + (disjoint && i >= n / 2 ? TiB / 2 : 0);
  }

  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(TiB, 65536);
  MarkJob jobs[2] = { { bm, offs, n / 2 }, { bm, offs + n / 2, n - n / 2 } };
  double t0 = now();
  GThread *t[2];
  for (int i = 0; i < 2; i++)
    t[i] = g_thread_new("mark", mark_thread, &jobs[i]);
  for (int i = 0; i < 2; i++)
    g_thread_join(t[i]);
  double tc = now() - t0;
  printf("%-48s %14.3f %14s  %-8s\n",
         disjoint ? "mark: 2 threads, disjoint halves (wall/write)"
                  : "mark: 2 threads, same region (wall/write)",
         tc / n * 1e9, "-", "ns/write");
}

/* 1 PiB at 64 KiB with 0.01 % dirty, in 1 MiB runs at random places: iterate every run. */
static void
bench_find_next(void)
{
  guint64 nruns = (PiB / 10000) / MiB * scale / 10;
  g_autoptr(GRand) r = g_rand_new_with_seed(2);
  g_autofree guint64 *offs = g_new(guint64, nruns);
  for (guint64 i = 0; i < nruns; i++)
    offs[i] = rand64(r) % (PiB / MiB) * MiB;

  gsize heap0 = heap();
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(PiB, 65536);
  for (guint64 i = 0; i < nruns; i++)
    cbt_bitmap_mark_range(bm, offs[i], MiB);
  gsize cbt_heap = heap() - heap0;
  guint64 found = 0, bytes = 0;
  double t0 = now();
  for (guint64 at = 0;;) {
    gint64 d = cbt_bitmap_next_dirty(bm, at, G_MAXUINT64);
    if (d < 0)
      break;
    gint64 c = cbt_bitmap_next_clean(bm, d, G_MAXUINT64);
    guint64 e = c < 0 ? PiB : (guint64)c;
    found++;
    bytes += e - d;
    at = e;
  }
  double tc = now() - t0;
  g_assert_cmpuint(bytes / 65536, ==, cbt_bitmap_count(bm));

  gsize rss0 = rss();
  Flat *f = flat_new(PiB, 65536);
  for (guint64 i = 0; i < nruns; i++)
    flat_mark(f, offs[i], MiB);
  gsize flat_rss = rss() - rss0;
  t0 = now();
  guint64 found_flat = flat_count_runs(f);
  double tf = now() - t0;
  g_assert_cmpuint(found, ==, found_flat);

  g_autofree char *what =
    g_strdup_printf("find-next: all %" G_GUINT64_FORMAT " runs, 1 PiB/64 KiB 0.01%%", found);
  row(what, "ms", tc * 1e3, tf * 1e3);
  g_autofree char *mem = g_strdup_printf("memory: 1 PiB/64 KiB, 0.01%% dirty in 1 MiB runs");
  row_mem(mem, cbt_bitmap_get_memory(bm), cbt_heap, f->bytes, flat_rss);
  flat_free(f);
}

static void
fill(CbtBitmap *bm, Flat *f, guint32 seed, guint n)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(seed);
  for (guint i = 0; i < n; i++) {
    guint64 off = rand64(r) % (TiB / 4096) * 4096;
    if (bm)
      cbt_bitmap_mark_range(bm, off, 4096);
    if (f)
      flat_mark(f, off, 4096);
  }
}

typedef struct {
  guint64 runs, bytes;
} RunSum;

static gboolean
sum_run(guint64 offset, guint64 len, gpointer data)
{
  RunSum *s = data;
  (void)offset;
  s->runs++;
  s->bytes += len;
  return TRUE;
}

/* Every dirty run of a 1 TiB/64 KiB bitmap with 100,000 scattered 4 KiB writes: what a
 * qemu:dirty-bitmap map of the whole device walks (nbd/status.c). */
static void
bench_runs(void)
{
  guint n = 100000;
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(TiB, 65536);
  Flat *f = flat_new(TiB, 65536);
  fill(bm, f, 6, n);

  double best = G_MAXDOUBLE, best_flat = G_MAXDOUBLE;
  RunSum s = { 0 };
  guint64 found_flat = 0;
  for (int rep = 0; rep < 5; rep++) {
    s = (RunSum){ 0 };
    double t0 = now();
    cbt_bitmap_foreach_dirty_run(bm, 0, TiB, sum_run, &s);
    best = MIN(best, now() - t0);
    t0 = now();
    found_flat = flat_count_runs(f);
    best_flat = MIN(best_flat, now() - t0);
  }
  g_assert_cmpuint(s.bytes / 65536, ==, cbt_bitmap_count(bm));
  g_assert_cmpuint(s.runs, ==, found_flat);
  flat_free(f);

  g_autofree char *what =
    g_strdup_printf("runs: all %" G_GUINT64_FORMAT " runs, 1 TiB/64 KiB, %u writes", s.runs, n);
  row(what, "ms", best * 1e3, best_flat * 1e3);
}

/* dst |= src for two 1 TiB bitmaps with 1M random 4 KiB writes each. */
static void
bench_merge(guint32 src_gran)
{
  guint n = 100000 * scale;
  g_autoptr(CbtBitmap) src = cbt_bitmap_new(TiB, src_gran);
  g_autoptr(CbtBitmap) dst = cbt_bitmap_new(TiB, 65536);
  fill(src, NULL, 3, n);
  fill(dst, NULL, 4, n);
  double t0 = now();
  cbt_bitmap_merge(dst, src);
  double tc = now() - t0;

  Flat *fs = flat_new(TiB, src_gran), *fd = flat_new(TiB, 65536);
  fill(NULL, fs, 3, n);
  fill(NULL, fd, 4, n);
  t0 = now();
  if (src_gran == 65536) {
    for (gsize i = 0; i < fd->bytes / 8; i++)
      fd->w[i] |= fs->w[i];
  } else {
    /* Differing granularity: visit each set source bit and set its destination bit. */
    guint sh = fd->shift - fs->shift;
    for (guint64 i = flat_next(fs, 0, FALSE); i < fs->nbits; i = flat_next(fs, i + 1, FALSE))
      fd->w[(i >> sh) / 64] |= G_GUINT64_CONSTANT(1) << ((i >> sh) % 64);
  }
  double tf = now() - t0;
  guint64 ones = 0;
  for (gsize i = 0; i < fd->bytes / 8; i++)
    ones += __builtin_popcountll(fd->w[i]);
  g_assert_cmpuint(ones, ==, cbt_bitmap_count(dst));
  flat_free(fs);
  flat_free(fd);

  g_autofree char *what =
    g_strdup_printf("merge: 1 TiB, %u writes each, %u KiB -> 64 KiB", n, src_gran / 1024);
  row(what, "ms", tc * 1e3, tf * 1e3);
}

static void
bench_memory(void)
{
  /* Empty 1 PiB. */
  gsize heap0 = heap();
  g_autoptr(CbtBitmap) empty = cbt_bitmap_new(PiB, 65536);
  row_mem("memory: 1 PiB/64 KiB, empty", cbt_bitmap_get_memory(empty), heap() - heap0, 2 * GiB, 0);

  /* 16,384 chunks, each alone in its region (64 GiB apart). */
  heap0 = heap();
  g_autoptr(CbtBitmap) scattered = cbt_bitmap_new(PiB, 65536);
  for (guint64 i = 0; i < 16384; i++)
    cbt_bitmap_mark_range(scattered, i * (PiB / 16384), 65536);
  gsize cbt_heap = heap() - heap0;
  gsize rss0 = rss();
  Flat *f = flat_new(PiB, 65536);
  for (guint64 i = 0; i < 16384; i++)
    flat_mark(f, i * (PiB / 16384), 65536);
  row_mem("memory: 1 PiB/64 KiB, 16384 scattered chunks", cbt_bitmap_get_memory(scattered),
          cbt_heap, f->bytes, rss() - rss0);
  flat_free(f);

  /* 1 TiB after the mark workload: dense, every leaf present. */
  guint n = 400000 * scale;
  heap0 = heap();
  g_autoptr(CbtBitmap) dense = cbt_bitmap_new(TiB, 65536);
  fill(dense, NULL, 1, n);
  g_autofree char *what = g_strdup_printf("memory: 1 TiB/64 KiB after %u 4 KiB writes", n);
  row_mem(what, cbt_bitmap_get_memory(dense), heap() - heap0, TiB / 65536 / 8, TiB / 65536 / 8);
}

static void
bench_sha256(void)
{
  guint64 size = scale == 10 ? PiB : 128 * TiB;
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(size, 65536);
  double t0 = now();
  g_autofree char *sum = cbt_bitmap_sha256(bm);
  double tc = now() - t0;

  Flat *f = flat_new(size, 65536);
  t0 = now();
  g_autofree char *fsum = g_compute_checksum_for_data(G_CHECKSUM_SHA256, (guint8 *)f->w, f->bytes);
  double tf = now() - t0;
  g_assert_cmpstr(sum, ==, fsum);
  flat_free(f);
  g_autofree char *what =
    g_strdup_printf("sha256: empty %" G_GUINT64_FORMAT " TiB/64 KiB", size / TiB);
  row(what, "ms", tc * 1e3, tf * 1e3);
}

int
main(int argc, char **argv)
{
  if (argc > 1 && strcmp(argv[1], "--quick") == 0)
    scale = 1;
  printf("cbtd bitmap bench%s: cbt = CbtBitmap, flat = QEMU's flat layout (one bit per chunk)\n",
         scale == 10 ? "" : " (--quick: 1/10 of the work)");
  printf("%-48s %14s %14s  %-8s %8s\n", "case", "cbt", "flat", "unit", "cbt/flat");
  printf("(times: lower is better; memory: cbt_bitmap_get_memory() vs the flat array's size)\n");
  bench_mark();
  bench_mark_threads(FALSE);
  bench_mark_threads(TRUE);
  bench_find_next();
  bench_runs();
  bench_merge(65536);
  bench_merge(4096);
  bench_sha256();
  bench_memory();
  return 0;
}
