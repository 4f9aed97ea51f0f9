/* tests/fuzz/fuzz-store.c — the persistent store's loader (bitmap/store/load.c) on hostile
 * files: headers, directories and intent slots of any content, in memory (the crash
 * simulator's I/O layer of tests/store).
 *
 * A store file is mostly holes around a few structures, so the input describes only those:
 *
 *   byte 0      flags: FIX_SUMS recomputes every checksum after placing the parts (else a
 *               mutation rarely gets past SHA-256); OTHER_BOOT opens as after a power loss;
 *               COPY1 writes the header into both copies
 *   bytes 1-2   directory length (little-endian)
 *   512 bytes   the header, written at 0 (and 4096)
 *   then        the directory, written where the header says (if within the first 2 MiB)
 *   the rest    the first intent slot (head and region bits), written where the header says
 *
 * The open runs with the header's own size and identity, so a mutation reaches recovery
 * rather than stopping at "another device". Oracles beyond not crashing: what an open
 * accepted is then marked, synced and closed cleanly, and must reopen cleanly with the same
 * bitmaps. FUZZ_STORE_SEEDS=DIR writes seeds (real stores the store code made) and exits.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <glib/gstdio.h>

#include "bitmap/store/format.h"
#include "bitmap/store/store-internal.h"
#include "bitmap/store/store.h"
#include "tests/store/crashsim.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { FIX_SUMS = 1, OTHER_BOOT = 2, COPY1 = 4 };
#define PLACE_MAX (G_GUINT64_CONSTANT(2) << 20)
#define SIZE_MAX_FUZZ (G_GUINT64_CONSTANT(1) << 30)
/* The in-memory file stays small enough for many runs under the fuzzer's RSS limit. */
#define FILE_MAX (G_GUINT64_CONSTANT(64) << 20)

static void
put(GByteArray *file, guint64 offset, const guint8 *data, gsize len)
{
  if (offset > PLACE_MAX || len > PLACE_MAX)
    return;
  guint old = file->len;
  if (old < offset + len) {
    g_byte_array_set_size(file, (guint)(offset + len));
    memset(file->data + old, 0, file->len - old); /* holes read as zeroes */
  }
  memcpy(file->data + offset, data, len);
}

/* The parts sit at any offset the input gives, so they are copied out, never cast in place. */
static void
fix_sums(GByteArray *file, CbtStoreHeader *h)
{
  if (h->dir_offset <= file->len && file->len - h->dir_offset >= sizeof(CbtStoreDirHead)) {
    CbtStoreDirHead d;
    guint8 *at = file->data + h->dir_offset;
    memcpy(&d, at, sizeof d);
    if (d.len <= file->len - h->dir_offset - sizeof d) {
      cbt_store_checksum(d.checksum, &d, G_STRUCT_OFFSET(CbtStoreDirHead, checksum), at + sizeof d,
                         d.len);
      memcpy(at, &d, sizeof d);
    }
  }
  for (int i = 0; i < 2; i++) {
    CbtStoreSlotHead sl;
    if (h->slot_offset[i] > file->len || file->len - h->slot_offset[i] < sizeof sl)
      continue;
    memcpy(&sl, file->data + h->slot_offset[i], sizeof sl);
    cbt_store_checksum(sl.checksum, &sl, G_STRUCT_OFFSET(CbtStoreSlotHead, checksum), NULL, 0);
    memcpy(file->data + h->slot_offset[i], &sl, sizeof sl);
  }
  cbt_store_checksum(h->checksum, h, G_STRUCT_OFFSET(CbtStoreHeader, checksum), NULL, 0);
}

static CbtStore *
open_store(CrashSim *sim, const CbtStoreHeader *h, GError **error)
{
  g_autofree char *identity = g_strndup(h->identity, sizeof h->identity);
  CbtStoreConfig c = {
    .size = h->device_size && h->device_size <= SIZE_MAX_FUZZ ? h->device_size : 1 << 20,
    .identity = identity,
  };
  return cbt_store_open("fuzz.cbt", &c, crashsim_io(sim), error);
}

static char *
names(CbtStore *s)
{
  GPtrArray *loaded = cbt_store_loaded(s);
  GString *out = g_string_new(NULL);

  for (guint i = 0; i < loaded->len; i++) {
    CbtStoreBitmap *b = loaded->pdata[i];
    g_string_append_printf(out, "%s%s/%u", i ? "," : "", b->name, b->granularity);
  }
  return g_string_free(out, FALSE);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  CbtStoreHeader h = { 0 };

  if (size < 3)
    return 0;
  guint8 flags = data[0];
  gsize dir_len = data[1] | (gsize)data[2] << 8;
  data += 3, size -= 3;
  memcpy(&h, data, MIN(size, sizeof h));
  data += MIN(size, sizeof h), size -= MIN(size, sizeof h);
  dir_len = MIN(dir_len, size);

  CrashSim *sim = crashsim_new("boot-a");
  crashsim_set_max_size(sim, FILE_MAX);
  GByteArray *file = crashsim_bytes(sim);
  put(file, 0, (const guint8 *)&h, sizeof h);
  put(file, h.dir_offset, data, dir_len);
  put(file, h.slot_offset[0], data + dir_len, size - dir_len);
  if (flags & FIX_SUMS)
    fix_sums(file, &h);
  put(file, 0, (const guint8 *)&h, sizeof h);
  if (flags & COPY1)
    put(file, CBT_STORE_PAGE, (const guint8 *)&h, sizeof h);
  if (flags & OTHER_BOOT)
    crashsim_set_boot_id(sim, "boot-b");

  g_autoptr(GError) error = NULL;
  CbtStore *s = open_store(sim, &h, &error);
  if (s) {
    g_autofree char *before = names(s);
    cbt_store_mark(s, 0, 4096);
    if (!cbt_store_close(s, &error)) {
      fprintf(stderr, "a store the loader accepted does not close: %s\n", error->message);
      abort();
    }
    s = open_store(sim, &h, &error);
    g_autofree char *after = s ? names(s) : NULL;
    if (!s || cbt_store_last_stop(s) != CBT_STORE_STOP_CLEAN || strcmp(before, after) != 0) {
      fprintf(stderr, "a cleanly closed store does not reopen as it was: %s -> %s (%s)\n", before,
              after ? after : "-", error ? error->message : "not clean");
      abort();
    }
    cbt_store_close(s, NULL);
  }
  crashsim_free(sim);
  return 0;
}

/* ---- FUZZ_STORE_SEEDS=DIR: real stores, cut into the input's form ---- */

static void
write_seed(const char *dir, const char *name, CrashSim *sim, guint8 flags)
{
  GByteArray *file = crashsim_bytes(sim);
  const CbtStoreHeader *h0 = (const CbtStoreHeader *)file->data;
  const CbtStoreHeader *h1 = (const CbtStoreHeader *)(file->data + CBT_STORE_PAGE);
  gboolean ok0 = cbt_store_header_valid(h0), ok1 = cbt_store_header_valid(h1);
  const CbtStoreHeader *h = ok0 && (!ok1 || h0->seq > h1->seq) ? h0 : h1;
  CbtStoreDirHead d;
  memcpy(&d, file->data + h->dir_offset, sizeof d);
  gsize dir_len = sizeof d + d.len;
  gsize slot_len = MIN(h->slot_len, 2 * CBT_STORE_PAGE);
  g_autoptr(GByteArray) seed = g_byte_array_new();
  guint8 head[3] = { flags, dir_len & 0xff, dir_len >> 8 };

  g_byte_array_append(seed, head, 3);
  g_byte_array_append(seed, (const guint8 *)h, sizeof *h);
  g_byte_array_append(seed, file->data + h->dir_offset, (guint)dir_len);
  g_byte_array_append(seed, file->data + h->slot_offset[0], (guint)slot_len);
  g_autofree char *path = g_build_filename(dir, name, NULL);
  if (!g_file_set_contents(path, (const char *)seed->data, seed->len, NULL))
    abort();
}

static void
make_seeds(const char *dir)
{
  const CbtStoreConfig c = { .size = 64 << 20, .identity = "fuzz:disk", .create = TRUE };
  g_autoptr(CbtBitmap) b0 = cbt_bitmap_new(c.size, 65536);
  g_autoptr(CbtBitmap) b1 = cbt_bitmap_new(c.size, 512);

  for (int kind = 0; kind < 3; kind++) {
    CrashSim *sim = crashsim_new("boot-a");
    CbtStore *s = cbt_store_open("fuzz.cbt", &c, crashsim_io(sim), NULL);
    if (!s || !cbt_store_add(s, "b0", b0, TRUE, NULL) || !cbt_store_add(s, "b1", b1, FALSE, NULL))
      abort();
    cbt_bitmap_mark_range(b0, 1 << 20, 3 << 16);
    cbt_store_mark(s, 1 << 20, 3 << 16);
    cbt_store_sync(s, NULL);
    if (kind == 2)
      crashsim_set_full(sim, TRUE); /* the next marks degrade the store */
    cbt_store_mark(s, 40 << 20, 4096);
    if (kind == 0)
      cbt_store_close(s, NULL);
    else
      cbt_store_abandon(s);
    write_seed(dir, (const char *[]){ "clean", "in-use", "degraded" }[kind], sim, COPY1);
    if (kind == 1)
      write_seed(dir, "in-use-other-boot", sim, COPY1 | OTHER_BOOT);
    crashsim_free(sim);
  }
}

static char *run_dir;

static void
remove_run_dir(void)
{
  g_autoptr(GDir) d = g_dir_open(run_dir, 0, NULL);
  const char *n;

  while (d && (n = g_dir_read_name(d))) {
    g_autofree char *p = g_build_filename(run_dir, n, NULL);
    g_remove(p);
  }
  g_rmdir(run_dir);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  run_dir = g_dir_make_tmp("cbt-fuzz-store-XXXXXX", NULL);
  if (!run_dir)
    abort();
  atexit(remove_run_dir);

  /* Failure markers (cbt_store_failure_marker()) go to a private directory. */
  g_setenv("CBTD_RUN_DIR", run_dir, TRUE);
  if (g_getenv("FUZZ_STORE_SEEDS")) {
    make_seeds(g_getenv("FUZZ_STORE_SEEDS"));
    exit(0);
  }
  return 0;
}
