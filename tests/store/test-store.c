/* tests/store/test-store.c — persistent bitmap stores (bitmap/store/) under the crash simulator.
 *
 * Every check that a mark survives looks at the written ranges themselves (each must be all
 * dirty in the bitmap that comes back), so a store that lost one mark fails. The replay test
 * cuts the operation log at every point of a workload and crashes there, as a power loss
 * (synced bytes plus any subset of later writes, some torn) and as a process kill.
 */
#include <errno.h>
#include <glib/gstdio.h>
#include <string.h>

#include "bitmap/store/store.h"
#include "bitmap/store/format.h"
#include "bitmap/store/store-internal.h"
#include "crashsim.h"

#define MiB (G_GUINT64_CONSTANT(1) << 20)
#define DEV (256 * MiB)

typedef struct {
  guint64 offset, len;
  guint done; /* simulator operations when cbt_store_mark() returned */
} Write;

static CbtStoreConfig
config(gboolean create)
{
  return (CbtStoreConfig){ .size = DEV,
                           .identity = "test:disk",
                           .region_size = MiB,
                           .sync_interval_ms = 3600 * 1000,
                           .create = create };
}

static CbtStore *
open_ok(CrashSim *sim, gboolean create)
{
  g_autoptr(GError) error = NULL;
  CbtStoreConfig c = config(create);
  CbtStore *s = cbt_store_open("sim.cbt", &c, crashsim_io(sim), &error);

  g_assert_no_error(error);
  return s;
}

static CbtStoreBitmap *
loaded(CbtStore *s, const char *name)
{
  GPtrArray *a = cbt_store_loaded(s);

  for (guint i = 0; i < a->len; i++)
    if (strcmp(((CbtStoreBitmap *)g_ptr_array_index(a, i))->name, name) == 0)
      return g_ptr_array_index(a, i);
  return NULL;
}

static gboolean
covers(const CbtBitmap *bm, guint64 offset, guint64 len)
{
  return cbt_bitmap_next_clean(bm, offset, offset + len) < 0;
}

static Write
random_write(CrashSim *sim, CbtStore *s, GRand *r)
{
  Write w;

  w.len = g_rand_int_range(r, 0, 4) == 0 ? g_rand_int_range(r, 1, 4) * MiB
                                         : (guint64)g_rand_int_range(r, 1, 65) * 512;
  w.offset = (guint64)g_rand_int_range(r, 0, (gint32)((DEV - w.len) / 512)) * 512;
  cbt_store_mark(s, w.offset, w.len);
  w.done = crashsim_ops(sim);
  return w;
}

/* ---- clean stops --------------------------------------------------------------------- */

static void
test_round_trip(void)
{
  CrashSim *sim = crashsim_new("boot-a");
  g_autoptr(GRand) r = g_rand_new_with_seed(1);
  guint32 grans[] = { 512, 65536, 1u << 31 };
  const char *names[] = { "b512", "b64k", "b2g" };
  CbtBitmap *bms[3];
  char *shas[3];
  g_autoptr(GError) error = NULL;
  CbtStore *s = open_ok(sim, TRUE);

  g_assert_cmpint(cbt_store_last_stop(s), ==, CBT_STORE_STOP_NEW);
  for (int i = 0; i < 3; i++) {
    bms[i] = cbt_bitmap_new(DEV, grans[i]);
    g_assert_true(cbt_store_add(s, names[i], bms[i], TRUE, &error));
  }
  for (int i = 0; i < 200; i++)
    random_write(sim, s, r);
  g_assert_true(cbt_store_set_recording(s, "b2g", FALSE, &error));
  cbt_bitmap_clear_range(bms[1], 0, DEV / 2); /* as block-dirty-bitmap-clear would, drained */
  g_assert_true(cbt_store_rewrite(s, "b64k", &error));
  for (int i = 0; i < 50; i++)
    random_write(sim, s, r);
  for (int i = 0; i < 3; i++)
    shas[i] = cbt_bitmap_sha256(bms[i]);
  g_assert_true(cbt_store_close(s, &error));

  s = open_ok(sim, FALSE);
  g_assert_cmpint(cbt_store_last_stop(s), ==, CBT_STORE_STOP_CLEAN);
  g_assert_cmpuint(cbt_store_loaded(s)->len, ==, 3);
  for (int i = 0; i < 3; i++) {
    CbtStoreBitmap *b = loaded(s, names[i]);
    g_assert_nonnull(b);
    g_assert_cmpuint(b->granularity, ==, grans[i]);
    g_assert_cmpint(b->recording, ==, i != 2);
    g_assert_false(b->inconsistent);
    g_assert_cmpuint(b->widened, ==, 0);
    g_autofree char *sha = cbt_bitmap_sha256(b->bitmap);
    g_assert_cmpstr(sha, ==, shas[i]);
    g_free(shas[i]);
    cbt_bitmap_free(bms[i]);
  }
  g_assert_true(cbt_store_remove(s, "b512", &error));
  g_assert_true(cbt_store_close(s, &error));
  s = open_ok(sim, FALSE);
  g_assert_null(loaded(s, "b512"));
  g_assert_nonnull(loaded(s, "b64k"));
  cbt_store_abandon(s);
  crashsim_free(sim);
}

/* ---- crashes ------------------------------------------------------------------------- */

typedef struct {
  CrashSim *sim;
  GArray *writes; /* Write */
  guint added;    /* operations when both bitmaps were in the store */
  guint clear_start, clear_done;
  CbtBitmap *bm[2];
} Workload;

static const char *wl_names[] = { "fine", "coarse" };

static void
workload_run(Workload *wl, guint32 seed)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(seed);
  g_autoptr(GError) error = NULL;

  wl->sim = crashsim_new("boot-a");
  wl->writes = g_array_new(FALSE, FALSE, sizeof(Write));
  CbtStore *s = open_ok(wl->sim, TRUE);
  wl->bm[0] = cbt_bitmap_new(DEV, 512);
  wl->bm[1] = cbt_bitmap_new(DEV, 65536);
  for (int i = 0; i < 2; i++)
    g_assert_true(cbt_store_add(s, wl_names[i], wl->bm[i], TRUE, &error));
  wl->added = crashsim_ops(wl->sim);
  for (int i = 0; i < 120; i++) {
    Write w = random_write(wl->sim, s, r);
    g_array_append_val(wl->writes, w);
    if (i % 25 == 24)
      g_assert_true(cbt_store_sync(s, &error));
    if (i == 60) {
      wl->clear_start = crashsim_ops(wl->sim);
      cbt_bitmap_clear_all(wl->bm[1]);
      g_assert_true(cbt_store_rewrite(s, "coarse", &error));
      wl->clear_done = crashsim_ops(wl->sim);
    }
  }
  cbt_store_abandon(s);
}

static void
workload_free(Workload *wl)
{
  cbt_bitmap_free(wl->bm[0]);
  cbt_bitmap_free(wl->bm[1]);
  g_array_unref(wl->writes);
  crashsim_free(wl->sim);
}

/* Every write that had returned by @cut must be marked in each bitmap that holds it. */
static guint64
check_cut(Workload *wl, guint cut, gboolean process, guint32 seed)
{
  CrashSim *copy = crashsim_after_crash(wl->sim, cut, process, seed);
  guint64 widened = 0;

  crashsim_set_boot_id(copy, process ? "boot-a" : "boot-b");
  CbtStore *s = open_ok(copy, TRUE);
  for (int i = 0; cut >= wl->added && i < 2; i++) {
    CbtStoreBitmap *b = loaded(s, wl_names[i]);
    g_assert_nonnull(b);
    g_assert_false(b->inconsistent);
    widened += b->widened;
    for (guint k = 0; k < wl->writes->len; k++) {
      Write *w = &g_array_index(wl->writes, Write, k);
      /* A clear that had begun may take earlier marks of its bitmap with it. */
      gboolean cleared = i == 1 && cut > wl->clear_start && w->done <= wl->clear_start;
      if (w->done <= cut && !cleared && !covers(b->bitmap, w->offset, w->len))
        g_error("cut %u (%s, seed %u): %s lost the write [%" G_GUINT64_FORMAT
                ", +%" G_GUINT64_FORMAT ")",
                cut, process ? "process" : "power", seed, wl_names[i], w->offset, w->len);
    }
  }
  if (process && cut >= wl->added)
    g_assert_cmpint(cbt_store_last_stop(s), ==, CBT_STORE_STOP_PROCESS);
  cbt_store_abandon(s);
  crashsim_free(copy);
  return widened;
}

static void
test_replay(void)
{
  Workload wl = { 0 };
  guint64 max_power = 0, max_process = 0;

  workload_run(&wl, 7);
  guint n = crashsim_ops(wl.sim);
  for (guint cut = 0; cut <= n; cut++) {
    max_process = MAX(max_process, check_cut(&wl, cut, TRUE, 0));
    for (guint32 seed = 1; seed <= 3; seed++)
      max_power = MAX(max_power, check_cut(&wl, cut, FALSE, cut * 7 + seed));
  }
  /* A process crash loses nothing of the page cache: no widening at all. */
  g_assert_cmpuint(max_process, ==, 0);
  g_test_message("%u cut points, widening at most %" G_GUINT64_FORMAT " bytes after a power loss",
                 n + 1, max_power);
  workload_free(&wl);
}

/* ---- failures ------------------------------------------------------------------------ */

static void
count_error(CbtStore *s, const char *what, int err, gpointer data)
{
  (void)s;
  (void)what;
  if (err == ENOSPC)
    (*(guint *)data)++;
}

static void
test_enospc(void)
{
  CrashSim *sim = crashsim_new("boot-a");
  g_autoptr(GRand) r = g_rand_new_with_seed(3);
  g_autoptr(GError) error = NULL;
  GArray *writes = g_array_new(FALSE, FALSE, sizeof(Write));
  guint errors = 0;
  CbtStore *s = open_ok(sim, TRUE);
  CbtBitmap *bm = cbt_bitmap_new(DEV, 4096);

  cbt_store_set_error_func(s, count_error, &errors);
  g_assert_true(cbt_store_add(s, "b", bm, TRUE, &error));
  crashsim_set_full(sim, TRUE);
  for (int i = 0; i < 40; i++) {
    Write w = random_write(sim, s, r);
    g_array_append_val(writes, w);
  }
  g_assert_cmpuint(errors, >, 0);
  g_assert_true(cbt_store_is_degraded(s));
  /* Kill the process now (same boot): the degraded flag sends recovery to the intents. */
  CrashSim *copy = crashsim_after_crash(sim, crashsim_ops(sim), TRUE, 0);
  CbtStore *back = open_ok(copy, FALSE);
  CbtStoreBitmap *b = loaded(back, "b");
  g_assert_cmpint(cbt_store_last_stop(back), ==, CBT_STORE_STOP_SYSTEM);
  for (guint k = 0; k < writes->len; k++) {
    Write *w = &g_array_index(writes, Write, k);
    g_assert_true(covers(b->bitmap, w->offset, w->len));
  }
  g_assert_cmpuint(b->widened, >, 0);
  cbt_store_abandon(back);
  crashsim_free(copy);
  /* Space again: the next sync rewrites the areas and leaves the degraded state. */
  crashsim_set_full(sim, FALSE);
  g_assert_true(cbt_store_sync(s, &error));
  g_assert_false(cbt_store_is_degraded(s));
  g_autofree char *sha = cbt_bitmap_sha256(bm);
  g_assert_true(cbt_store_close(s, &error));
  s = open_ok(sim, FALSE);
  g_autofree char *sha2 = cbt_bitmap_sha256(loaded(s, "b")->bitmap);
  g_assert_cmpstr(sha, ==, sha2);
  cbt_store_abandon(s);
  cbt_bitmap_free(bm);
  g_array_unref(writes);
  crashsim_free(sim);
}

/* A store that cannot be written at all (syncs fail: a read-only file system) leaves a marker
 * outside itself, and the next open on this boot loads its bitmaps inconsistent rather than
 * trusting a file that missed marks. */
static void
test_failed_store(void)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *run = g_dir_make_tmp("cbt-run-XXXXXX", &error);
  CrashSim *sim = crashsim_new("boot-a");
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(DEV, 65536);

  g_setenv("CBTD_RUN_DIR", run, TRUE);
  CbtStore *s = open_ok(sim, TRUE);
  g_assert_true(cbt_store_add(s, "b", bm, TRUE, &error));
  cbt_store_mark(s, 0, 4096);
  crashsim_set_sync_error(sim, TRUE);
  cbt_store_mark(s, 100 * MiB, 4096); /* a new region: its intent cannot be made durable */
  g_assert_true(cbt_store_is_degraded(s));
  g_autofree char *marker = cbt_store_failure_marker("sim.cbt");
  g_assert_true(g_file_test(marker, G_FILE_TEST_EXISTS));
  CrashSim *copy = crashsim_after_crash(sim, crashsim_ops(sim), TRUE, 0);
  cbt_store_abandon(s);
  CbtStore *back = open_ok(copy, FALSE);
  CbtStoreBitmap *b = loaded(back, "b");
  g_assert_true(b->inconsistent);
  g_assert_cmpstr(b->reason, ==, "the store could not be written before the last stop");
  g_assert_false(g_file_test(marker, G_FILE_TEST_EXISTS));
  cbt_store_abandon(back);
  crashsim_free(copy);
  /* Writable again before a clean stop: everything rewritten, the marker gone, exact. */
  g_autoptr(CbtBitmap) bm2 = cbt_bitmap_new(DEV, 65536);
  crashsim_free(sim);
  sim = crashsim_new("boot-a");
  s = open_ok(sim, TRUE);
  g_assert_true(cbt_store_add(s, "b", bm2, TRUE, &error));
  crashsim_set_sync_error(sim, TRUE);
  cbt_store_mark(s, 100 * MiB, 4096);
  g_assert_true(g_file_test(marker, G_FILE_TEST_EXISTS));
  crashsim_set_sync_error(sim, FALSE);
  cbt_store_mark(s, 200 * MiB, 4096);
  g_autofree char *sha = cbt_bitmap_sha256(bm2);
  g_assert_true(cbt_store_close(s, &error));
  g_assert_false(g_file_test(marker, G_FILE_TEST_EXISTS));
  s = open_ok(sim, FALSE);
  b = loaded(s, "b");
  g_assert_false(b->inconsistent);
  g_autofree char *sha2 = cbt_bitmap_sha256(b->bitmap);
  g_assert_cmpstr(sha, ==, sha2);
  cbt_store_abandon(s);
  crashsim_free(sim);
  g_unsetenv("CBTD_RUN_DIR");
  g_rmdir(run);
}

/* A store with two bitmaps and some marks, closed cleanly; returns the sha of "a". */
static char *
make_store(CrashSim *sim)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(5);
  g_autoptr(GError) error = NULL;
  CbtStore *s = open_ok(sim, TRUE);
  g_autoptr(CbtBitmap) a = cbt_bitmap_new(DEV, 65536);

  g_assert_true(cbt_store_add(s, "a", a, TRUE, &error));
  for (int i = 0; i < 30; i++)
    random_write(sim, s, r);
  g_assert_true(cbt_store_close(s, &error));
  return cbt_bitmap_sha256(a);
}

static void
test_corrupt(void)
{
  g_autoptr(GError) error = NULL;
  CbtStoreConfig c = config(FALSE);

  /* Not a store at all. */
  CrashSim *sim = crashsim_new("boot-a");
  g_byte_array_append(crashsim_bytes(sim), (const guint8 *)"garbage, not a store", 20);
  g_assert_null(cbt_store_open("x", &c, crashsim_io(sim), &error));
  g_assert_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_CORRUPT);
  g_clear_error(&error);
  crashsim_free(sim);

  /* One header copy destroyed: the other one serves, the bits are exact. */
  sim = crashsim_new("boot-a");
  g_autofree char *sha = make_store(sim);
  GByteArray *b = crashsim_bytes(sim);
  CbtStore *s = open_ok(sim, FALSE);
  cbt_store_abandon(s); /* the open itself wrote a header copy; destroy the newer one */
  memset(b->data, 0xee, 512);
  memset(b->data + 4096, 0, 16);
  /* Both gone now: the bitmap comes back by name, inconsistent. */
  s = open_ok(sim, FALSE);
  CbtStoreBitmap *lb = loaded(s, "a");
  g_assert_nonnull(lb);
  g_assert_true(lb->inconsistent);
  g_assert_null(lb->bitmap);
  g_assert_nonnull(lb->reason);
  cbt_store_abandon(s);
  /* ... but only for its own device: the directory names it too. */
  CbtStoreConfig stranger = config(FALSE);
  stranger.identity = "test:another-disk";
  memset(b->data, 0, 8192);
  g_assert_null(cbt_store_open("x", &stranger, crashsim_io(sim), &error));
  g_assert_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_FOREIGN);
  g_clear_error(&error);
  crashsim_free(sim);

  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  b = crashsim_bytes(sim);
  memset(b->data + 4096, 0xee, 64); /* copy 1 (the newest after close) */
  s = open_ok(sim, FALSE);
  lb = loaded(s, "a");
  g_assert_false(lb->inconsistent);
  g_autofree char *sha1 = cbt_bitmap_sha256(lb->bitmap);
  g_assert_cmpstr(sha1, ==, sha);
  cbt_store_abandon(s);
  crashsim_free(sim);

  /* The directory the header names is broken: names kept, bits refused. */
  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  b = crashsim_bytes(sim);
  for (guint64 off = 8192; off < 8192 + 2 * (256u << 10); off += 256u << 10)
    b->data[off + 70] ^= 0x55;
  s = open_ok(sim, FALSE);
  for (guint i = 0; i < cbt_store_loaded(s)->len; i++)
    g_assert_true(((CbtStoreBitmap *)g_ptr_array_index(cbt_store_loaded(s), i))->inconsistent);
  cbt_store_abandon(s);
  crashsim_free(sim);

  /* Truncated to its first page: whatever comes back may not miss a mark. */
  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  g_byte_array_set_size(crashsim_bytes(sim), 4096);
  s = cbt_store_open("x", &c, crashsim_io(sim), &error);
  if (s) {
    lb = loaded(s, "a");
    g_assert_true(!lb || lb->inconsistent);
    cbt_store_abandon(s);
  }
  g_clear_error(&error);
  crashsim_free(sim);

  /* Bit rot in an area after a clean stop: a lost bit is caught by the checksum. */
  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  b = crashsim_bytes(sim);
  guint64 at = MiB;
  while (at < b->len && !b->data[at])
    at++;
  g_assert_cmpuint(at, <, b->len);
  b->data[at] &= (guint8)(b->data[at] - 1); /* clear its lowest set bit: a mark lost */
  s = open_ok(sim, FALSE);
  lb = loaded(s, "a");
  g_assert_true(lb->inconsistent);
  g_assert_cmpstr(lb->reason, ==, "its bits do not match the checksum of the clean stop");
  cbt_store_abandon(s);
  crashsim_free(sim);

  /* Cut inside the area after a process kill: no checksum, but the file's length tells. */
  sim = crashsim_new("boot-a");
  {
    g_autoptr(CbtBitmap) a = cbt_bitmap_new(DEV, 65536);
    s = open_ok(sim, TRUE);
    g_assert_true(cbt_store_add(s, "a", a, TRUE, &error));
    cbt_store_mark(s, DEV - 65536, 65536); /* the last chunk: the end of the area */
    cbt_store_abandon(s);
  }
  b = crashsim_bytes(sim);
  g_byte_array_set_size(b, b->len - 4096);
  s = open_ok(sim, FALSE);
  lb = loaded(s, "a");
  g_assert_true(lb->inconsistent);
  g_assert_cmpstr(lb->reason, ==, "the store file is shorter than its bits: it was cut");
  cbt_store_abandon(s);
  crashsim_free(sim);

  /* A header whose checksum holds but whose intent slots point elsewhere (found by
   * tests/fuzz/fuzz-store: the store wrote its slots wherever the header said, into its own
   * metadata or gigabytes away): not a valid copy, so the bitmaps come back inconsistent. */
  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  b = crashsim_bytes(sim);
  for (guint64 copy = 0; copy < 2; copy++) {
    CbtStoreHeader h;
    memcpy(&h, b->data + copy * CBT_STORE_PAGE, sizeof h);
    h.slot_offset[0] = copy ? CBT_STORE_DIR_OFFSET : G_GUINT64_CONSTANT(4) << 30;
    cbt_store_checksum(h.checksum, &h, G_STRUCT_OFFSET(CbtStoreHeader, checksum), NULL, 0);
    memcpy(b->data + copy * CBT_STORE_PAGE, &h, sizeof h);
  }
  guint before = b->len;
  s = open_ok(sim, FALSE);
  lb = loaded(s, "a");
  g_assert_true(lb->inconsistent);
  cbt_store_abandon(s);
  g_assert_cmpuint(crashsim_bytes(sim)->len, <, before + 4 * MiB);
  crashsim_free(sim);

  /* An identity the header cannot hold whole is refused, not cut (it would never match). */
  sim = crashsim_new("boot-a");
  g_autofree char *longid = g_strnfill(192, 'x');
  CbtStoreConfig too_long = config(TRUE);
  too_long.identity = longid;
  g_assert_null(cbt_store_open("x", &too_long, crashsim_io(sim), &error));
  g_assert_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_INVALID);
  g_clear_error(&error);
  crashsim_free(sim);

  /* Another device's store. */
  sim = crashsim_new("boot-a");
  g_free(make_store(sim));
  CbtStoreConfig other = config(FALSE);
  other.identity = "test:another-disk";
  g_assert_null(cbt_store_open("x", &other, crashsim_io(sim), &error));
  g_assert_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_FOREIGN);
  g_clear_error(&error);
  crashsim_free(sim);
}

static void
test_resize(void)
{
  CrashSim *sim = crashsim_new("boot-a");
  g_autoptr(GError) error = NULL;
  CbtStore *s = open_ok(sim, TRUE);
  CbtBitmap *bm = cbt_bitmap_new(DEV, 512);

  g_assert_true(cbt_store_add(s, "b", bm, TRUE, &error));
  cbt_store_mark(s, DEV - 4096, 4096);
  CbtBitmap *big = cbt_bitmap_new(2 * DEV, 512);
  cbt_bitmap_mark_range(big, DEV - 4096, 4096); /* what the table's resize carries over */
  g_assert_true(cbt_store_replace_bitmap(s, "b", big, &error));
  g_assert_true(cbt_store_resize(s, 2 * DEV, &error));
  cbt_store_mark(s, 2 * DEV - 512, 512);
  g_autofree char *sha = cbt_bitmap_sha256(big);
  g_assert_true(cbt_store_close(s, &error));
  CbtStoreConfig c = config(FALSE);
  c.size = 2 * DEV;
  s = cbt_store_open("x", &c, crashsim_io(sim), &error);
  g_assert_no_error(error);
  g_autofree char *sha2 = cbt_bitmap_sha256(loaded(s, "b")->bitmap);
  g_assert_cmpstr(sha, ==, sha2);
  cbt_store_abandon(s);
  cbt_bitmap_free(bm);
  cbt_bitmap_free(big);
  crashsim_free(sim);
}

/* An area that ends in bits (its bitmap fills its last page) keeps its last byte when the
 * store is opened again, and after a resize that keeps it in place. */
static void
test_last_byte(void)
{
  CrashSim *sim = crashsim_new("boot-a");
  g_autoptr(GError) error = NULL;
  CbtStore *s = open_ok(sim, TRUE);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(DEV, 512);

  g_assert_true(cbt_store_add(s, "b", bm, TRUE, &error));
  cbt_store_mark(s, DEV - 512, 512);
  g_assert_true(cbt_store_close(s, &error));
  s = open_ok(sim, FALSE);
  g_assert_true(covers(loaded(s, "b")->bitmap, DEV - 512, 512));
  cbt_store_abandon(s); /* killed: the page cache stays */
  CrashSim *copy = crashsim_after_crash(sim, crashsim_ops(sim), TRUE, 0);
  s = open_ok(copy, FALSE);
  g_assert_true(covers(loaded(s, "b")->bitmap, DEV - 512, 512));
  cbt_store_abandon(s);
  crashsim_free(copy);
  crashsim_free(sim);
}

/* ---- a live resize under crashes ------------------------------------------------------ */

/* block_resize's order (dirty-bitmaps/persist.c): the device already has its new size, then the
 * bitmap's new bits go to the store, then the store takes the size. A crash anywhere in it must
 * bring back every write that had returned, inside the device as it was at the crash. */
typedef struct {
  CrashSim *sim;
  GArray *writes;     /* Write */
  guint resize_at[2]; /* operations when each resize began (the device's size changed) */
  guint64 sizes[3];   /* the device before, between and after the two resizes */
  CbtBitmap *bm[3];   /* the bitmap's bits in each period */
} ResizeLoad;

static CbtBitmap *
resized_copy(const CbtBitmap *bm, guint64 size)
{
  CbtBitmap *out = cbt_bitmap_new(size, cbt_bitmap_get_granularity(bm));
  guint64 keep = MIN(size, cbt_bitmap_get_size(bm));

  for (gint64 at = cbt_bitmap_next_dirty(bm, 0, keep); at >= 0;
       at = cbt_bitmap_next_dirty(bm, (guint64)at + 512, keep))
    cbt_bitmap_mark_range(out, (guint64)at, 512);
  return out;
}

static void
resize_writes(ResizeLoad *rl, CbtStore *s, GRand *r, guint64 size, int n)
{
  for (int i = 0; i < n; i++) {
    Write w;
    w.len = (guint64)g_rand_int_range(r, 1, 17) * 512;
    w.offset = (guint64)g_rand_int_range(r, 0, (gint32)((size - w.len) / 512)) * 512;
    cbt_store_mark(s, w.offset, w.len);
    w.done = crashsim_ops(rl->sim);
    g_array_append_val(rl->writes, w);
  }
}

static void
resize_step(ResizeLoad *rl, CbtStore *s, int k)
{
  g_autoptr(GError) error = NULL;

  rl->resize_at[k] = crashsim_ops(rl->sim);
  rl->bm[k + 1] = resized_copy(rl->bm[k], rl->sizes[k + 1]);
  g_assert_true(cbt_store_replace_bitmap(s, "b", rl->bm[k + 1], &error));
  g_assert_true(cbt_store_resize(s, rl->sizes[k + 1], &error));
}

static void
test_resize_replay(void)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(3);
  g_autoptr(GError) error = NULL;
  ResizeLoad rl = { .sizes = { DEV, 2 * DEV, DEV / 2 } };

  rl.sim = crashsim_new("boot-a");
  rl.writes = g_array_new(FALSE, FALSE, sizeof(Write));
  CbtStore *s = open_ok(rl.sim, TRUE);
  rl.bm[0] = cbt_bitmap_new(DEV, 4096);
  g_assert_true(cbt_store_add(s, "b", rl.bm[0], TRUE, &error));
  guint added = crashsim_ops(rl.sim);
  resize_writes(&rl, s, r, rl.sizes[0], 30);
  g_assert_true(cbt_store_sync(s, &error));
  resize_writes(&rl, s, r, rl.sizes[0], 10);
  resize_step(&rl, s, 0); /* grow */
  resize_writes(&rl, s, r, rl.sizes[1], 30);
  resize_step(&rl, s, 1); /* shrink */
  resize_writes(&rl, s, r, rl.sizes[2], 20);
  cbt_store_abandon(s);

  guint n = crashsim_ops(rl.sim);
  for (guint cut = added; cut <= n; cut++) {
    /* The device was resized before the store heard of it. */
    guint64 size = cut > rl.resize_at[1]   ? rl.sizes[2]
                   : cut > rl.resize_at[0] ? rl.sizes[1]
                                           : rl.sizes[0];
    for (guint32 seed = 0; seed <= 2; seed++) {
      CrashSim *copy = crashsim_after_crash(rl.sim, cut, seed == 0, cut * 5 + seed);
      CbtStoreConfig c = config(FALSE);
      crashsim_set_boot_id(copy, seed == 0 ? "boot-a" : "boot-b");
      c.size = size;
      CbtStore *back = cbt_store_open("sim.cbt", &c, crashsim_io(copy), &error);
      g_assert_no_error(error);
      CbtStoreBitmap *b = loaded(back, "b");
      g_assert_nonnull(b);
      g_assert_false(b->inconsistent);
      for (guint k = 0; k < rl.writes->len; k++) {
        Write *w = &g_array_index(rl.writes, Write, k);
        if (w->done > cut || w->offset >= size)
          continue;
        if (!covers(b->bitmap, w->offset, MIN(w->len, size - w->offset)))
          g_error("cut %u (resizes at %u and %u, the write returned at %u; seed %u, device "
                  "%" G_GUINT64_FORMAT "): lost the write [%" G_GUINT64_FORMAT
                  ", +%" G_GUINT64_FORMAT ")",
                  cut, rl.resize_at[0], rl.resize_at[1], w->done, seed, size, w->offset, w->len);
      }
      cbt_store_abandon(back);
      crashsim_free(copy);
    }
  }
  g_test_message("%u cut points around a grow and a shrink", n - added + 1);
  for (int i = 0; i < 3; i++)
    cbt_bitmap_free(rl.bm[i]);
  g_array_unref(rl.writes);
  crashsim_free(rl.sim);
}

/* The real file system: the lock keeps a second opener out; the file is sparse. */
static void
test_posix_lock(void)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *dir = g_dir_make_tmp("cbt-store-XXXXXX", &error);
  g_autofree char *path = g_build_filename(dir, "disk.cbt", NULL);
  CbtStoreConfig c = config(TRUE);

  CbtStore *s = cbt_store_open(path, &c, NULL, &error);
  g_assert_no_error(error);
  g_assert_null(cbt_store_open(path, &c, NULL, &error));
  g_assert_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_BUSY);
  g_clear_error(&error);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(DEV, 65536);
  g_assert_true(cbt_store_add(s, "b", bm, TRUE, &error));
  cbt_store_mark(s, 4096, 65536);
  g_assert_true(cbt_store_close(s, &error));
  s = cbt_store_open(path, &c, NULL, &error);
  g_assert_no_error(error);
  g_assert_true(covers(loaded(s, "b")->bitmap, 4096, 65536));
  g_assert_true(cbt_store_close(s, &error));
  g_unlink(path);
  g_rmdir(dir);
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  /* The store's failure reports are warnings these tests provoke on purpose. */
  g_log_set_always_fatal(G_LOG_FATAL_MASK | G_LOG_LEVEL_CRITICAL);
  g_test_add_func("/store/round-trip", test_round_trip);
  g_test_add_func("/store/replay", test_replay);
  g_test_add_func("/store/enospc", test_enospc);
  g_test_add_func("/store/failed", test_failed_store);
  g_test_add_func("/store/corrupt", test_corrupt);
  g_test_add_func("/store/resize", test_resize);
  g_test_add_func("/store/resize-replay", test_resize_replay);
  g_test_add_func("/store/last-byte", test_last_byte);
  g_test_add_func("/store/posix-lock", test_posix_lock);
  return g_test_run();
}
