/* copy-before-write and snapshot-access (blockdev/copy-before-write.c, snapshot-access.c):
 * the frozen view under concurrent writers, zero-writes and discards (every byte a snapshot
 * read returns is checked against the image as it was), reads that start in a copied cluster
 * and run past it, both on-cbw-error modes with a target that fails, a bitmap that limits the
 * copy, the snapshot's discard, and the refusals (target too small, unaligned discard, a
 * snapshot-access over a node that keeps no view); blockdev-reopen inserting the filter under a
 * raw node that writers use and taking it out again, and its refusals.
 *
 * Nodes come from blockdev-add (cbt_rpc_execute), except the `test-faulty` nodes below, built by
 * hand: a pass-through over a real node that can fail writes and slow every request down, so a
 * copy and a snapshot read stay in flight long enough for the others to meet them.
 */
#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <string.h>
#include <unistd.h>
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define CLUSTER (64 * KiB)
#define SIZE (4 * MiB)

static CbtRpc *rpc;
static char *tmpdir;

/* ---- test-faulty: fails writes on demand, sleeps before every request ---------------------- */

typedef struct {
  gint fail_writes; /* atomic */
  gulong delay_us;
} Faulty;

static CbtBlockdev *
below(CbtBlockdev *bd)
{
  return bd->file->node;
}

static void
nap(CbtBlockdev *bd)
{
  gulong us = ((Faulty *)bd->opaque)->delay_us;

  if (us)
    g_usleep(us);
}

static int
f_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  nap(bd);
  return cbt_blockdev_pread(below(bd), buf, offset, len);
}

static int
f_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  nap(bd);
  if (g_atomic_int_get(&((Faulty *)bd->opaque)->fail_writes))
    return -EIO;
  return cbt_blockdev_pwrite(below(bd), buf, offset, len, flags);
}

static int
f_flush(CbtBlockdev *bd)
{
  return cbt_blockdev_flush(below(bd));
}

static int
f_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return cbt_blockdev_discard(below(bd), offset, len, 0);
}

static int
f_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  nap(bd);
  return cbt_blockdev_write_zeroes(below(bd), offset, len, flags);
}

static int
f_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  return cbt_blockdev_block_status(below(bd), offset, len, pnum, status);
}

static void
f_close(CbtBlockdev *bd)
{
  g_clear_pointer(&bd->opaque, g_free);
}

static const CbtBlockdevChildSpec f_children[] = {
  { "file", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY | CBT_BLOCKDEV_CHILD_FILTERED },
  { NULL, 0 },
};

static const CbtBlockdevDriver faulty_driver = {
  .name = "test-faulty",
  .is_filter = TRUE,
  .children = f_children,
  .close = f_close,
  .pread = f_pread,
  .pwrite = f_pwrite,
  .flush = f_flush,
  .discard = f_discard,
  .write_zeroes = f_write_zeroes,
  .block_status = f_block_status,
};

/* A test-faulty node @name over @child, published (the caller owns the one reference). */
static CbtBlockdev *
faulty(const char *name, CbtBlockdev *child, gulong delay_us)
{
  CbtBlockdev *bd = cbt_blockdev_new(&faulty_driver);
  Faulty *f = g_new0(Faulty, 1);

  f->delay_us = delay_us;
  bd->opaque = f;
  bd->node_name = g_strdup(name);
  bd->full_opts = json_object_new();
  bd->exact_filename = g_strdup(name);
  bd->discard_unmap = TRUE;
  cbt_blockdev_attach_child(bd, child, "file", f_children[0].role);
  bd->size = child->size;
  g_assert_true(cbt_blockdev_refresh_perms(bd, NULL));
  cbt_blockdev_register(bd);
  return bd;
}

static void
set_failing(CbtBlockdev *bd, gboolean fail)
{
  g_atomic_int_set(&((Faulty *)bd->opaque)->fail_writes, fail);
}

/* ---- helpers ------------------------------------------------------------------------------ */

static char *
tmp_path(const char *name)
{
  return g_build_filename(tmpdir, name, NULL);
}

/* A sparse file of SIZE bytes; @image (SIZE bytes, or NULL for all holes) is written where it
 * is not zero, 4 KiB at a time, so its zero pages stay holes. */
static char *
make_file(const char *name, guint64 size, const guint8 *image)
{
  char *path = tmp_path(name);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  static const guint8 zero[4 * KiB];

  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpint(ftruncate(fd, (off_t)size), ==, 0);
  for (guint64 off = 0; image && off < size; off += sizeof(zero))
    if (memcmp(image + off, zero, sizeof(zero)) != 0)
      g_assert_cmpint(pwrite(fd, image + off, sizeof(zero), (off_t)off), ==, sizeof(zero));
  close(fd);
  return path;
}

static gboolean try_add(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static gboolean
try_add(GError **error, const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  g_autofree char *json = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_autoptr(JsonNode) args = cbt_rpc_json_parse(json, -1, error);
  g_assert_nonnull(args);
  g_autoptr(JsonNode) ret =
    cbt_rpc_execute(rpc, "blockdev-add", json_node_get_object(args), FALSE, error);
  return ret != NULL;
}

static void
del(const char *name)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();

  json_object_set_string_member(args, "node-name", name);
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_no_error(error);
}

/* The image a test starts from: a pattern in about half of the 16 KiB blocks, holes elsewhere,
 * and a short run of bytes inside one hole block (a zero run with unaligned edges). */
static guint8 *
make_image(guint32 seed)
{
  guint8 *img = g_malloc0(SIZE);
  GRand *r = g_rand_new_with_seed(seed);

  for (guint64 off = 0; off < SIZE; off += 16 * KiB)
    if (off == 0 || g_rand_boolean(r)) /* the first block has data: its copy writes */
      for (guint i = 0; i < 16 * KiB; i++)
        img[off + i] = (guint8)g_rand_int(r) | 1;
  memset(img + SIZE / 2 + 1000, 0x7f, 300);
  g_rand_free(r);
  return img;
}

/* The graph of a fleecing test: src (file) [under a slow test-faulty node], scratch file + raw
 * tgt [under a test-faulty node], cbw over them, snap over cbw. */
typedef struct {
  guint8 *frozen;
  CbtBlockdev *src, *tgt, *cbw, *snap;
  CbtBlockdev *fsrc, *ftgt; /* test-faulty nodes, owned */
} Fleece;

static void
fleece_open(Fleece *f, const char *on_error, gulong delay_us, const char *extra)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *src = make_file("src.img", SIZE, f->frozen = make_image(g_test_rand_int()));
  g_autofree char *scr = make_file("scratch.img", SIZE, NULL);

  g_assert_true(try_add(&error,
                        "{\"driver\": \"file\", \"node-name\": \"src\", \"filename\": \"%s\", "
                        "\"discard\": \"unmap\"}",
                        src));
  g_assert_true(try_add(&error,
                        "{\"driver\": \"raw\", \"node-name\": \"tgt\", \"discard\": \"unmap\", "
                        "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}",
                        scr));
  f->src = cbt_blockdev_find("src");
  f->tgt = cbt_blockdev_find("tgt");
  f->fsrc = faulty("fsrc", f->src, delay_us);
  f->ftgt = faulty("ftgt", f->tgt, delay_us);
  g_assert_true(try_add(&error,
                        "{\"driver\": \"copy-before-write\", \"node-name\": \"cbw\", \"file\": "
                        "\"fsrc\", \"target\": \"ftgt\", \"on-cbw-error\": \"%s\", "
                        "\"discard\": \"unmap\"%s}",
                        on_error, extra ? extra : ""));
  g_assert_no_error(error);
  g_assert_true(try_add(&error,
                        "{\"driver\": \"snapshot-access\", \"node-name\": \"snap\", \"file\": "
                        "\"cbw\", \"discard\": \"unmap\"}"));
  f->cbw = cbt_blockdev_find("cbw");
  f->snap = cbt_blockdev_find("snap");
}

static void
fleece_close(Fleece *f)
{
  del("snap");
  del("cbw");
  cbt_blockdev_unref(f->fsrc);
  cbt_blockdev_unref(f->ftgt);
  del("tgt");
  del("src");
  g_free(f->frozen);
  g_assert_null(cbt_blockdev_list());
}

static int
io_pwrite(CbtBlockdev *bd, const void *buf, guint64 off, gsize len)
{
  cbt_blockdev_io_begin(bd);
  int r = cbt_blockdev_pwrite(bd, buf, off, len, 0);
  cbt_blockdev_io_end(bd);
  return r;
}

static int
io_pread(CbtBlockdev *bd, void *buf, guint64 off, gsize len)
{
  cbt_blockdev_io_begin(bd);
  int r = cbt_blockdev_pread(bd, buf, off, len);
  cbt_blockdev_io_end(bd);
  return r;
}

/* The snapshot, read whole, is the frozen image; its status never calls frozen data a hole. */
static void
check_snapshot(Fleece *f)
{
  g_autofree guint8 *buf = g_malloc(SIZE);

  g_assert_cmpint(io_pread(f->snap, buf, 0, SIZE), ==, 0);
  g_assert_true(memcmp(buf, f->frozen, SIZE) == 0);
  for (guint64 pos = 0; pos < SIZE;) {
    guint64 pnum;
    guint32 st;
    g_assert_cmpint(cbt_blockdev_block_status(f->snap, pos, SIZE - pos, &pnum, &st), ==, 0);
    if (st & CBT_BLOCKDEV_STATUS_ZERO)
      for (guint64 i = pos; i < pos + pnum; i++)
        g_assert_cmpint(f->frozen[i], ==, 0);
    pos += pnum;
  }
}

/* ---- concurrency ----------------------------------------------------------------------------- */

typedef struct {
  Fleece *f;
  gint64 deadline;
  guint32 seed;
  guint ops, checked_bytes;
  gboolean may_be_discarded; /* reader: EACCES is a right answer (the view shrinks) */
} Worker;

static guint64
rand_len(GRand *r)
{
  /* Mostly below a cluster, sometimes several: requests straddle cluster edges. */
  return g_rand_boolean(r) ? g_rand_int_range(r, 1, 8 * KiB) : g_rand_int_range(r, 1, 300 * KiB);
}

static gpointer
writer(gpointer data)
{
  Worker *w = data;
  GRand *r = g_rand_new_with_seed(w->seed);
  g_autofree guint8 *buf = g_malloc(300 * KiB);

  while (g_get_monotonic_time() < w->deadline) {
    guint64 len = rand_len(r), off = g_rand_int_range(r, 0, SIZE - len);
    memset(buf, g_rand_int_range(r, 0x80, 0x100), len);
    CbtBlockdev *cbw = w->f->cbw;
    cbt_blockdev_io_begin(cbw);
    switch (g_rand_int_range(r, 0, 4)) {
    case 0:
      g_assert_cmpint(cbt_blockdev_write_zeroes(cbw, off, len, CBT_BLOCKDEV_MAY_UNMAP), ==, 0);
      break;
    case 1:
      g_assert_cmpint(cbt_blockdev_discard(cbw, off, len, 0), ==, 0);
      break;
    default:
      g_assert_cmpint(cbt_blockdev_pwrite(cbw, buf, off, len, 0), ==, 0);
    }
    cbt_blockdev_io_end(cbw);
    w->ops++;
  }
  g_rand_free(r);
  return NULL;
}

static gpointer
reader(gpointer data)
{
  Worker *w = data;
  GRand *r = g_rand_new_with_seed(w->seed);
  g_autofree guint8 *buf = g_malloc(300 * KiB);

  while (g_get_monotonic_time() < w->deadline) {
    guint64 len = rand_len(r), off = g_rand_int_range(r, 0, SIZE - len);
    int ret = io_pread(w->f->snap, buf, off, len);
    if (ret == -EACCES && w->may_be_discarded)
      continue;
    g_assert_cmpint(ret, ==, 0);
    if (memcmp(buf, w->f->frozen + off, len) != 0)
      g_error("snapshot read [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT
              ") differs from the frozen image",
              off, len);
    w->ops++;
    w->checked_bytes += len;
  }
  g_rand_free(r);
  return NULL;
}

/* Four writers (writes, zero-writes, discards, overlapping at random) and three snapshot
 * readers for a second, through slow children so copies and reads overlap: every byte read
 * is the frozen image's, and so is the whole snapshot after. */
static void
test_concurrent(void)
{
  Fleece f;
  Worker w[7];
  GThread *t[7];

  fleece_open(&f, "break-guest-write", 200, NULL);
  for (guint i = 0; i < G_N_ELEMENTS(w); i++) {
    w[i] = (Worker){ &f, g_get_monotonic_time() + G_USEC_PER_SEC, g_test_rand_int() };
    t[i] = g_thread_new(i < 4 ? "writer" : "reader", i < 4 ? writer : reader, &w[i]);
  }
  guint writes = 0, reads = 0;
  for (guint i = 0; i < G_N_ELEMENTS(w); i++) {
    g_thread_join(t[i]);
    *(i < 4 ? &writes : &reads) += w[i].ops;
  }
  g_test_message("%u writes, %u snapshot reads checked", writes, reads);
  g_assert_cmpuint(writes, >, 50);
  g_assert_cmpuint(reads, >, 50);
  check_snapshot(&f);
  fleece_close(&f);
}

/* Discards of the snapshot, cluster by cluster in random order, while writers write and
 * readers read: a read returns the frozen data or EACCES, never the scratch's zeroes. */
static gpointer
discarder(gpointer data)
{
  Worker *w = data;
  GRand *r = g_rand_new_with_seed(w->seed);
  guint n = SIZE / CLUSTER;
  g_autofree guint *order = g_new(guint, n);

  for (guint i = 0; i < n; i++)
    order[i] = i;
  for (guint i = n - 1; i > 0; i--) {
    guint j = g_rand_int_range(r, 0, i + 1), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (guint i = 0; i < n && g_get_monotonic_time() < w->deadline; i++) {
    cbt_blockdev_io_begin(w->f->snap);
    g_assert_cmpint(cbt_blockdev_discard(w->f->snap, order[i] * CLUSTER, CLUSTER, 0), ==, 0);
    cbt_blockdev_io_end(w->f->snap);
    w->ops++;
    g_usleep(500);
  }
  g_rand_free(r);
  return NULL;
}

static void
test_concurrent_discard(void)
{
  Fleece f;
  Worker w[6];
  GThread *t[6];

  fleece_open(&f, "break-guest-write", 100, NULL);
  for (guint i = 0; i < G_N_ELEMENTS(w); i++) {
    w[i] = (Worker){ &f, g_get_monotonic_time() + G_USEC_PER_SEC / 2, g_test_rand_int() };
    w[i].may_be_discarded = TRUE;
    GThreadFunc fn = i < 2 ? writer : i < 5 ? reader : discarder;
    t[i] = g_thread_new("worker", fn, &w[i]);
  }
  for (guint i = 0; i < G_N_ELEMENTS(w); i++)
    g_thread_join(t[i]);
  g_assert_cmpuint(w[5].ops, >, 10);
  fleece_close(&f);
}

/* ---- single cases ------------------------------------------------------------------------ */

/* A read that starts in a copied cluster and runs past it, into one not copied yet whose
 * source then changes, never sees the new data (qemu-storage-daemon 7.2 serves it live). */
static void
test_spanning_read(void)
{
  Fleece f;
  guint8 buf[3 * CLUSTER], new_data[CLUSTER];

  fleece_open(&f, "break-guest-write", 0, NULL);
  memset(new_data, 0xee, sizeof(new_data));
  g_assert_cmpint(io_pwrite(f.cbw, new_data, 0, CLUSTER), ==, 0);
  /* Cluster 1 is not copied: a write that reaches it now copies it first. */
  g_assert_cmpint(io_pwrite(f.cbw, new_data, CLUSTER + 100, 10), ==, 0);
  g_assert_cmpint(io_pread(f.snap, buf, 100, sizeof(buf)), ==, 0);
  g_assert_true(memcmp(buf, f.frozen + 100, sizeof(buf)) == 0);
  g_assert_cmpint(io_pread(f.cbw, buf, 0, CLUSTER), ==, 0);
  g_assert_true(memcmp(buf, new_data, CLUSTER) == 0);
  check_snapshot(&f);
  fleece_close(&f);
}

/* break-guest-write: a failed copy fails the write, the source keeps its old data and the
 * snapshot stays whole; once the target works again the same write goes through. */
static void
test_break_guest_write(void)
{
  Fleece f;
  guint8 data[1000], buf[1000];

  fleece_open(&f, "break-guest-write", 0, NULL);
  memset(data, 0xcc, sizeof(data));
  set_failing(f.ftgt, TRUE);
  g_assert_cmpint(io_pwrite(f.cbw, data, 5000, sizeof(data)), ==, -EIO);
  g_assert_cmpint(io_pread(f.src, buf, 5000, sizeof(buf)), ==, 0);
  g_assert_true(memcmp(buf, f.frozen + 5000, sizeof(buf)) == 0);
  check_snapshot(&f);
  set_failing(f.ftgt, FALSE);
  g_assert_cmpint(io_pwrite(f.cbw, data, 5000, sizeof(data)), ==, 0);
  g_assert_cmpint(io_pread(f.src, buf, 5000, sizeof(buf)), ==, 0);
  g_assert_true(memcmp(buf, data, sizeof(buf)) == 0);
  check_snapshot(&f);
  fleece_close(&f);
}

/* break-snapshot: the write goes on and every snapshot read fails with EACCES from then on. */
static void
test_break_snapshot(void)
{
  Fleece f;
  guint8 data[1000], buf[1000];
  guint64 pnum;
  guint32 st;

  fleece_open(&f, "break-snapshot", 0, NULL);
  memset(data, 0xcc, sizeof(data));
  g_assert_cmpint(io_pread(f.snap, buf, 3 * MiB, sizeof(buf)), ==, 0);
  set_failing(f.ftgt, TRUE);
  g_assert_cmpint(io_pwrite(f.cbw, data, 5000, sizeof(data)), ==, 0);
  g_assert_cmpint(io_pread(f.src, buf, 5000, sizeof(buf)), ==, 0);
  g_assert_true(memcmp(buf, data, sizeof(buf)) == 0);
  set_failing(f.ftgt, FALSE);
  g_assert_cmpint(io_pread(f.snap, buf, 3 * MiB, sizeof(buf)), ==, -EACCES);
  g_assert_cmpint(cbt_blockdev_block_status(f.snap, 0, SIZE, &pnum, &st), ==, -EACCES);
  /* Writes still work, without copying. */
  g_assert_cmpint(io_pwrite(f.cbw, data, 2 * MiB, sizeof(data)), ==, 0);
  fleece_close(&f);
}

/* Discard of the snapshot: unaligned is refused; whole clusters leave the view (EACCES), are
 * dropped from the target and are never copied again. */
static void
test_snapshot_discard(void)
{
  Fleece f;
  guint8 buf[4096];
  guint64 pnum;
  guint32 st;

  fleece_open(&f, "break-guest-write", 0, NULL);
  memset(buf, 0x11, sizeof(buf));
  g_assert_cmpint(io_pwrite(f.cbw, buf, 0, sizeof(buf)), ==, 0); /* cluster 0 copied */
  cbt_blockdev_io_begin(f.snap);
  g_assert_cmpint(cbt_blockdev_discard(f.snap, 512, CLUSTER, 0), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_discard(f.snap, 0, 2 * CLUSTER, 0), ==, 0);
  cbt_blockdev_io_end(f.snap);
  g_assert_cmpint(io_pread(f.snap, buf, 100, 10), ==, -EACCES);
  g_assert_cmpint(io_pread(f.snap, buf, 2 * CLUSTER - 10, 20), ==, -EACCES);
  g_assert_cmpint(io_pread(f.snap, buf, 2 * CLUSTER, sizeof(buf)), ==, 0);
  /* Cluster 1 is no longer copied: the target stays a hole there. */
  g_assert_cmpint(io_pwrite(f.cbw, buf, CLUSTER, sizeof(buf)), ==, 0);
  g_assert_cmpint(cbt_blockdev_block_status(f.tgt, 0, 2 * CLUSTER, &pnum, &st), ==, 0);
  g_assert_cmpuint(pnum, ==, 2 * CLUSTER);
  g_assert_cmpuint(st, ==, CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO);
  fleece_close(&f);
}

/* Once the filter has a user, a writer that would reach its source around it is refused with
 * QEMU's text; the filter itself and its scratch stay writable. */
static void
test_no_bypass(void)
{
  g_autoptr(GError) error = NULL;
  Fleece f;

  fleece_open(&f, "break-guest-write", 0, NULL);
  g_assert_false(cbt_blockdev_acquire_write(f.src, &error));
  g_assert_cmpstr(error->message, ==,
                  "Permission conflict on node 'src': permissions 'write' are both required by "
                  "an unnamed block device (uses node 'src' as 'root' child) and unshared by "
                  "node 'fsrc' (uses node 'src' as 'file' child).");
  g_assert_true(cbt_blockdev_acquire_write(f.cbw, NULL));
  g_assert_true(cbt_blockdev_acquire_write(f.tgt, NULL));
  cbt_blockdev_release_write(f.tgt);
  cbt_blockdev_release_write(f.cbw);
  fleece_close(&f);
}

/* The bitmap option: only its clusters are copied and readable. */
static CbtBitmap *
bitmap_cluster_3(const char *node, const char *name, GError **error)
{
  if (!g_str_equal(name, "b0")) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Dirty bitmap '%s' not found", name);
    return NULL;
  }
  CbtBitmap *bm = cbt_bitmap_new(SIZE, 512);
  cbt_bitmap_mark_range(bm, 3 * CLUSTER + 512, 512);
  return bm;
}

static void
test_bitmap(void)
{
  g_autoptr(GError) error = NULL;
  Fleece f;
  guint8 buf[2 * CLUSTER];

  cbt_blockdev_set_bitmap_copy(bitmap_cluster_3);
  fleece_open(&f, "break-guest-write", 0, ", \"bitmap\": {\"node\": \"src\", \"name\": \"b0\"}");
  memset(buf, 0x22, sizeof(buf));
  g_assert_cmpint(io_pwrite(f.cbw, buf, 2 * CLUSTER, sizeof(buf)), ==, 0);
  g_assert_cmpint(io_pread(f.snap, buf, 3 * CLUSTER, CLUSTER), ==, 0);
  g_assert_true(memcmp(buf, f.frozen + 3 * CLUSTER, CLUSTER) == 0);
  g_assert_cmpint(io_pread(f.snap, buf, 2 * CLUSTER, CLUSTER), ==, -EACCES);
  g_assert_cmpint(io_pread(f.snap, buf, 3 * CLUSTER, CLUSTER + 1), ==, -EACCES);
  fleece_close(&f);
  g_assert_false(try_add(&error, "{\"driver\": \"copy-before-write\", \"node-name\": \"x\", "
                                 "\"file\": {\"driver\": \"null-co\"}, \"target\": {\"driver\": "
                                 "\"null-co\"}, \"bitmap\": {\"node\": \"n\", \"name\": \"b1\"}}"));
  g_assert_cmpstr(error->message, ==, "Dirty bitmap 'b1' not found");
  cbt_blockdev_set_bitmap_copy(NULL);
  g_assert_null(cbt_blockdev_list());
}

/* Refusals: a target smaller than the source (7.2 asserts later), a read-only target; a
 * snapshot-access over a node that keeps no view opens, as in 7.2, and its reads fail. */
static void
test_refusals(void)
{
  g_autoptr(GError) error = NULL;
  guint8 buf[512];

  g_assert_false(try_add(&error, "{\"driver\": \"copy-before-write\", \"node-name\": \"x\", "
                                 "\"file\": {\"driver\": \"null-co\", \"node-name\": \"big\"}, "
                                 "\"target\": {\"driver\": \"null-co\", \"node-name\": \"small\", "
                                 "\"size\": 4096}}"));
  g_assert_cmpstr(error->message, ==,
                  "Target node 'small' (4096 bytes) is smaller than the source 'big' "
                  "(1073741824 bytes)");
  g_clear_error(&error);
  g_assert_false(try_add(&error, "{\"driver\": \"copy-before-write\", \"node-name\": \"x\", "
                                 "\"file\": {\"driver\": \"null-co\"}, \"target\": {\"driver\": "
                                 "\"null-co\", \"read-only\": true}}"));
  g_assert_cmpstr(error->message, ==, "Block node is read-only");
  g_clear_error(&error);
  g_assert_null(cbt_blockdev_list());
  g_assert_true(try_add(&error, "{\"driver\": \"null-co\", \"node-name\": \"n0\"}"));
  g_assert_true(try_add(&error,
                        "{\"driver\": \"snapshot-access\", \"node-name\": \"s0\", \"file\": "
                        "\"n0\"}"));
  CbtBlockdev *s0 = cbt_blockdev_find("s0");
  g_assert_cmpint(io_pread(s0, buf, 0, sizeof(buf)), ==, -ENOTSUP);
  g_assert_cmpint(io_pwrite(s0, buf, 0, sizeof(buf)), ==, -ENOTSUP);
  del("s0");
  del("n0");
}

/* ---- blockdev-reopen: the filter inserted under a format node in use ---------------------- */

static gboolean try_reopen(GError **error, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static gboolean
try_reopen(GError **error, const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  g_autofree char *json = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_autofree char *wrapped = g_strdup_printf("{\"options\": [%s]}", json);
  g_autoptr(JsonNode) args = cbt_rpc_json_parse(wrapped, -1, error);
  g_assert_nonnull(args);
  g_autoptr(JsonNode) ret =
    cbt_rpc_execute(rpc, "blockdev-reopen", json_node_get_object(args), FALSE, error);
  return ret != NULL;
}

#define REOPEN_BLOCK (4 * KiB)
#define REOPEN_WRITERS 4
#define FMT_ON(child) "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": \"" child "\"}"

/* The raw node fmt over the file src, the scratch tgt, and cbw over src (unused yet). */
static void
reopen_graph_open(void)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *src = make_file("src.img", SIZE, NULL);
  g_autofree char *scr = make_file("scratch.img", SIZE, NULL);

  g_assert_true(
    try_add(&error, "{\"driver\": \"file\", \"node-name\": \"src\", \"filename\": \"%s\"}", src));
  g_assert_true(
    try_add(&error, "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": \"src\"}"));
  g_assert_true(try_add(&error,
                        "{\"driver\": \"raw\", \"node-name\": \"tgt\", \"file\": {\"driver\": "
                        "\"file\", \"filename\": \"%s\"}}",
                        scr));
  g_assert_true(try_add(&error, "{\"driver\": \"copy-before-write\", \"node-name\": \"cbw\", "
                                "\"file\": \"src\", \"target\": \"tgt\"}"));
  g_assert_no_error(error);
}

static void
reopen_graph_close(void)
{
  for (const char *const *n = (const char *const[]){ "fmt", "cbw", "tgt", "src", NULL }; *n; n++)
    del(*n);
  g_assert_null(cbt_blockdev_list());
}

/* Writers of fmt while the main thread swaps its child: each owns the blocks b with
 * b % REOPEN_WRITERS == its index and writes them with rising values (value and block in every
 * word), recording per block the last value written before the freeze began and the first one
 * begun after it ended. */
typedef struct {
  CbtBlockdev *fmt;
  guint index;
  gint *phase; /* 0 before the freeze, 1 during blockdev-reopen, 2 after, 3: stop */
  guint32 last[SIZE / REOPEN_BLOCK];
  guint32 before[SIZE / REOPEN_BLOCK];
  guint32 after[SIZE / REOPEN_BLOCK];
} ReopenWriter;

static void
fill_block(guint32 *words, guint32 block, guint32 value)
{
  for (guint i = 0; i < REOPEN_BLOCK / 4; i += 2) {
    words[i] = value;
    words[i + 1] = block;
  }
}

static gpointer
reopen_writer(gpointer data)
{
  ReopenWriter *w = data;
  g_autoptr(GRand) r = g_rand_new_with_seed(w->index + 1);
  guint32 words[REOPEN_BLOCK / 4];

  while (g_atomic_int_get(w->phase) != 3) {
    guint32 b =
      g_rand_int_range(r, 0, SIZE / REOPEN_BLOCK / REOPEN_WRITERS) * REOPEN_WRITERS + w->index;
    guint32 v = ++w->last[b];
    gint p0 = g_atomic_int_get(w->phase);
    fill_block(words, b, v);
    g_assert_cmpint(io_pwrite(w->fmt, words, (guint64)b * REOPEN_BLOCK, sizeof(words)), ==, 0);
    if (g_atomic_int_get(w->phase) == 0)
      w->before[b] = v;
    if (p0 == 2 && !w->after[b])
      w->after[b] = v;
  }
  return NULL;
}

/* The value of block @b read from @bd; the block must be one whole write. */
static guint32
block_value(CbtBlockdev *bd, guint32 b)
{
  guint32 words[REOPEN_BLOCK / 4], expect[REOPEN_BLOCK / 4];

  g_assert_cmpint(io_pread(bd, words, (guint64)b * REOPEN_BLOCK, sizeof(words)), ==, 0);
  if (words[0] == 0 && words[1] == 0)
    return 0;
  fill_block(expect, b, words[0]);
  g_assert_true(memcmp(words, expect, sizeof(words)) == 0);
  return words[0];
}

static void
run_writers(ReopenWriter *w, GThread **t, CbtBlockdev *fmt, gint *phase)
{
  for (guint i = 0; i < REOPEN_WRITERS; i++) {
    w[i].fmt = fmt;
    w[i].index = i;
    w[i].phase = phase;
    t[i] = g_thread_new("writer", reopen_writer, &w[i]);
  }
}

/* The freeze under writers: the snapshot holds, for every block, a value written no earlier
 * than the last write completed before blockdev-reopen began, and earlier than the first one
 * begun after it returned (a write that reached src around the filter breaks this); a reopen
 * back while the snapshot is in use is a permission conflict that leaves the filter in place;
 * after the reopen back, src holds every block's last write. */
static void
test_reopen_writers(void)
{
  g_autoptr(GError) error = NULL;
  g_autofree ReopenWriter *w = g_new0(ReopenWriter, REOPEN_WRITERS);
  GThread *t[REOPEN_WRITERS];
  gint phase = 0;

  reopen_graph_open();
  CbtBlockdev *fmt = cbt_blockdev_find("fmt"), *src = cbt_blockdev_find("src");
  g_assert_true(cbt_blockdev_acquire_write(fmt, &error));
  run_writers(w, t, fmt, &phase);
  g_usleep(50000);
  g_atomic_int_set(&phase, 1);
  g_assert_true(try_reopen(&error, FMT_ON("cbw")));
  g_atomic_int_set(&phase, 2);
  g_assert_true(fmt->file->node == cbt_blockdev_find("cbw"));
  g_assert_true(try_add(&error, "{\"driver\": \"snapshot-access\", \"node-name\": \"snap\", "
                                "\"file\": \"cbw\"}"));
  g_usleep(50000);
  /* With the snapshot in use the filter unshares write on src: fmt may not go back. */
  g_assert_false(try_reopen(&error, FMT_ON("src")));
  g_assert_cmpstr(error->message, ==,
                  "Permission conflict on node 'src': permissions 'write' are both required by "
                  "node 'fmt' (uses node 'src' as 'file' child) and unshared by node 'cbw' (uses "
                  "node 'src' as 'file' child).");
  g_clear_error(&error);
  g_assert_true(fmt->file->node == cbt_blockdev_find("cbw"));
  g_usleep(50000);
  g_atomic_int_set(&phase, 3);
  for (guint i = 0; i < REOPEN_WRITERS; i++)
    g_thread_join(t[i]);
  CbtBlockdev *snap = cbt_blockdev_find("snap");
  for (guint32 b = 0; b < SIZE / REOPEN_BLOCK; b++) {
    ReopenWriter *o = &w[b % REOPEN_WRITERS];
    guint32 v = block_value(snap, b);
    g_assert_cmpuint(v, >=, o->before[b]);
    if (o->after[b])
      g_assert_cmpuint(v, <, o->after[b]);
    g_assert_cmpuint(block_value(src, b), ==, o->last[b]);
  }
  del("snap");
  phase = 0;
  run_writers(w, t, fmt, &phase);
  g_usleep(20000);
  g_assert_true(try_reopen(&error, FMT_ON("src")));
  g_assert_no_error(error);
  g_usleep(20000);
  g_atomic_int_set(&phase, 3);
  for (guint i = 0; i < REOPEN_WRITERS; i++)
    g_thread_join(t[i]);
  g_assert_true(fmt->file->node == src);
  for (guint32 b = 0; b < SIZE / REOPEN_BLOCK; b++)
    g_assert_cmpuint(block_value(src, b), ==, w[b % REOPEN_WRITERS].last[b]);
  cbt_blockdev_release_write(fmt);
  reopen_graph_close();
}

/* Bad requests change nothing: every entry is checked before any edge moves. */
static void
test_reopen_refusals(void)
{
  static const struct {
    const char *options, *message;
  } cases[] = {
    { "", "blockdev-reopen needs the options of at least one node" },
    { "{\"driver\": \"raw\", \"file\": \"cbw\"}", "node-name not specified" },
    { "{\"driver\": \"raw\", \"node-name\": \"no\", \"file\": \"cbw\"}",
      "Failed to find node with node-name='no'" },
    { "{\"driver\": \"null-co\", \"node-name\": \"fmt\"}", "Cannot change the option 'driver'" },
    { FMT_ON("nonode"), "Cannot find device='' nor node-name='nonode'" },
    { FMT_ON("fmt"), "Making 'fmt' a file child of 'fmt' would create a cycle" },
    { "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": \"cbw\", \"force-share\": true, "
      "\"read-only\": true}",
      "Cannot change the option 'force-share'" },
    { "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": \"cbw\", \"read-only\": true}",
      "cbtd cannot change the option 'read-only' of node 'fmt' by blockdev-reopen" },
    { "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": \"cbw\", \"offset\": 512}",
      "cbtd cannot change the option 'offset' of node 'fmt' by blockdev-reopen" },
    { "{\"driver\": \"raw\", \"node-name\": \"fmt\", \"file\": {\"driver\": \"null-co\"}}",
      "Cannot change the option 'file.driver'" },
    { "{\"driver\": \"file\", \"node-name\": \"src\", \"filename\": \"x\"}",
      "cbtd cannot reopen node 'src': blockdev-reopen supports raw nodes only, not 'file'" },
    { FMT_ON("cbw") ", " FMT_ON("src"),
      "cbtd cannot reopen node 'fmt' twice in one blockdev-reopen" },
    { FMT_ON("cbw") ", {\"driver\": \"raw\", \"node-name\": \"tgt\", \"file\": \"nonode\"}",
      "Cannot find device='' nor node-name='nonode'" },
    /* The scratch's raw node over cbw: cbw's target would lie below itself. */
    { "{\"driver\": \"raw\", \"node-name\": \"tgt\", \"file\": \"cbw\"}",
      "Making 'cbw' a file child of 'tgt' would create a cycle" },
  };

  reopen_graph_open();
  CbtBlockdev *fmt = cbt_blockdev_find("fmt"), *src = cbt_blockdev_find("src");
  CbtBlockdev *tgt = cbt_blockdev_find("tgt");
  CbtBlockdev *scratch = tgt->file->node;
  for (gsize i = 0; i < G_N_ELEMENTS(cases); i++) {
    g_autoptr(GError) error = NULL;
    g_assert_false(try_reopen(&error, "%s", cases[i].options));
    g_assert_cmpstr(error->message, ==, cases[i].message);
    g_assert_true(fmt->file->node == src);
    g_assert_true(tgt->file->node == scratch);
  }
  reopen_graph_close();
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_qmp_register_block_core(rpc);
  tmpdir = g_dir_make_tmp("test-fleecing-XXXXXX", &error);
  g_assert_no_error(error);
  g_test_add_func("/fleecing/concurrent", test_concurrent);
  g_test_add_func("/fleecing/concurrent-discard", test_concurrent_discard);
  g_test_add_func("/fleecing/spanning-read", test_spanning_read);
  g_test_add_func("/fleecing/break-guest-write", test_break_guest_write);
  g_test_add_func("/fleecing/break-snapshot", test_break_snapshot);
  g_test_add_func("/fleecing/snapshot-discard", test_snapshot_discard);
  g_test_add_func("/fleecing/no-bypass", test_no_bypass);
  g_test_add_func("/fleecing/bitmap", test_bitmap);
  g_test_add_func("/fleecing/refusals", test_refusals);
  g_test_add_func("/fleecing/reopen-writers", test_reopen_writers);
  g_test_add_func("/fleecing/reopen-refusals", test_reopen_refusals);
  int ret = g_test_run();
  cbt_blockdev_close_all();
  cbt_rpc_free(rpc);
  g_autofree char *src = tmp_path("src.img"), *scr = tmp_path("scratch.img");
  g_unlink(src);
  g_unlink(scr);
  g_rmdir(tmpdir);
  g_free(tmpdir);
  return ret;
}
