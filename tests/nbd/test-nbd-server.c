/* tests/nbd/test-nbd-server.c — the NBD server through libnbd: handshake, info, listing, every
 * command and flag, the three meta contexts, errors a stock client can provoke, export deletion,
 * and the QMP commands' error texts (qsd 7.2's, listed in docs/rpc.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <libnbd.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "nbd/nbd.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)

/* "ro": 1 MiB, read-only, data 0xAA at [64K, 192K) and 0x55 at [512K, 516K). */
static const guint64 ro_ranges[] = { 64 * KiB, 128 * KiB, 0xAA, 512 * KiB, 4 * KiB, 0x55, 0, 0, 0 };

static struct nbd_handle *
open_export(const char *name, const char *const *contexts)
{
  struct nbd_handle *h = nbd_create();
  g_assert_nonnull(h);
  g_assert_cmpint(nbd_set_export_name(h, name), ==, 0);
  for (const char *const *c = contexts; c && *c; c++)
    g_assert_cmpint(nbd_add_meta_context(h, *c), ==, 0);
  if (nbd_connect_unix(h, harness.sock) < 0)
    g_error("connect to '%s': %s", name, nbd_get_error());
  return h;
}

static void
close_handle(struct nbd_handle *h)
{
  nbd_shutdown(h, 0);
  nbd_close(h);
}

static guint8
ro_byte(guint64 off)
{
  if (off >= 64 * KiB && off < 192 * KiB)
    return 0xAA;
  if (off >= 512 * KiB && off < 516 * KiB)
    return 0x55;
  return 0;
}

/* --- handshake and info -------------------------------------------------------------------- */

static gpointer
client_info(gpointer data)
{
  struct nbd_handle *h = nbd_create();
  nbd_set_full_info(h, true);
  nbd_set_export_name(h, "ro");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_get_size(h), ==, 1 * MiB);
  g_assert_cmpint(nbd_is_read_only(h), ==, 1);
  g_assert_cmpint(nbd_can_flush(h), ==, 1);
  g_assert_cmpint(nbd_can_fua(h), ==, 1);
  g_assert_cmpint(nbd_can_df(h), ==, 1);
  g_assert_cmpint(nbd_can_cache(h), ==, 1);
  g_assert_cmpint(nbd_can_multi_conn(h), ==, 1);
  g_assert_cmpint(nbd_can_trim(h), ==, 0);
  g_assert_cmpint(nbd_can_zero(h), ==, 0);
  g_assert_cmpint(nbd_can_fast_zero(h), ==, 0);
  g_assert_cmpint(nbd_is_rotational(h), ==, 0);
  g_assert_cmpint(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), ==, 1);
  g_assert_cmpint(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), ==, 4096);
  g_assert_cmpint(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), ==, 32 * MiB);
  g_autofree char *desc = nbd_get_export_description(h);
  g_assert_cmpstr(desc, ==, "the read-only export");
  g_autofree char *canon = nbd_get_canonical_export_name(h);
  g_assert_cmpstr(canon, ==, "ro");
  g_assert_cmpint(nbd_get_structured_replies_negotiated(h), ==, 1);
  g_autofree char *proto = g_strdup(nbd_get_protocol(h));
  g_assert_cmpstr(proto, ==, "newstyle-fixed");
  close_handle(h);

  /* Writable export flags. */
  h = open_export("rw", NULL);
  g_assert_cmpint(nbd_is_read_only(h), ==, 0);
  g_assert_cmpint(nbd_can_trim(h), ==, 1);
  g_assert_cmpint(nbd_can_zero(h), ==, 1);
  g_assert_cmpint(nbd_can_fast_zero(h), ==, 1);
  g_assert_cmpint(nbd_can_multi_conn(h), ==, 1);
  close_handle(h);

  /* An unknown export fails GO (ERR_UNKNOWN), and the old EXPORT_NAME path drops. */
  h = nbd_create();
  nbd_set_export_name(h, "nosuch");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, -1);
  nbd_close(h);
  return NULL;
}

static void
test_info(void)
{
  harness_run_client(client_info, NULL);
}

static int
list_cb(void *user_data, const char *name, const char *description)
{
  g_ptr_array_add(user_data, g_strdup_printf("%s=%s", name, description));
  return 0;
}

static int
ctx_cb(void *user_data, const char *name)
{
  g_ptr_array_add(user_data, g_strdup(name));
  return 0;
}

static gboolean
has(GPtrArray *a, const char *s)
{
  for (guint i = 0; i < a->len; i++)
    if (strcmp(a->pdata[i], s) == 0)
      return TRUE;
  return FALSE;
}

static gpointer
client_list(gpointer data)
{
  struct nbd_handle *h = nbd_create();
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);

  nbd_set_opt_mode(h, true);
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_opt_list(h, (nbd_list_callback){ .callback = list_cb, .user_data = names }),
                  >=, 3);
  g_assert_true(has(names, "ro=the read-only export"));
  g_assert_true(has(names, "rw="));
  g_assert_true(has(names, "bm="));
  /* INFO does not end negotiation; GO afterwards does. */
  nbd_set_export_name(h, "ro");
  g_assert_cmpint(nbd_opt_info(h), ==, 0);
  g_assert_cmpint(nbd_get_size(h), ==, 1 * MiB);
  nbd_set_export_name(h, "nosuch");
  g_assert_cmpint(nbd_opt_info(h), ==, -1);
  nbd_set_export_name(h, "ro");
  g_assert_cmpint(nbd_opt_go(h), ==, 0);
  guint8 buf[512];
  g_assert_cmpint(nbd_pread(h, buf, sizeof buf, 64 * KiB, 0), ==, 0);
  g_assert_cmpint(buf[0], ==, 0xAA);
  close_handle(h);

  /* ABORT ends negotiation cleanly. */
  h = nbd_create();
  nbd_set_opt_mode(h, true);
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_opt_abort(h), ==, 0);
  g_assert_cmpint(nbd_aio_is_closed(h), ==, 1);
  nbd_close(h);
  return NULL;
}

static void
test_list(void)
{
  harness_run_client(client_list, NULL);
}

/* LIST_META_CONTEXT with @queries on export "bm" (bitmaps b0, b1, allocation-depth). */
static GPtrArray *
list_meta(struct nbd_handle *h, const char *const *queries)
{
  GPtrArray *out = g_ptr_array_new_with_free_func(g_free);
  nbd_clear_meta_contexts(h);
  for (const char *const *q = queries; q && *q; q++)
    nbd_add_meta_context(h, *q);
  int n =
    nbd_opt_list_meta_context(h, (nbd_context_callback){ .callback = ctx_cb, .user_data = out });
  g_assert_cmpint(n, ==, (int)out->len);
  return out;
}

static gpointer
client_list_meta(gpointer data)
{
  struct nbd_handle *h = nbd_create();
  nbd_set_opt_mode(h, true);
  nbd_set_export_name(h, "bm");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);

  g_autoptr(GPtrArray) all = list_meta(h, NULL);
  g_assert_cmpint(all->len, ==, 4);
  g_assert_true(has(all, "base:allocation"));
  g_assert_true(has(all, "qemu:allocation-depth"));
  g_assert_true(has(all, "qemu:dirty-bitmap:b0"));
  g_assert_true(has(all, "qemu:dirty-bitmap:b1"));

  const char *q_base[] = { "base:", NULL };
  g_autoptr(GPtrArray) base = list_meta(h, q_base);
  g_assert_cmpint(base->len, ==, 1);
  g_assert_cmpstr(base->pdata[0], ==, "base:allocation");

  const char *q_qemu[] = { "qemu:", NULL };
  g_autoptr(GPtrArray) qemu = list_meta(h, q_qemu);
  g_assert_cmpint(qemu->len, ==, 3);
  g_assert_false(has(qemu, "base:allocation"));

  const char *q_bm[] = { "qemu:dirty-bitmap:", NULL };
  g_autoptr(GPtrArray) bms = list_meta(h, q_bm);
  g_assert_cmpint(bms->len, ==, 2);

  const char *q_exact[] = { "qemu:dirty-bitmap:b1",   "x-nosuch:foo",    "nocolon",
                            "qemu:dirty-bitmap:nope", "base:allocation", NULL };
  g_autoptr(GPtrArray) exact = list_meta(h, q_exact);
  g_assert_cmpint(exact->len, ==, 2);
  g_assert_true(has(exact, "qemu:dirty-bitmap:b1"));
  g_assert_true(has(exact, "base:allocation"));
  nbd_opt_abort(h);
  nbd_close(h);

  /* Without allocation-depth the context is not offered. */
  h = nbd_create();
  nbd_set_opt_mode(h, true);
  nbd_set_export_name(h, "ro");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_autoptr(GPtrArray) ro = list_meta(h, NULL);
  g_assert_cmpint(ro->len, ==, 1);
  g_assert_cmpstr(ro->pdata[0], ==, "base:allocation");
  nbd_opt_abort(h);
  nbd_close(h);
  return NULL;
}

static void
test_list_meta(void)
{
  harness_run_client(client_list_meta, NULL);
}

/* --- READ ---------------------------------------------------------------------------------- */

typedef struct {
  GArray *chunks; /* (offset, count, status) triples */
} Chunks;

static int
chunk_cb(void *user_data, const void *subbuf, size_t count, uint64_t offset, unsigned status,
         int *error)
{
  Chunks *c = user_data;
  guint64 t[3] = { offset, count, status };
  g_array_append_vals(c->chunks, t, 3);
  return 0;
}

static gpointer
client_read(gpointer data)
{
  struct nbd_handle *h = open_export("ro", NULL);
  g_autofree guint8 *buf = g_malloc(1 * MiB);

  g_assert_cmpint(nbd_pread(h, buf, 1 * MiB, 0, 0), ==, 0);
  for (guint64 i = 0; i < 1 * MiB; i++)
    if (buf[i] != ro_byte(i))
      g_error("byte %" G_GUINT64_FORMAT " is 0x%x", i, buf[i]);

  /* Structured read: holes come as OFFSET_HOLE chunks, data as OFFSET_DATA. */
  Chunks c = { g_array_new(FALSE, FALSE, sizeof(guint64)) };
  g_assert_cmpint(
    nbd_pread_structured(h, buf, 256 * KiB, 0,
                         (nbd_chunk_callback){ .callback = chunk_cb, .user_data = &c }, 0),
    ==, 0);
  g_assert_cmpint(c.chunks->len, ==, 9);
  guint64 *t = (guint64 *)c.chunks->data;
  g_assert_cmpint(t[0], ==, 0);
  g_assert_cmpint(t[1], ==, 64 * KiB);
  g_assert_cmpint(t[2], ==, LIBNBD_READ_HOLE);
  g_assert_cmpint(t[3], ==, 64 * KiB);
  g_assert_cmpint(t[4], ==, 128 * KiB);
  g_assert_cmpint(t[5], ==, LIBNBD_READ_DATA);
  g_assert_cmpint(t[6], ==, 192 * KiB);
  g_assert_cmpint(t[7], ==, 64 * KiB);
  g_assert_cmpint(t[8], ==, LIBNBD_READ_HOLE);
  for (guint64 i = 0; i < 256 * KiB; i++)
    g_assert_cmpint(buf[i], ==, ro_byte(i));

  /* DF: one data chunk, holes as literal zeroes. */
  g_array_set_size(c.chunks, 0);
  g_assert_cmpint(
    nbd_pread_structured(h, buf, 256 * KiB, 0,
                         (nbd_chunk_callback){ .callback = chunk_cb, .user_data = &c },
                         LIBNBD_CMD_FLAG_DF),
    ==, 0);
  g_assert_cmpint(c.chunks->len, ==, 3);
  t = (guint64 *)c.chunks->data;
  g_assert_cmpint(t[0], ==, 0);
  g_assert_cmpint(t[1], ==, 256 * KiB);
  g_assert_cmpint(t[2], ==, LIBNBD_READ_DATA);
  g_array_unref(c.chunks);

  /* Unaligned reads across a data/hole boundary. */
  g_assert_cmpint(nbd_pread(h, buf, 1000, 192 * KiB - 500, 0), ==, 0);
  for (guint i = 0; i < 1000; i++)
    g_assert_cmpint(buf[i], ==, ro_byte(192 * KiB - 500 + i));
  /* FUA on a read is accepted (SEND_FUA is advertised; libnbd only sends it unstrict). */
  nbd_set_strict_mode(h, 0);
  g_assert_cmpint(nbd_pread(h, buf, 4096, 0, LIBNBD_CMD_FLAG_FUA), ==, 0);
  g_assert_cmpint(nbd_cache(h, 64 * KiB, 0, 0), ==, 0);
  g_assert_cmpint(nbd_flush(h, 0), ==, 0);
  close_handle(h);

  /* Simple replies when structured replies are not negotiated. */
  h = nbd_create();
  nbd_set_request_structured_replies(h, false);
  nbd_set_export_name(h, "ro");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_get_structured_replies_negotiated(h), ==, 0);
  g_assert_cmpint(nbd_can_df(h), ==, 0);
  g_assert_cmpint(nbd_pread(h, buf, 1 * MiB, 0, 0), ==, 0);
  for (guint64 i = 0; i < 1 * MiB; i++)
    g_assert_cmpint(buf[i], ==, ro_byte(i));
  nbd_set_strict_mode(h, 0);
  g_assert_cmpint(nbd_pread(h, buf, 4096, 1 * MiB, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pread(h, buf, 4096, 0, 0), ==, 0);
  close_handle(h);
  return NULL;
}

static void
test_read(void)
{
  harness_run_client(client_read, NULL);
}

/* --- BLOCK_STATUS -------------------------------------------------------------------------- */

typedef struct {
  char *context;
  GArray *ext; /* (length, flags) pairs, offsets implied */
  guint64 first_offset;
} Status;

static int
extent_cb(void *user_data, const char *metacontext, uint64_t offset, uint32_t *entries, size_t nr,
          int *error)
{
  GPtrArray *all = user_data;
  Status *s = g_new0(Status, 1);
  s->context = g_strdup(metacontext);
  s->first_offset = offset;
  s->ext = g_array_new(FALSE, FALSE, sizeof(guint32));
  g_array_append_vals(s->ext, entries, nr); /* nr counts words: (length, flags) pairs */
  g_ptr_array_add(all, s);
  return 0;
}

static void
status_free(gpointer p)
{
  Status *s = p;
  g_free(s->context);
  g_array_unref(s->ext);
  g_free(s);
}

static GPtrArray *
block_status(struct nbd_handle *h, guint64 len, guint64 off, guint32 flags)
{
  GPtrArray *all = g_ptr_array_new_with_free_func(status_free);
  if (nbd_block_status(h, len, off,
                       (nbd_extent_callback){ .callback = extent_cb, .user_data = all }, flags) < 0)
    g_error("block status: %s", nbd_get_error());
  return all;
}

static Status *
find_ctx(GPtrArray *all, const char *ctx)
{
  for (guint i = 0; i < all->len; i++) {
    Status *s = all->pdata[i];
    if (strcmp(s->context, ctx) == 0)
      return s;
  }
  g_error("no answer for %s", ctx);
}

static void
assert_extents(Status *s, const guint32 *expect, gsize n)
{
  if (s->ext->len != n * 2) {
    for (guint i = 0; i < s->ext->len; i += 2)
      g_printerr("  %u %u\n", g_array_index(s->ext, guint32, i),
                 g_array_index(s->ext, guint32, i + 1));
  }
  g_assert_cmpint(s->ext->len, ==, n * 2);
  for (gsize i = 0; i < 2 * n; i++)
    g_assert_cmpint(g_array_index(s->ext, guint32, i), ==, expect[i]);
}

static gpointer
client_base_allocation(gpointer data)
{
  const char *ctx[] = { "base:allocation", NULL };
  struct nbd_handle *h = open_export("ro", ctx);
  g_assert_cmpint(nbd_can_meta_context(h, "base:allocation"), ==, 1);

  g_autoptr(GPtrArray) all = block_status(h, 1 * MiB, 0, 0);
  g_assert_cmpint(all->len, ==, 1);
  const guint32 full[] = { 64 * KiB, 3, 128 * KiB, 0, 320 * KiB, 3, 4 * KiB, 0, 508 * KiB, 3 };
  assert_extents(find_ctx(all, "base:allocation"), full, 5);

  g_autoptr(GPtrArray) one = block_status(h, 1 * MiB, 0, LIBNBD_CMD_FLAG_REQ_ONE);
  const guint32 first[] = { 64 * KiB, 3 };
  assert_extents(find_ctx(one, "base:allocation"), first, 1);

  /* Unaligned start; the last extent runs on to the end of its run (docs/nbd-server.md, "Block
   * status"), but never past the export's end, and REQ_ONE answers stay inside the request. */
  g_autoptr(GPtrArray) mid = block_status(h, 100 * KiB, 100, 0);
  const guint32 part[] = { 64 * KiB - 100, 3, 128 * KiB, 0 };
  assert_extents(find_ctx(mid, "base:allocation"), part, 2);
  g_autoptr(GPtrArray) over = block_status(h, 1000, 0, 0);
  const guint32 run[] = { 64 * KiB, 3 };
  assert_extents(find_ctx(over, "base:allocation"), run, 1);
  g_autoptr(GPtrArray) clipped = block_status(h, 1000, 0, LIBNBD_CMD_FLAG_REQ_ONE);
  const guint32 req[] = { 1000, 3 };
  assert_extents(find_ctx(clipped, "base:allocation"), req, 1);

  g_autoptr(GPtrArray) tail = block_status(h, 1000, 1 * MiB - 1000, 0);
  const guint32 end[] = { 1000, 3 };
  assert_extents(find_ctx(tail, "base:allocation"), end, 1);
  close_handle(h);
  return NULL;
}

static void
test_base_allocation(void)
{
  harness_run_client(client_base_allocation, NULL);
}

static gpointer
client_bitmaps(gpointer data)
{
  const char *ctx[] = { "base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth",
                        "qemu:dirty-bitmap:b1", NULL };
  struct nbd_handle *h = open_export("bm", ctx);

  g_autoptr(GPtrArray) all = block_status(h, 1 * MiB, 0, 0);
  g_assert_cmpint(all->len, ==, 4);
  /* The libnbd interop pattern: merged runs at 64 KiB granularity. */
  const guint32 b0[] = { 64 * KiB, 0, 64 * KiB, 1, 384 * KiB, 0, 64 * KiB, 1, 448 * KiB, 0 };
  assert_extents(find_ctx(all, "qemu:dirty-bitmap:b0"), b0, 5);
  const guint32 b1[] = { 1 * MiB - 4096, 0, 4096, 1 };
  assert_extents(find_ctx(all, "qemu:dirty-bitmap:b1"), b1, 2);
  const guint32 depth[] = { 1 * MiB, 1 };
  assert_extents(find_ctx(all, "qemu:allocation-depth"), depth, 1);
  const guint32 base[] = { 1 * MiB, 3 };
  assert_extents(find_ctx(all, "base:allocation"), base, 1);

  g_autoptr(GPtrArray) one = block_status(h, 1 * MiB, 0, LIBNBD_CMD_FLAG_REQ_ONE);
  const guint32 b0_one[] = { 64 * KiB, 0 };
  assert_extents(find_ctx(one, "qemu:dirty-bitmap:b0"), b0_one, 1);

  /* Extents start at the request's offset, not on a granularity boundary; the last one runs
   * to the end of its run. */
  g_autoptr(GPtrArray) clip = block_status(h, 100000, 100000, 0);
  const guint32 b0_clip[] = { 128 * KiB - 100000, 1, 384 * KiB, 0 };
  assert_extents(find_ctx(clip, "qemu:dirty-bitmap:b0"), b0_clip, 2);
  close_handle(h);
  return NULL;
}

static void
test_bitmaps(void)
{
  guint before = harness_bitmap_releases();
  harness_run_client(client_bitmaps, NULL);
  /* An export's bitmaps are released when it goes. */
  g_autofree char *img = harness_image("bm2.img", 1 * MiB, NULL);
  harness_add_node("n-bm2", img, FALSE);
  harness_qmp_ok("block-export-add",
                 "{\"type\": \"nbd\", \"id\": \"bm2\", \"node-name\": "
                 "\"n-bm2\", \"bitmaps\": [\"b0\", {\"node\": \"n-bm2\", \"name\": \"b1\"}]}");
  g_assert_cmpint(harness_bitmap_releases(), ==, before);
  harness_qmp_ok("block-export-del", "{\"id\": \"bm2\"}");
  g_assert_cmpint(harness_bitmap_releases(), ==, before + 2);
  harness_qmp_ok("blockdev-del", "{\"node-name\": \"n-bm2\"}");
}

/* --- writes -------------------------------------------------------------------------------- */

static void
file_bytes(const char *name, guint64 off, guint8 *buf, gsize len)
{
  g_autofree char *path = g_build_filename(harness.dir, name, NULL);
  int fd = open(path, O_RDONLY);
  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpint(pread(fd, buf, len, off), ==, (gssize)len);
  close(fd);
}

static gpointer
client_write(gpointer data)
{
  const char *ctx[] = { "base:allocation", NULL };
  struct nbd_handle *h = open_export("rw", ctx);
  guint8 buf[8192], back[8192];

  memset(buf, 0x5A, sizeof buf);
  g_assert_cmpint(nbd_pwrite(h, buf, 4096, 8192, 0), ==, 0);
  g_assert_cmpint(nbd_pwrite(h, buf, 4096, 12288, LIBNBD_CMD_FLAG_FUA), ==, 0);
  g_assert_cmpint(nbd_flush(h, 0), ==, 0);
  file_bytes("rw.img", 8192, back, 8192);
  g_assert_cmpmem(back, 8192, buf, 8192);
  g_assert_cmpint(nbd_pread(h, back, 8192, 8192, 0), ==, 0);
  g_assert_cmpmem(back, 8192, buf, 8192);

  /* The write shows up as data in base:allocation. */
  g_autoptr(GPtrArray) st = block_status(h, 64 * KiB, 0, 0);
  const guint32 ext[] = { 8192, 3, 8192, 0, 1 * MiB - 16 * KiB, 3 }; /* to the run's end */
  assert_extents(find_ctx(st, "base:allocation"), ext, 3);

  /* WRITE_ZEROES with NO_HOLE, plain, and FAST_ZERO (success or a fast ENOTSUP). */
  g_assert_cmpint(nbd_zero(h, 4096, 8192, LIBNBD_CMD_FLAG_NO_HOLE), ==, 0);
  g_assert_cmpint(nbd_pread(h, back, 4096, 8192, 0), ==, 0);
  for (int i = 0; i < 4096; i++)
    g_assert_cmpint(back[i], ==, 0);
  g_assert_cmpint(nbd_zero(h, 2048, 12288, 0), ==, 0);
  g_assert_cmpint(nbd_pread(h, back, 4096, 12288, 0), ==, 0);
  for (int i = 0; i < 2048; i++)
    g_assert_cmpint(back[i], ==, 0);
  g_assert_cmpint(back[2048], ==, 0x5A);
  int r = nbd_zero(h, 2048, 14336, LIBNBD_CMD_FLAG_FAST_ZERO);
  if (r < 0) {
    g_assert_cmpint(nbd_get_errno(), ==, ENOTSUP);
    g_assert_cmpint(nbd_pread(h, back, 2048, 14336, 0), ==, 0);
    g_assert_cmpint(back[0], ==, 0x5A);
  } else {
    g_assert_cmpint(nbd_pread(h, back, 2048, 14336, 0), ==, 0);
    g_assert_cmpint(back[0], ==, 0);
  }
  /* TRIM is a hint; it must succeed and keep the connection going. */
  g_assert_cmpint(nbd_trim(h, 4096, 0, 0), ==, 0);
  g_assert_cmpint(nbd_trim(h, 4096, 0, LIBNBD_CMD_FLAG_FUA), ==, 0);

  /* Past the end: ENOSPC for writes and zeroes, EINVAL for trim. */
  nbd_set_strict_mode(h, 0);
  g_assert_cmpint(nbd_pwrite(h, buf, 4096, 1 * MiB - 2048, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, ENOSPC);
  g_assert_cmpint(nbd_zero(h, 4096, 1 * MiB, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, ENOSPC);
  g_assert_cmpint(nbd_trim(h, 4096, 1 * MiB, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  /* NO_HOLE on a write is a flag on the wrong command. */
  g_assert_cmpint(nbd_pwrite(h, buf, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pwrite(h, buf, 512, 0, 0), ==, 0);
  close_handle(h);
  return NULL;
}

static void
test_write(void)
{
  harness_run_client(client_write, NULL);
}

static gpointer
client_multi_conn(gpointer data)
{
  struct nbd_handle *a = open_export("rw", NULL), *b = open_export("rw", NULL);
  guint8 buf[4096], back[4096];

  for (int round = 0; round < 16; round++) {
    memset(buf, 0x10 + round, sizeof buf);
    struct nbd_handle *w = round % 2 ? a : b, *r = round % 2 ? b : a;
    g_assert_cmpint(nbd_pwrite(w, buf, sizeof buf, 256 * KiB + round * 4096, 0), ==, 0);
    g_assert_cmpint(nbd_flush(w, 0), ==, 0);
    g_assert_cmpint(nbd_pread(r, back, sizeof back, 256 * KiB + round * 4096, 0), ==, 0);
    g_assert_cmpmem(back, sizeof back, buf, sizeof buf);
  }
  close_handle(a);
  close_handle(b);
  return NULL;
}

static void
test_multi_conn(void)
{
  harness_run_client(client_multi_conn, NULL);
}

/* Eight connections with many requests in flight each, on disjoint slices; then every byte is
 * checked through a fresh connection (catches replies crossing requests or connections). */
#define PAR_CONNS 8
#define PAR_SLICE (512 * KiB)

static gpointer
client_parallel_one(gpointer data)
{
  guint idx = GPOINTER_TO_UINT(data);
  struct nbd_handle *h = open_export("par", NULL);
  GRand *rand = g_rand_new_with_seed(idx);
  g_autofree guint8 *shadow = g_malloc(PAR_SLICE);
  guint64 base = idx * PAR_SLICE;
  int64_t cookies[64];
  guint8 bufs[64][8192];

  memset(shadow, 0, PAR_SLICE);
  for (int round = 0; round < 20; round++) {
    /* 64 writes in flight (one per 8 KiB slot, in random order), then 64 reads. */
    guint32 slots[64];
    for (int k = 0; k < 64; k++)
      slots[k] = k;
    for (int k = 63; k > 0; k--) {
      int m = g_rand_int_range(rand, 0, k + 1);
      guint32 tmp = slots[k];
      slots[k] = slots[m];
      slots[m] = tmp;
    }
    for (int k = 0; k < 64; k++) {
      guint32 off = slots[k] * sizeof bufs[k];
      memset(bufs[k], (guint8)g_rand_int(rand), sizeof bufs[k]);
      memcpy(shadow + off, bufs[k], sizeof bufs[k]);
      cookies[k] = nbd_aio_pwrite(h, bufs[k], sizeof bufs[k], base + off, NBD_NULL_COMPLETION, 0);
      g_assert_cmpint(cookies[k], >, 0);
    }
    for (int k = 0; k < 64; k++) {
      int r;
      while ((r = nbd_aio_command_completed(h, cookies[k])) == 0)
        g_assert_cmpint(nbd_poll(h, -1), >=, 0);
      g_assert_cmpint(r, ==, 1);
    }
    guint32 roff[64];
    for (int i = 0; i < 64; i++) {
      roff[i] = g_rand_int_range(rand, 0, PAR_SLICE / 512 - 16) * 512;
      cookies[i] =
        nbd_aio_pread(h, bufs[i], sizeof bufs[i], base + roff[i], NBD_NULL_COMPLETION, 0);
      g_assert_cmpint(cookies[i], >, 0);
    }
    for (int i = 0; i < 64; i++) {
      int r;
      while ((r = nbd_aio_command_completed(h, cookies[i])) == 0)
        g_assert_cmpint(nbd_poll(h, -1), >=, 0);
      g_assert_cmpint(r, ==, 1);
      g_assert_cmpmem(bufs[i], sizeof bufs[i], shadow + roff[i], sizeof bufs[i]);
    }
  }
  g_assert_cmpint(nbd_flush(h, 0), ==, 0);
  close_handle(h);
  g_rand_free(rand);
  return g_steal_pointer(&shadow);
}

static gpointer
client_parallel(gpointer data)
{
  GThread *t[PAR_CONNS];
  guint8 *shadow[PAR_CONNS];
  for (guint i = 0; i < PAR_CONNS; i++)
    t[i] = g_thread_new("par", client_parallel_one, GUINT_TO_POINTER(i));
  for (guint i = 0; i < PAR_CONNS; i++)
    shadow[i] = g_thread_join(t[i]);

  struct nbd_handle *h = open_export("par", NULL);
  g_autofree guint8 *buf = g_malloc(PAR_SLICE);
  for (guint i = 0; i < PAR_CONNS; i++) {
    g_assert_cmpint(nbd_pread(h, buf, PAR_SLICE, i * PAR_SLICE, 0), ==, 0);
    g_assert_cmpmem(buf, PAR_SLICE, shadow[i], PAR_SLICE);
    g_free(shadow[i]);
  }
  close_handle(h);
  return NULL;
}

static void
test_parallel(void)
{
  harness_export("par", PAR_CONNS * PAR_SLICE, NULL, "\"writable\": true");
  harness_run_client(client_parallel, NULL);
  harness_unexport("par");
}

/* --- errors a stock client can provoke ----------------------------------------------------- */

static gpointer
client_errors(gpointer data)
{
  struct nbd_handle *h = open_export("ro", NULL);
  g_autofree guint8 *buf = g_malloc0(33 * MiB);

  nbd_set_strict_mode(h, 0);
  /* Writes of any kind to a read-only export: EPERM (spec), the payload consumed. */
  g_assert_cmpint(nbd_pwrite(h, buf, 4096, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EPERM);
  g_assert_cmpint(nbd_trim(h, 4096, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EPERM);
  g_assert_cmpint(nbd_zero(h, 4096, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EPERM);
  /* Range and size. */
  g_assert_cmpint(nbd_pread(h, buf, 4096, 1 * MiB - 100, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pread(h, buf, 1, 1 * MiB, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pread(h, buf, 0, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_cache(h, 4096, 1 * MiB, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  /* Flags on the wrong command, unknown flags. */
  g_assert_cmpint(nbd_pread(h, buf, 512, 0, LIBNBD_CMD_FLAG_REQ_ONE), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pread(h, buf, 512, 0, 0x40), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  /* Every error left the connection usable. */
  g_assert_cmpint(nbd_pread(h, buf, 4096, 64 * KiB, 0), ==, 0);
  g_assert_cmpint(buf[0], ==, 0xAA);
  close_handle(h);

  /* Above the 32 MiB maximum payload: EINVAL, write payload skipped, stream intact. */
  h = open_export("big", NULL);
  nbd_set_strict_mode(h, 0);
  g_assert_cmpint(nbd_pread(h, buf, 33 * MiB, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pwrite(h, buf, 33 * MiB, 0, 0), ==, -1);
  g_assert_cmpint(nbd_get_errno(), ==, EINVAL);
  g_assert_cmpint(nbd_pread(h, buf, 32 * MiB, 0, 0), ==, 0);
  memset(buf, 7, 4096);
  g_assert_cmpint(nbd_pwrite(h, buf, 32 * MiB, 0, 0), ==, 0);
  g_assert_cmpint(nbd_pread(h, buf + 4096, 4096, 0, 0), ==, 0);
  g_assert_cmpint(buf[4096], ==, 7);
  close_handle(h);

  /* BLOCK_STATUS without a selected context. */
  h = open_export("ro", NULL);
  g_assert_cmpint(nbd_can_meta_context(h, "base:allocation"), ==, 0);
  close_handle(h);
  return NULL;
}

static void
test_errors(void)
{
  harness_export("big", 64 * MiB, NULL, "\"writable\": true");
  harness_run_client(client_errors, NULL);
  harness_unexport("big");
}

/* --- export deletion ----------------------------------------------------------------------- */

static gpointer
client_hold(gpointer data)
{
  struct nbd_handle **hp = data;
  *hp = open_export("del1", NULL);
  guint8 b[512];
  g_assert_cmpint(nbd_pread(*hp, b, sizeof b, 0, 0), ==, 0);
  return NULL;
}

static gpointer
client_after_hard_del(gpointer data)
{
  struct nbd_handle *h = data;
  guint8 b[512];
  g_assert_cmpint(nbd_pread(h, b, sizeof b, 0, 0), ==, -1);
  nbd_close(h);
  /* The name is free again for new clients only after re-adding; now it is unknown. */
  struct nbd_handle *h2 = nbd_create();
  nbd_set_export_name(h2, "del1");
  g_assert_cmpint(nbd_connect_unix(h2, harness.sock), ==, -1);
  nbd_close(h2);
  return NULL;
}

static void
test_export_del(void)
{
  struct nbd_handle *h = NULL;

  harness_export("del1", 1 * MiB, NULL, NULL);
  harness_run_client(client_hold, &h);
  harness_qmp_fails("block-export-del", "{\"id\": \"del1\"}", "export 'del1' still in use");
  harness_qmp_fails("blockdev-del", "{\"node-name\": \"n-del1\"}", "Node n-del1 is in use");
  harness_qmp_ok("block-export-del", "{\"id\": \"del1\", \"mode\": \"hard\"}");
  harness_run_client(client_after_hard_del, h);
  harness_spin(50);
  g_autoptr(JsonNode) q = harness_qmp("query-block-exports", NULL, NULL);
  g_autofree char *text = json_to_string(q, FALSE);
  g_assert_null(strstr(text, "del1"));
  harness_qmp_ok("blockdev-del", "{\"node-name\": \"n-del1\"}");

  /* Without clients the deletion is immediate and the id reusable at once. */
  harness_export("del2", 1 * MiB, NULL, NULL);
  harness_qmp_ok("nbd-server-remove", "{\"name\": \"del2\"}");
  harness_qmp_fails("block-export-del", "{\"id\": \"del2\"}", "Export 'del2' is not found");
  harness_qmp_ok("blockdev-del", "{\"node-name\": \"n-del2\"}");
}

/* --- QMP ----------------------------------------------------------------------------------- */

static void
test_qmp_errors(void)
{
  g_autofree char *img = harness_image("q.img", 1 * MiB, NULL);
  harness_add_node("q0", img, FALSE);
  harness_add_node("qro", img, TRUE);

  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"1bad\", \"node-name\": "
                    "\"nope\"}",
                    "Invalid block export id");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"ro\", \"node-name\": "
                    "\"q0\"}",
                    "Block export id 'ro' is already in use");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"nope\"}",
                    "Cannot find device='' nor node-name='nope'");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"qro\", \"writable\": true, \"iothread\": \"x\"}",
                    "Cannot export read-only node as writable");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"iothread\": \"x\"}",
                    "iothread \"x\" not found");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"name\": \"ro\"}",
                    "NBD server already has export named 'ro'");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"bitmaps\": [\"nope\"]}",
                    "Bitmap 'nope' is not found");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"bitmaps\": [{\"node\": \"zz\", \"name\": \"b0\"}]}",
                    "Node 'zz' not found");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"fuse\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"mountpoint\": \"/tmp\"}",
                    "Export type 'fuse' is not supported by cbtd");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                    "\"q0\", \"bitmap\": \"x\"}",
                    "Parameter 'bitmap' is unexpected");

  g_autofree char *longname = g_strnfill(4097, 'x');
  g_autofree char *args = g_strdup_printf("{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": "
                                          "\"q0\", \"name\": \"%s\"}",
                                          longname);
  g_autofree char *msg = g_strdup_printf("export name '%s' too long", longname);
  harness_qmp_fails("block-export-add", args, msg);
  g_free(args);
  g_free(msg);
  args = g_strdup_printf("{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": \"q0\", "
                         "\"description\": \"%s\"}",
                         longname);
  msg = g_strdup_printf("description '%s' too long", longname);
  harness_qmp_fails("block-export-add", args, msg);

  /* Empty name and empty bitmaps list are accepted. */
  harness_qmp_ok("block-export-add", "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": \"q0\", "
                                     "\"name\": \"\", \"bitmaps\": []}");
  harness_qmp_ok("block-export-del", "{\"id\": \"e0\"}");

  harness_qmp_fails("nbd-server-start",
                    "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": "
                    "\"/nonexistent/x.sock\"}}}",
                    "NBD server already running");
  harness_qmp_fails("nbd-server-add", "{\"device\": \"nope\"}",
                    "Cannot find device='nope' nor node-name='nope'");
  harness_qmp_fails("nbd-server-add", "{\"device\": \"q0\", \"name\": \"ro\"}",
                    "Block export id 'ro' is already in use");
  harness_qmp_fails("nbd-server-remove", "{\"name\": \"nope\"}", "Export 'nope' is not found");
  harness_qmp_fails("block-export-del", "{\"id\": \"nope\"}", "Export 'nope' is not found");
  harness_qmp_fails("block-export-del", "{\"id\": \"ro\", \"mode\": \"soft\"}",
                    "Parameter 'mode' does not accept value 'soft'");

  g_autoptr(JsonNode) q = harness_qmp("query-block-exports", NULL, NULL);
  JsonArray *arr = json_node_get_array(q);
  g_assert_cmpint(json_array_get_length(arr), >=, 3);
  JsonObject *first = json_array_get_object_element(arr, 0); /* newest first */
  g_assert_cmpstr(json_object_get_string_member(first, "type"), ==, "nbd");
  g_assert_false(json_object_get_boolean_member(first, "shutting-down"));
  JsonObject *last = json_array_get_object_element(arr, json_array_get_length(arr) - 1);
  g_assert_cmpstr(json_object_get_string_member(last, "id"), ==, "ro");
  g_assert_cmpstr(json_object_get_string_member(last, "node-name"), ==, "n-ro");

  harness_qmp_ok("blockdev-del", "{\"node-name\": \"q0\"}");
  harness_qmp_ok("blockdev-del", "{\"node-name\": \"qro\"}");
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  harness_init();

  harness_export("ro", 1 * MiB, ro_ranges, "\"description\": \"the read-only export\"");
  harness_export("rw", 1 * MiB, NULL, "\"writable\": true");
  CbtBitmap *b0 = cbt_bitmap_new(1 * MiB, 64 * KiB), *b1 = cbt_bitmap_new(1 * MiB, 4096);
  cbt_bitmap_mark_range(b0, 64 * KiB, 1);
  cbt_bitmap_mark_range(b0, 512 * KiB + 100, 64 * KiB - 200);
  cbt_bitmap_mark_range(b1, 1 * MiB - 1, 1);
  harness_add_bitmap("b0", b0);
  harness_add_bitmap("b1", b1);
  harness_export("bm", 1 * MiB, NULL, "\"allocation-depth\": true, \"bitmaps\": [\"b0\", \"b1\"]");

  g_test_add_func("/nbd/info", test_info);
  g_test_add_func("/nbd/list", test_list);
  g_test_add_func("/nbd/list-meta", test_list_meta);
  g_test_add_func("/nbd/read", test_read);
  g_test_add_func("/nbd/base-allocation", test_base_allocation);
  g_test_add_func("/nbd/bitmaps", test_bitmaps);
  g_test_add_func("/nbd/write", test_write);
  g_test_add_func("/nbd/multi-conn", test_multi_conn);
  g_test_add_func("/nbd/parallel", test_parallel);
  g_test_add_func("/nbd/errors", test_errors);
  g_test_add_func("/nbd/export-del", test_export_del);
  g_test_add_func("/nbd/qmp-errors", test_qmp_errors);
  int ret = g_test_run();
  harness_fini();
  return ret;
}
