/* Unit tests for blockdev/: every backend through the C API on files in a temporary directory,
 * raw windows, null-co, host_device on a loop device, dirty tracking (marks before the backend,
 * failures included, discards only with discard=unmap), drain against concurrent I/O threads,
 * the lock bytes, and status walks against SEEK_DATA/SEEK_HOLE on ext4 (FIEMAP) and tmpfs.
 *
 * Nodes are created through blockdev-add (cbt_rpc_execute), so the schema validation and the
 * handler are the ones the daemon runs.
 */
#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>
#include <unistd.h>
#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

#define KiB 1024u
#define MiB (1024u * 1024u)

static CbtRpc *rpc;
static char *tmpdir;

static char *
tmp_path(const char *name)
{
  return g_build_filename(tmpdir, name, NULL);
}

/* A sparse file of @size bytes with @len bytes of 0xaa at @data_off (len 0: none). */
static char *
make_file(const char *name, guint64 size, guint64 data_off, gsize len)
{
  char *path = tmp_path(name);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);

  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpint(ftruncate(fd, (off_t)size), ==, 0);
  if (len) {
    g_autofree char *buf = g_malloc(len);
    memset(buf, 0xaa, len);
    g_assert_cmpint(pwrite(fd, buf, len, (off_t)data_off), ==, (ssize_t)len);
  }
  close(fd);
  return path;
}

static gboolean
try_add(const char *json, GError **error)
{
  g_autoptr(JsonNode) args = cbt_rpc_json_parse(json, -1, error);
  if (!args)
    return FALSE;
  g_autoptr(JsonNode) ret =
    cbt_rpc_execute(rpc, "blockdev-add", json_node_get_object(args), FALSE, error);
  return ret != NULL;
}

static CbtBlockdev *add(const char *node_name, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static CbtBlockdev *
add(const char *node_name, const char *fmt, ...)
{
  g_autoptr(GError) error = NULL;
  va_list ap;

  va_start(ap, fmt);
  g_autofree char *json = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  if (!try_add(json, &error))
    g_error("blockdev-add %s: %s", json, error->message);
  CbtBlockdev *bd = cbt_blockdev_find(node_name);
  g_assert_nonnull(bd);
  return bd;
}

static void
del(const char *node_name)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();

  json_object_set_string_member(args, "node-name", node_name);
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_no_error(error);
  g_assert_nonnull(ret);
}

static void
assert_bytes(CbtBlockdev *bd, guint64 off, gsize len, guint8 val)
{
  g_autofree guint8 *buf = g_malloc(len);

  g_assert_cmpint(cbt_blockdev_pread(bd, buf, off, len), ==, 0);
  for (gsize i = 0; i < len; i++)
    if (buf[i] != val)
      g_error("byte %" G_GUINT64_FORMAT " is %#x, expected %#x", off + i, buf[i], val);
}

static void
write_pattern(CbtBlockdev *bd, guint64 off, gsize len, guint8 val, guint flags)
{
  g_autofree guint8 *buf = g_malloc(len);

  memset(buf, val, len);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, buf, off, len, flags), ==, 0);
}

static void
assert_status(CbtBlockdev *bd, guint64 off, guint64 len, guint64 want_pnum, guint32 want)
{
  guint64 pnum = 0;
  guint32 status = 99;

  g_assert_cmpint(cbt_blockdev_block_status(bd, off, len, &pnum, &status), ==, 0);
  g_assert_cmpuint(pnum, ==, want_pnum);
  g_assert_cmpuint(status, ==, want);
}

/* ---- file ------------------------------------------------------------------------------- */

static void
test_file_rw(void)
{
  g_autofree char *path = make_file("rw.img", MiB, 0, 0);
  CbtBlockdev *bd = add("f0", "{'driver':'file','node-name':'f0','filename':'%s'}", path);

  g_assert_cmpuint(cbt_blockdev_get_size(bd), ==, MiB);
  g_assert_cmpuint(cbt_blockdev_get_min_io(bd), ==, 1);
  g_assert_false(cbt_blockdev_is_read_only(bd));
  assert_bytes(bd, 0, 64 * KiB, 0);
  write_pattern(bd, 1000, 5000, 0x11, 0);
  write_pattern(bd, 512 * KiB, 4096, 0x22, CBT_BLOCKDEV_FUA);
  g_assert_cmpint(cbt_blockdev_flush(bd), ==, 0);
  assert_bytes(bd, 1000, 5000, 0x11);
  assert_bytes(bd, 999, 1, 0);
  assert_bytes(bd, 6000, 1, 0);
  assert_bytes(bd, 512 * KiB, 4096, 0x22);

  /* What we wrote is in the file. */
  g_autofree char *contents = NULL;
  gsize n;
  g_assert_true(g_file_get_contents(path, &contents, &n, NULL));
  g_assert_cmpuint(n, ==, MiB);
  g_assert_cmpint(contents[1000], ==, 0x11);
  g_assert_cmpint(contents[512 * KiB + 4095], ==, 0x22);

  /* Out of range: refused, never past the end. */
  char b[16];
  g_assert_cmpint(cbt_blockdev_pread(bd, b, MiB - 8, 16), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, b, MiB, 1, 0), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, b, G_MAXUINT64 - 4, 8, 0), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, MiB - 1, 2, 0), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_pread(bd, b, MiB, 0), ==, 0);
  del("f0");
  g_assert_null(cbt_blockdev_find("f0"));
}

static void
test_file_read_only(void)
{
  g_autofree char *path = make_file("ro.img", MiB, 0, 4096);
  CbtBlockdev *bd = add("r0",
                        "{'driver':'file','node-name':'r0','filename':'%s',"
                        "'read-only':true}",
                        path);
  g_autoptr(GError) error = NULL;
  char b[4] = { 0 };

  g_assert_true(cbt_blockdev_is_read_only(bd));
  assert_bytes(bd, 0, 4096, 0xaa);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, b, 0, 4, 0), ==, -EPERM);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, 0, 4, 0), ==, -EPERM);
  g_assert_false(cbt_blockdev_acquire_write(bd, &error));
  g_assert_cmpstr(error->message, ==, "Block node is read-only");
  assert_bytes(bd, 0, 4096, 0xaa);
  del("r0");
}

/* A file whose size is not a multiple of 512 is seen rounded up, the tail reading as zeroes. */
static void
test_file_unaligned_size(void)
{
  g_autofree char *path = make_file("odd.img", 1000, 0, 1000);
  CbtBlockdev *bd = add("o0", "{'driver':'file','node-name':'o0','filename':'%s'}", path);
  guint64 off;

  g_assert_cmpuint(cbt_blockdev_get_size(bd), ==, 1024);
  assert_bytes(bd, 0, 1000, 0xaa);
  assert_bytes(bd, 1000, 24, 0);
  g_assert_cmpint(cbt_blockdev_get_data_fd(bd, &off), ==, -1);
  del("o0");
}

static void
test_file_block_status(void)
{
  g_autofree char *path = make_file("sparse.img", 4 * MiB, MiB, 64 * KiB);
  CbtBlockdev *bd = add("s0", "{'driver':'file','node-name':'s0','filename':'%s'}", path);
  const guint32 hole = CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO;

  assert_status(bd, 0, 4 * MiB, MiB, hole);
  assert_status(bd, 4096, 8192, 8192, hole);
  assert_status(bd, MiB, 4 * MiB - MiB, 64 * KiB, 0);
  assert_status(bd, MiB + 512, 1024, 1024, 0);
  assert_status(bd, MiB + 64 * KiB, 3 * MiB - 64 * KiB, 3 * MiB - 64 * KiB, hole);
  assert_status(bd, 4 * MiB - 1, 1, 1, hole);

  /* A write allocates; data then reads back through status as data. */
  write_pattern(bd, 2 * MiB, 4096, 0x33, 0);
  assert_status(bd, 2 * MiB, 4096, 4096, 0);
  guint64 pnum;
  guint32 st;
  g_assert_cmpint(cbt_blockdev_block_status(bd, 0, 0, &pnum, &st), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_block_status(bd, 4 * MiB, 1, &pnum, &st), ==, -EINVAL);
  del("s0");
}

/* ---- status walks ------------------------------------------------------------------------ */

#define HOLE (CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO)
#define WALK_SIZE (16 * MiB + 1000) /* not a multiple of 512: the node has a tail */

typedef struct {
  guint64 start, end;
  guint32 status;
} Run;

/* Append, merged into the last run when it continues it with the same status. */
static void
append_run(GArray *runs, guint64 start, guint64 end, guint32 status)
{
  Run *last = runs->len ? &g_array_index(runs, Run, runs->len - 1) : NULL;

  g_assert_cmpuint(start, <, end);
  if (last && last->end == start && last->status == status) {
    last->end = end;
    return;
  }
  g_array_append_val(runs, ((Run){ start, end, status }));
}

/* The reference: SEEK_DATA and SEEK_HOLE on the file itself over [0, size). */
static GArray *
seek_map(int fd, guint64 size)
{
  GArray *runs = g_array_new(FALSE, FALSE, sizeof(Run));

  for (guint64 pos = 0; pos < size;) {
    off_t data = lseek(fd, (off_t)pos, SEEK_DATA), hole;
    guint64 end = size;
    guint32 status = HOLE;

    if (data < 0) {
      g_assert_cmpint(errno, ==, ENXIO);
    } else if ((guint64)data > pos) {
      end = MIN((guint64)data, size);
    } else {
      hole = lseek(fd, (off_t)pos, SEEK_HOLE);
      g_assert_cmpint(hole, >, (off_t)pos);
      end = MIN((guint64)hole, size);
      status = 0;
    }
    append_run(runs, pos, end, status);
    pos = end;
  }
  return runs;
}

typedef struct {
  GArray *runs;            /* what the walk reported, merged */
  guint64 next;            /* where the next run must start */
  guint calls, stop_after; /* stop_after 0: never stop */
  gboolean stopped;
} Collected;

static gboolean
collect_run(guint64 offset, guint64 len, guint32 status, gpointer user_data)
{
  Collected *c = user_data;

  g_assert_false(c->stopped); /* nothing after FALSE */
  g_assert_cmpuint(offset, ==, c->next);
  g_assert_cmpuint(len, >, 0);
  append_run(c->runs, offset, offset + len, status);
  c->next = offset + len;
  c->stopped = ++c->calls == c->stop_after;
  return !c->stopped;
}

/* Walk [off, off + len) of @bd, whose byte 0 is byte @shift of the reference @ref, stopping
 * after @stop_after runs (0: never), and compare with the reference. */
static void
check_walk(CbtBlockdev *bd, GArray *ref, guint64 shift, guint64 off, guint64 len, guint stop_after)
{
  g_autoptr(GArray) want = g_array_new(FALSE, FALSE, sizeof(Run));
  g_autoptr(GArray) got = g_array_new(FALSE, FALSE, sizeof(Run));
  Collected c = { .runs = got, .next = off, .stop_after = stop_after };

  for (guint i = 0; i < ref->len; i++) {
    const Run *r = &g_array_index(ref, Run, i);
    guint64 from = MAX(r->start, shift + off), to = MIN(r->end, shift + off + len);
    if (from < to)
      append_run(want, from - shift, to - shift, r->status);
  }
  g_assert_cmpint(cbt_blockdev_block_status_walk(bd, off, len, collect_run, &c), ==, 0);
  if (!c.stopped)
    g_assert_cmpuint(c.next, ==, off + len);
  /* Stopped, the last run may end inside the reference's. */
  g_assert_cmpuint(got->len, <=, want->len);
  g_assert_cmpuint(got->len, >, 0);
  if (!c.stopped)
    g_assert_cmpuint(got->len, ==, want->len);
  for (guint i = 0; i < got->len; i++) {
    const Run *g = &g_array_index(got, Run, i), *w = &g_array_index(want, Run, i);
    if (g->start != w->start || g->status != w->status || g->end > w->end ||
        (g->end < w->end && (i + 1 < got->len || !c.stopped)))
      g_error("walk [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT ") run %u: [%" G_GUINT64_FORMAT
              ", %" G_GUINT64_FORMAT ") status %u, lseek says [%" G_GUINT64_FORMAT
              ", %" G_GUINT64_FORMAT ") status %u",
              off, len, i, g->start, g->end, g->status, w->start, w->end, w->status);
  }
}

/* Whole, aligned, unaligned, tiny and random ranges, with and without an early stop. */
static void
check_walks(CbtBlockdev *bd, GArray *ref, guint64 shift)
{
  guint64 size = cbt_blockdev_get_size(bd);
  g_autoptr(GRand) rnd = g_rand_new_with_seed(7);

  check_walk(bd, ref, shift, 0, size, 0);
  check_walk(bd, ref, shift, 0, size, 1);
  check_walk(bd, ref, shift, 0, size, 700);
  check_walk(bd, ref, shift, size - 1, 1, 0);
  check_walk(bd, ref, shift, MiB + 4095, 3, 0);
  for (guint i = 0; i < 300; i++) {
    guint64 off = (guint64)g_rand_double_range(rnd, 0, (double)size);
    guint64 room = size - off;
    guint64 len =
      1 + (guint64)g_rand_double_range(rnd, 0, (double)(i % 2 ? MIN(room, 256 * KiB) : room));
    check_walk(bd, ref, shift, off, MIN(len, room), i % 3 ? 0 : g_rand_int_range(rnd, 1, 6));
  }
}

static void
must(gboolean ok)
{
  g_assert_true(ok);
}

/* Every kind of range SEEK_DATA tells apart, in more extents than one FIEMAP call returns. */
static void
make_walk_layout(int fd)
{
  g_autofree guint8 *buf = g_malloc(64 * KiB);

  memset(buf, 0x5a, 64 * KiB);
  must(ftruncate(fd, WALK_SIZE) == 0);
  /* Written back, with a hole punched into it. */
  must(pwrite(fd, buf, 64 * KiB, 0) == 64 * KiB);
  /* Preallocated (unwritten), with a range written back in the middle. */
  must(fallocate(fd, 0, MiB, 2 * MiB) == 0);
  must(fallocate(fd, 0, 3 * MiB + 512 * KiB, 256 * KiB) == 0);
  must(pwrite(fd, buf, 8 * KiB, 2 * MiB + 256 * KiB) == 8 * KiB);
  /* 600 small extents, the first half written back. */
  for (guint i = 0; i < 300; i++)
    must(pwrite(fd, buf, 4096, 5 * MiB + i * 16 * KiB + (i % 3) * 4096) == 4096);
  must(fdatasync(fd) == 0);
  must(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * KiB, 16 * KiB) == 0);
  /* From here on nothing is written back: delayed allocation, and dirty or cached pages of
   * preallocated ranges (written, unaligned too; only read, so cached zeroes; untouched). */
  for (guint i = 300; i < 600; i++)
    must(pwrite(fd, buf, 4096, 5 * MiB + i * 16 * KiB + (i % 3) * 4096) == 4096);
  must(pwrite(fd, buf, 4096, MiB + 8 * KiB) == 4096);
  must(pwrite(fd, buf, 100, MiB + 512 * KiB + 300) == 100);
  must(pread(fd, buf, 8 * KiB, 2 * MiB + 64 * KiB) == 8 * KiB);
  memset(buf, 0x5a, 64 * KiB);
  must(pwrite(fd, buf, 12 * KiB, 4 * MiB + 512) == 12 * KiB);
  /* Data up to the end of the file, and blocks preallocated past it (apart, or the last block
   * would become preallocated too). */
  must(pwrite(fd, buf, 5096, WALK_SIZE - 5096) == 5096);
  must(fallocate(fd, FALLOC_FL_KEEP_SIZE, 17 * MiB, MiB) == 0);
}

/* Unwritten extents are what the walk must ask lseek about: make sure there are some. Delayed
 * ones are only reported (a sync elsewhere on the machine could write them back meanwhile). */
static void
report_extents(int fd)
{
  g_autofree struct fiemap *fm = g_malloc0(sizeof(*fm) + 2048 * sizeof(struct fiemap_extent));
  struct statfs sfs;
  guint unwritten = 0, delalloc = 0;

  must(fstatfs(fd, &sfs) == 0);
  fm->fm_length = FIEMAP_MAX_OFFSET;
  fm->fm_extent_count = 2048;
  if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
    g_test_message("file system %#lx: no FIEMAP (%s)", (long)sfs.f_type, g_strerror(errno));
    return;
  }
  for (guint i = 0; i < fm->fm_mapped_extents; i++) {
    unwritten += (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_UNWRITTEN) != 0;
    delalloc += (fm->fm_extents[i].fe_flags & FIEMAP_EXTENT_DELALLOC) != 0;
  }
  g_test_message("file system %#lx: %u extents, %u unwritten, %u delayed", (long)sfs.f_type,
                 fm->fm_mapped_extents, unwritten, delalloc);
  g_assert_cmpuint(unwritten, >, 0);
}

/* The walk over a file node in @dir, a raw window over it, and the node's tail, against lseek.
 * The file is unlinked at once and opened through /proc, so nothing is left behind even when an
 * assertion fails. */
static void
check_walk_file(const char *dir)
{
  g_autofree char *tmpl = g_build_filename(dir, "test-blockdev-walk-XXXXXX", NULL);
  int fd = g_mkstemp(tmpl);
  const guint64 win = MiB - 3000;

  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpint(g_unlink(tmpl), ==, 0);
  g_autofree char *path = g_strdup_printf("/proc/self/fd/%d", fd);
  make_walk_layout(fd);
  report_extents(fd);
  CbtBlockdev *f = add("wk0", "{'driver':'file','node-name':'wk0','filename':'%s'}", path);
  CbtBlockdev *r =
    add("wk1",
        "{'driver':'raw','node-name':'wk1','file':'wk0','offset':%" G_GUINT64_FORMAT ",'size':%u}",
        win, 12 * MiB);
  g_assert_cmpuint(cbt_blockdev_get_size(f), ==, 16 * MiB + 1024);
  g_autoptr(GArray) ref = seek_map(fd, cbt_blockdev_get_size(f));
  g_assert_cmpuint(ref->len, >, 600);
  check_walks(f, ref, 0);
  check_walks(r, ref, win);
  /* The reference did not move meanwhile (so both saw the same file). */
  g_autoptr(GArray) again = seek_map(fd, cbt_blockdev_get_size(f));
  g_assert_cmpuint(again->len, ==, ref->len);
  for (guint i = 0; i < ref->len; i++) {
    const Run *a = &g_array_index(again, Run, i), *b = &g_array_index(ref, Run, i);
    g_assert_true(a->start == b->start && a->end == b->end && a->status == b->status);
  }
  del("wk1");
  del("wk0");
  close(fd);
}

/* The temporary directory's file system: ext4 here, where the walk maps extents with FIEMAP. */
static void
test_walk_file(void)
{
  check_walk_file(tmpdir);
}

/* tmpfs has no FIEMAP: the walk asks lseek. */
static void
test_walk_tmpfs(void)
{
  check_walk_file("/dev/shm");
}

/* Bounds as cbt_blockdev_block_status; a driver without a walk (null-co) is walked run by run. */
static void
test_walk_generic(void)
{
  CbtBlockdev *n = add("wn0", "{'driver':'null-co','node-name':'wn0','size':1048576,"
                              "'read-zeroes':true}");
  g_autoptr(GArray) runs = g_array_new(FALSE, FALSE, sizeof(Run));
  Collected c = { .runs = runs, .next = 4096 };

  g_assert_cmpint(cbt_blockdev_block_status_walk(n, 4096, MiB - 4096, collect_run, &c), ==, 0);
  g_assert_cmpuint(runs->len, ==, 1);
  g_assert_cmpuint(g_array_index(runs, Run, 0).end, ==, MiB);
  g_assert_cmpuint(g_array_index(runs, Run, 0).status, ==, CBT_BLOCKDEV_STATUS_ZERO);
  g_assert_cmpint(cbt_blockdev_block_status_walk(n, 0, 0, collect_run, &c), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_block_status_walk(n, MiB, 1, collect_run, &c), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_block_status_walk(n, 4096, MiB, collect_run, &c), ==, -EINVAL);
  del("wn0");
}

static void
test_file_discard(void)
{
  g_autofree char *path = make_file("discard.img", 4 * MiB, 0, 4 * MiB);
  CbtBlockdev *on = add("d0",
                        "{'driver':'file','node-name':'d0','filename':'%s',"
                        "'discard':'unmap'}",
                        path);
  CbtBlockdev *off = add("d1", "{'driver':'file','node-name':'d1','filename':'%s'}", path);
  g_autoptr(CbtBitmap) bm_on = cbt_bitmap_new(4 * MiB, 64 * KiB);
  g_autoptr(CbtBitmap) bm_off = cbt_bitmap_new(4 * MiB, 64 * KiB);

  g_assert_true(cbt_blockdev_can_discard(on));
  g_assert_false(cbt_blockdev_can_discard(off));
  cbt_blockdev_track_bitmap(on, bm_on);
  cbt_blockdev_track_bitmap(off, bm_off);

  /* discard=ignore: dropped, nothing marked, data intact. */
  g_assert_cmpint(cbt_blockdev_discard(off, 0, MiB, 0), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(bm_off), ==, 0);
  assert_bytes(off, 0, MiB, 0xaa);
  assert_status(off, 0, MiB, MiB, 0);

  /* discard=unmap: the range is deallocated (reads zero) and marked. */
  g_assert_cmpint(cbt_blockdev_discard(on, MiB, MiB, 0), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(bm_on), ==, 16);
  g_assert_true(cbt_bitmap_get(bm_on, MiB));
  g_assert_false(cbt_bitmap_get(bm_on, MiB - 1));
  assert_status(on, MiB, MiB, MiB, CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO);
  assert_bytes(on, MiB, MiB, 0);
  assert_bytes(on, 2 * MiB, 4096, 0xaa);

  cbt_blockdev_untrack_bitmap(on, bm_on);
  cbt_blockdev_untrack_bitmap(off, bm_off);
  del("d0");
  del("d1");
}

static void
test_file_write_zeroes(void)
{
  g_autofree char *path = make_file("zero.img", 4 * MiB, 0, 4 * MiB);
  CbtBlockdev *bd = add("z0",
                        "{'driver':'file','node-name':'z0','filename':'%s',"
                        "'discard':'unmap'}",
                        path);
  CbtBlockdev *keep = add("z1", "{'driver':'file','node-name':'z1','filename':'%s'}", path);
  const guint32 hole = CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO;

  /* Plain: zeroes, allocation kept. */
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, 100, 5000, 0), ==, 0);
  assert_bytes(bd, 100, 5000, 0);
  assert_bytes(bd, 99, 1, 0xaa);
  assert_bytes(bd, 5100, 1, 0xaa);
  /* May unmap on a discard=unmap node: a hole. */
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, MiB, MiB, CBT_BLOCKDEV_MAY_UNMAP), ==, 0);
  assert_bytes(bd, MiB, MiB, 0);
  assert_status(bd, MiB, MiB, MiB, hole);
  /* May unmap without discard=unmap: zeroes (ZERO_RANGE; whether SEEK_DATA then calls the
   * range data depends on the file system and its page cache, so it is not asserted). */
  g_assert_cmpint(cbt_blockdev_write_zeroes(keep, 2 * MiB, MiB, CBT_BLOCKDEV_MAY_UNMAP), ==, 0);
  assert_bytes(keep, 2 * MiB, MiB, 0);
  /* ZERO_RANGE (ext4, xfs) or punch + allocate (tmpfs): cheap, so NO_FALLBACK succeeds. */
  g_assert_cmpint(
    cbt_blockdev_write_zeroes(bd, 3 * MiB, 4096, CBT_BLOCKDEV_NO_FALLBACK | CBT_BLOCKDEV_FUA), ==,
    0);
  assert_bytes(bd, 3 * MiB, 4096, 0);
  del("z0");
  del("z1");
}

static void
test_file_direct(void)
{
  g_autofree char *path = make_file("direct.img", MiB, 0, 0);
  g_autoptr(GError) error = NULL;
  g_autofree char *json = g_strdup_printf("{'driver':'file','node-name':'x0','filename':'%s',"
                                          "'cache':{'direct':true}}",
                                          path);

  if (!try_add(json, &error)) {
    g_test_skip(error->message); /* O_DIRECT is not available on every file system */
    return;
  }
  CbtBlockdev *bd = cbt_blockdev_find("x0");
  /* Unaligned and aligned requests both work. */
  write_pattern(bd, 3, 1000, 0x44, 0);
  write_pattern(bd, 8192, 8192, 0x55, CBT_BLOCKDEV_FUA);
  g_autofree void *aligned = g_aligned_alloc(1, 4096, 4096);
  g_assert_cmpint(cbt_blockdev_pread(bd, aligned, 8192, 4096), ==, 0);
  g_assert_cmpint(((guint8 *)aligned)[4095], ==, 0x55);
  assert_bytes(bd, 3, 1000, 0x44);
  assert_bytes(bd, 0, 3, 0);
  del("x0");
}

/* ---- raw -------------------------------------------------------------------------------- */

static void
test_raw_window(void)
{
  g_autofree char *path = make_file("win.img", MiB, 0, 0);
  CbtBlockdev *f = add("wf", "{'driver':'file','node-name':'wf','filename':'%s'}", path);
  CbtBlockdev *r = add("wr", "{'driver':'raw','node-name':'wr','file':'wf','offset':65536,"
                             "'size':131072}");
  g_autoptr(CbtBitmap) bm_r = cbt_bitmap_new(128 * KiB, 512);
  g_autoptr(CbtBitmap) bm_f = cbt_bitmap_new(MiB, 512);
  guint64 fd_off = 0;

  g_assert_true(cbt_blockdev_get_child(r) == f);
  g_assert_cmpuint(cbt_blockdev_get_size(r), ==, 128 * KiB);
  cbt_blockdev_track_bitmap(r, bm_r);
  cbt_blockdev_track_bitmap(f, bm_f);

  write_pattern(r, 0, 512, 0x66, 0);
  assert_bytes(f, 64 * KiB, 512, 0x66);
  assert_bytes(f, 64 * KiB - 1, 1, 0);
  /* The write marked both: the raw node at its offset, the file at the file's. */
  g_assert_true(cbt_bitmap_get(bm_r, 0));
  g_assert_cmpuint(cbt_bitmap_count(bm_r), ==, 1);
  g_assert_true(cbt_bitmap_get(bm_f, 64 * KiB));
  g_assert_cmpuint(cbt_bitmap_count(bm_f), ==, 1);
  /* A write to the file directly is not a write to the raw node. */
  write_pattern(f, 0, 512, 0x77, 0);
  g_assert_cmpuint(cbt_bitmap_count(bm_r), ==, 1);
  g_assert_cmpuint(cbt_bitmap_count(bm_f), ==, 2);

  char b[2];
  g_assert_cmpint(cbt_blockdev_pread(r, b, 128 * KiB - 1, 2), ==, -EINVAL);
  assert_status(r, 0, 128 * KiB, 4096, 0);
  int fd = cbt_blockdev_get_data_fd(r, &fd_off);
  g_assert_cmpint(fd, >=, 0);
  g_assert_cmpuint(fd_off, ==, 64 * KiB);

  /* The file is in use by the raw node. */
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();
  json_object_set_string_member(args, "node-name", "wf");
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_null(ret);
  g_assert_cmpstr(error->message, ==, "Block device wf is in use");

  cbt_blockdev_untrack_bitmap(r, bm_r);
  cbt_blockdev_untrack_bitmap(f, bm_f);
  del("wr");
  del("wf");
}

/* Inline children default to discard=unmap, so the raw node's own policy decides. */
static void
test_raw_discard_policy(void)
{
  g_autofree char *path = make_file("rd.img", MiB, 0, MiB);
  CbtBlockdev *r = add("rd",
                       "{'driver':'raw','node-name':'rd','discard':'unmap',"
                       "'file':{'driver':'file','filename':'%s'}}",
                       path);
  CbtBlockdev *child = cbt_blockdev_get_child(r);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(MiB, 65536);

  g_assert_true(cbt_blockdev_can_discard(child));
  g_assert_true(g_str_has_prefix(cbt_blockdev_get_node_name(child), "#block"));
  cbt_blockdev_track_bitmap(child, bm);
  g_assert_cmpint(cbt_blockdev_discard(r, 0, 65536, 0), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  assert_bytes(r, 0, 65536, 0);
  cbt_blockdev_untrack_bitmap(child, bm);
  del("rd");
}

/* ---- null-co ---------------------------------------------------------------------------- */

static void
test_null(void)
{
  CbtBlockdev *n = add("n0", "{'driver':'null-co','node-name':'n0'}");
  CbtBlockdev *m = add("n1", "{'driver':'null-co','node-name':'n1','size':1000,"
                             "'read-zeroes':true}");
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(1024, 512);
  guint64 off;

  g_assert_cmpuint(cbt_blockdev_get_size(n), ==, 1024u * MiB);
  g_assert_cmpuint(cbt_blockdev_get_size(m), ==, 1024);
  g_assert_cmpint(cbt_blockdev_get_data_fd(n, &off), ==, -1);
  cbt_blockdev_track_bitmap(m, bm);
  write_pattern(m, 600, 10, 0x99, CBT_BLOCKDEV_FUA);
  assert_bytes(m, 0, 1024, 0);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  g_assert_true(cbt_bitmap_get(bm, 512));
  assert_status(n, 0, 4096, 4096, 0);
  assert_status(m, 0, 1024, 1024, CBT_BLOCKDEV_STATUS_ZERO);
  g_assert_cmpint(cbt_blockdev_flush(m), ==, 0);
  cbt_blockdev_untrack_bitmap(m, bm);

  /* qemu-storage-daemon 7.2 aborts on this; we refuse it. */
  g_autoptr(GError) error = NULL;
  g_assert_false(try_add("{'driver':'null-co','node-name':'n2','size':-1}", &error));
  g_assert_cmpstr(error->message, ==, "Parameter 'size' expects a non-negative number below 2^64");
  del("n0");
  del("n1");
}

/* ---- errors ----------------------------------------------------------------------------- */

static void
test_add_errors(void)
{
  static const struct {
    const char *json, *error;
  } cases[] = {
    { "{'driver':'null-co'}", "'node-name' must be specified for the root node" },
    { "{'driver':'null-co','node-name':'1x'}", "Invalid node-name: '1x'" },
    { "{'driver':'null-co','node-name':'a234567890123456789012345678901b'}", "Node name too long" },
    { "{'driver':'file','node-name':'e0','filename':'/nonexistent/x'}",
      "Could not open '/nonexistent/x': No such file or directory" },
    { "{'driver':'raw','node-name':'e0','file':'nope'}",
      "Cannot find device='nope' nor node-name='nope'" },
    { "{'driver':'qcow2','node-name':'e0','file':'dup'}",
      "Driver 'qcow2' is not supported by cbtd" },
    { "{'driver':'nbd','node-name':'e0'}", "Driver 'nbd' is not supported by cbtd" },
    { "{'driver':'null-co','node-name':'dup'}", "Duplicate nodes with node-name='dup'" },
    { "{'driver':'raw','node-name':'e0','file':'dup','offset':1073741825}",
      "Offset (1073741825) cannot be greater than size of the containing file (1073741824)" },
    { "{'driver':'raw','node-name':'e0','file':'dup','size':1000}",
      "Specified size is not multiple of 512" },
    { "{'driver':'host_device','node-name':'e0','filename':'/etc/hostname'}",
      "'host_device' driver requires '/etc/hostname' to be either a character or block device" },
    { "{'driver':'file','node-name':'e0','filename':'/dev/null'}",
      "'file' driver requires '/dev/null' to be a regular file" },
  };

  add("dup", "{'driver':'null-co','node-name':'dup'}");
  for (gsize i = 0; i < G_N_ELEMENTS(cases); i++) {
    g_autoptr(GError) error = NULL;
    g_assert_false(try_add(cases[i].json, &error));
    g_assert_cmpstr(error->message, ==, cases[i].error);
  }
  g_assert_null(cbt_blockdev_find("e0"));
  /* A failed add leaves nothing behind: the name is free again. */
  add("e0", "{'driver':'null-co','node-name':'e0'}");
  del("e0");
  del("dup");
}

/* ---- host_device ------------------------------------------------------------------------ */

static char *
loop_attach(const char *file)
{
  g_autofree char *out = NULL;
  int status;
  const char *argv[] = { "losetup", "-f", "--show", file, NULL };

  if (access("/dev/loop-control", R_OK | W_OK) != 0 ||
      !g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH | G_SPAWN_STDERR_TO_DEV_NULL,
                    NULL, NULL, &out, NULL, &status, NULL) ||
      !g_spawn_check_wait_status(status, NULL))
    return NULL;
  return g_strstrip(g_strdup(out));
}

static void
loop_detach(const char *dev)
{
  const char *argv[] = { "losetup", "-d", dev, NULL };
  g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, NULL, NULL, NULL, NULL);
}

static void
test_host_device(void)
{
  g_autofree char *path = make_file("loop.img", 4 * MiB, 0, 4 * MiB);
  g_autofree char *dev = loop_attach(path);

  if (!dev) {
    g_test_skip("no usable loop device (/dev/loop-control and losetup needed)");
    return;
  }
  CbtBlockdev *bd = add("h0",
                        "{'driver':'host_device','node-name':'h0','filename':'%s',"
                        "'discard':'unmap'}",
                        dev);
  g_assert_cmpuint(cbt_blockdev_get_size(bd), ==, 4 * MiB);
  assert_bytes(bd, 0, 4096, 0xaa);
  write_pattern(bd, 4096, 4096, 0x12, CBT_BLOCKDEV_FUA);
  assert_bytes(bd, 4096, 4096, 0x12);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, MiB, MiB, 0), ==, 0);
  assert_bytes(bd, MiB, MiB, 0);
  g_assert_cmpint(cbt_blockdev_discard(bd, 2 * MiB, MiB, 0), ==, 0);
  assert_status(bd, 0, 4 * MiB, 4 * MiB, 0); /* devices report everything allocated */
  g_autoptr(GArray) runs = g_array_new(FALSE, FALSE, sizeof(Run));
  Collected c = { .runs = runs, .next = 512 };
  g_assert_cmpint(cbt_blockdev_block_status_walk(bd, 512, 4 * MiB - 512, collect_run, &c), ==, 0);
  g_assert_cmpuint(runs->len, ==, 1);
  g_assert_cmpuint(g_array_index(runs, Run, 0).status, ==, 0);
  g_assert_cmpint(cbt_blockdev_flush(bd), ==, 0);
  del("h0");
  loop_detach(dev);

  /* The data went through to the backing file. */
  g_autofree char *contents = NULL;
  gsize n;
  g_assert_true(g_file_get_contents(path, &contents, &n, NULL));
  g_assert_cmpint(contents[4096], ==, 0x12);
  g_assert_cmpint(contents[MiB + 5], ==, 0);
}

/* ---- dirty tracking --------------------------------------------------------------------- */

/* /dev/full fails every write with ENOSPC: the bitmap must still be marked. */
static void
test_track_failed_write(void)
{
  CbtBlockdev *bd = add("full", "{'driver':'host_device','node-name':'full',"
                                "'filename':'/dev/full'}");
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(MiB, 4096);
  char b[100] = { 1 };

  /* A character device has no size we can seek to; give it a window to write into. */
  bd->size = MiB;
  cbt_blockdev_track_bitmap(bd, bm);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, b, 40 * KiB + 1000, sizeof(b), 0), ==, -ENOSPC);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  g_assert_true(cbt_bitmap_get(bm, 40 * KiB));
  cbt_blockdev_untrack_bitmap(bd, bm);
  /* Untracked: no longer marked. */
  g_assert_cmpint(cbt_blockdev_pwrite(bd, b, 0, sizeof(b), 0), ==, -ENOSPC);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  del("full");
}

/* A driver that checks, inside the backend call, that the bitmap is already marked. */
static CbtBitmap *probe_bitmap;
static gint probe_calls;

static int
probe_write(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  g_assert_true(cbt_bitmap_get(probe_bitmap, offset));
  g_assert_true(cbt_bitmap_get(probe_bitmap, offset + len - 1));
  probe_calls++;
  return -EIO;
}

static int
probe_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  return probe_write(bd, offset, len);
}

static int
probe_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  return probe_write(bd, offset, len);
}

static int
probe_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  return probe_write(bd, offset, len);
}

static void
test_track_marks_before_backend(void)
{
  static const CbtBlockdevDriver probe = {
    .name = "probe",
    .pwrite = probe_pwrite,
    .discard = probe_discard,
    .write_zeroes = probe_zeroes,
  };
  CbtBlockdev *bd = cbt_blockdev_new(&probe);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(MiB, 512);

  bd->size = MiB;
  bd->discard_unmap = TRUE;
  probe_bitmap = bm;
  cbt_blockdev_track_bitmap(bd, bm);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, "x", 1000, 1, 0), ==, -EIO);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, 8192, 4096, 0), ==, -EIO);
  g_assert_cmpint(cbt_blockdev_discard(bd, 65536, 1024, 0), ==, -EIO);
  g_assert_cmpint(probe_calls, ==, 3);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1 + 8 + 2);
  cbt_blockdev_untrack_bitmap(bd, bm);
  cbt_blockdev_unref(bd);
}

static void
test_track_several(void)
{
  CbtBlockdev *bd = add("t0", "{'driver':'null-co','node-name':'t0','size':1048576}");
  g_autoptr(CbtBitmap) a = cbt_bitmap_new(MiB, 512);
  g_autoptr(CbtBitmap) b = cbt_bitmap_new(MiB, 65536);
  g_autoptr(CbtBitmap) c = cbt_bitmap_new(MiB, 4096);

  cbt_blockdev_track_bitmap(bd, a);
  cbt_blockdev_track_bitmap(bd, b);
  cbt_blockdev_track_bitmap(bd, c);
  cbt_blockdev_untrack_bitmap(bd, b);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, 0, 1024, 0), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(a), ==, 2);
  g_assert_cmpuint(cbt_bitmap_count(b), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(c), ==, 1);
  /* Reads and flushes mark nothing. */
  char buf[512];
  g_assert_cmpint(cbt_blockdev_pread(bd, buf, 4096, sizeof(buf)), ==, 0);
  g_assert_cmpint(cbt_blockdev_flush(bd), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(a), ==, 2);
  /* null-co defaults to discard=ignore: dropped, unmarked. */
  g_assert_cmpint(cbt_blockdev_discard(bd, 8192, 512, 0), ==, 0);
  g_assert_cmpuint(cbt_bitmap_count(a), ==, 2);
  cbt_blockdev_untrack_bitmap(bd, a);
  cbt_blockdev_untrack_bitmap(bd, c);
  del("t0");
}

/* A write observer sees each written range after the tracked bitmaps and before the backend. */
typedef struct {
  guint calls;
  guint64 offset, len;
} ObserverLog;

static void
observe(gpointer opaque, guint64 offset, guint64 len)
{
  ObserverLog *log = opaque;

  g_assert_true(cbt_bitmap_get(probe_bitmap, offset)); /* the bitmaps came first */
  g_assert_cmpint(probe_calls, ==, (gint)log->calls);  /* the backend comes after */
  log->calls++;
  log->offset = offset;
  log->len = len;
}

static void
test_write_observer(void)
{
  static const CbtBlockdevDriver probe = {
    .name = "probe",
    .pwrite = probe_pwrite,
    .discard = probe_discard,
    .write_zeroes = probe_zeroes,
  };
  CbtBlockdev *bd = cbt_blockdev_new(&probe);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(MiB, 512);
  ObserverLog a = { 0 }, b = { 0 };

  bd->size = MiB;
  bd->discard_unmap = TRUE;
  probe_bitmap = bm;
  probe_calls = 0;
  cbt_blockdev_track_bitmap(bd, bm);
  cbt_blockdev_add_write_observer(bd, observe, &a);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, "x", 1000, 1, 0), ==, -EIO);
  g_assert_cmpuint(a.calls, ==, 1);
  g_assert_cmpuint(a.offset, ==, 1000);
  g_assert_cmpuint(a.len, ==, 1);
  g_assert_cmpint(cbt_blockdev_write_zeroes(bd, 8192, 4096, 0), ==, -EIO);
  g_assert_cmpint(cbt_blockdev_discard(bd, 65536, 1024, 0), ==, -EIO);
  g_assert_cmpuint(a.calls, ==, 3);
  g_assert_cmpuint(a.len, ==, 1024);
  /* A dropped discard (discard=ignore) reaches neither the medium nor the observer. */
  bd->discard_unmap = FALSE;
  g_assert_cmpint(cbt_blockdev_discard(bd, 0, 512, 0), ==, 0);
  g_assert_cmpuint(a.calls, ==, 3);
  /* Two observers; removing one (and one that is not there) leaves the other. */
  probe_calls = 0;
  a.calls = 0;
  cbt_blockdev_add_write_observer(bd, observe, &b);
  cbt_blockdev_remove_write_observer(bd, observe, &a);
  cbt_blockdev_remove_write_observer(bd, observe, &a);
  g_assert_cmpint(cbt_blockdev_pwrite(bd, "y", 4096, 1, 0), ==, -EIO);
  g_assert_cmpuint(a.calls, ==, 0);
  g_assert_cmpuint(b.calls, ==, 1);
  /* The bitmaps are untouched by observer changes, and the other way round. */
  cbt_blockdev_untrack_bitmap(bd, bm);
  g_assert_cmpuint(bd->tracked->n, ==, 0);
  g_assert_cmpuint(bd->tracked->n_observers, ==, 1);
  cbt_blockdev_remove_write_observer(bd, observe, &b);
  g_assert_null(bd->tracked); /* nothing left: the write path returns at once */
  cbt_blockdev_unref(bd);
}

/* Where a node may keep persistent bitmaps: the file's, and a raw node's through its file. */
static void
test_store_info(void)
{
  g_autofree char *path = make_file("si.img", MiB, 0, 0);
  CbtBlockdev *f =
    add("sf", "{'driver':'file','node-name':'sf','filename':'%s','bitmap-store':'/x/y'}", path);
  CbtBlockdev *r = add("sr", "{'driver':'raw','node-name':'sr','file':'sf','offset':65536}");
  CbtBlockdev *n = add("sn", "{'driver':'null-co','node-name':'sn'}");
  CbtBlockdevStoreInfo info;

  g_assert_true(cbt_blockdev_get_store_info(f, &info));
  g_assert_cmpstr(info.filename, ==, path);
  g_assert_cmpstr(info.store, ==, "/x/y");
  g_assert_cmpstr(info.node_name, ==, "sf");
  g_assert_cmpuint(info.sync_interval_ms, ==, 10000);
  g_assert_cmpuint(info.region_size, ==, 64 * MiB);
  g_assert_false(info.via_format);
  g_assert_false(info.is_device);
  g_assert_cmpint(info.fd, >=, 0);
  g_assert_true(cbt_blockdev_get_store_info(r, &info));
  g_assert_true(info.via_format);
  g_assert_cmpuint(info.offset, ==, 65536);
  g_assert_cmpstr(info.node_name, ==, "sf");
  g_assert_false(cbt_blockdev_get_store_info(n, &info));
  g_assert_cmpstr(cbt_blockdev_get_driver_name(r), ==, "raw");
  del("sn");
  del("sr");
  del("sf");
}

/* ---- drain ------------------------------------------------------------------------------ */

typedef struct {
  CbtBlockdev *bd;
  gint stop;
  gint ops;    /* completed requests (counted before io_end) */
  gint inside; /* requests between begin and end right now */
} Load;

static gpointer
io_thread(gpointer data)
{
  Load *l = data;
  char buf[4096];

  memset(buf, 0x5a, sizeof(buf));
  for (guint i = 0; !g_atomic_int_get(&l->stop); i++) {
    cbt_blockdev_io_begin(l->bd);
    g_atomic_int_inc(&l->inside);
    guint64 off = (guint64)(i % 256) * sizeof(buf);
    g_assert_cmpint(cbt_blockdev_pwrite(l->bd, buf, off, sizeof(buf), 0), ==, 0);
    g_atomic_int_add(&l->inside, -1);
    g_atomic_int_inc(&l->ops);
    cbt_blockdev_io_end(l->bd);
  }
  return NULL;
}

static void
run_drain_load(CbtBlockdev *io_node, CbtBlockdev *drain_node)
{
  Load l = { .bd = io_node };
  GThread *threads[4];

  for (gsize i = 0; i < G_N_ELEMENTS(threads); i++)
    threads[i] = g_thread_new("io", io_thread, &l);
  for (int round = 0; round < 200; round++) {
    cbt_blockdev_drain_begin(drain_node);
    /* (The in-flight count itself may blink to 1 while a thread backs off.) */
    g_assert_cmpint(g_atomic_int_get(&l.inside), ==, 0);
    gint before = g_atomic_int_get(&l.ops);
    g_usleep(round % 10 == 0 ? 2000 : 50);
    /* Nothing was admitted while drained. */
    g_assert_cmpint(g_atomic_int_get(&l.inside), ==, 0);
    g_assert_cmpint(g_atomic_int_get(&l.ops), ==, before);
    cbt_blockdev_drain_end(drain_node);
    g_usleep(200);
  }
  g_atomic_int_set(&l.stop, 1);
  for (gsize i = 0; i < G_N_ELEMENTS(threads); i++)
    g_thread_join(threads[i]);
  g_assert_cmpint(l.ops, >, 0);
  g_assert_cmpint(io_node->inflight, ==, 0);
  g_assert_cmpint(drain_node->inflight, ==, 0);
}

static void
test_drain_concurrent(void)
{
  g_autofree char *path = make_file("drain.img", MiB, 0, 0);
  CbtBlockdev *f = add("df", "{'driver':'file','node-name':'df','filename':'%s'}", path);
  CbtBlockdev *r = add("dr", "{'driver':'raw','node-name':'dr','file':'df'}");

  run_drain_load(f, f);
  /* Draining the child also holds requests that enter through the parent. */
  run_drain_load(r, f);
  run_drain_load(r, r);
  del("dr");
  del("df");
}

static gpointer
blocked_begin(gpointer data)
{
  Load *l = data;

  cbt_blockdev_io_begin(l->bd);
  g_atomic_int_inc(&l->ops);
  cbt_blockdev_io_end(l->bd);
  return NULL;
}

static void
test_drain_holds_new_requests(void)
{
  CbtBlockdev *bd = add("dh", "{'driver':'null-co','node-name':'dh'}");
  Load l = { .bd = bd };

  cbt_blockdev_drain_begin(bd);
  cbt_blockdev_drain_begin(bd); /* nested */
  GThread *t = g_thread_new("blocked", blocked_begin, &l);
  g_usleep(50000);
  g_assert_cmpint(g_atomic_int_get(&l.ops), ==, 0);
  cbt_blockdev_drain_end(bd);
  g_usleep(50000);
  g_assert_cmpint(g_atomic_int_get(&l.ops), ==, 0);
  cbt_blockdev_drain_end(bd);
  g_thread_join(t);
  g_assert_cmpint(l.ops, ==, 1);
  del("dh");
}

/* ---- auto-read-only ----------------------------------------------------------------------- */

static gboolean
run_cmd(const char *const *argv)
{
  int status;

  return g_spawn_sync(NULL, (char **)argv, NULL,
                      G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL,
                      NULL, NULL, NULL, NULL, &status, NULL) &&
         g_spawn_check_wait_status(status, NULL);
}

/* A file on a read-only file system: auto-read-only opens it for reading, and asking for write
 * permission reopens it for writing, which fails as in QEMU. */
static void
test_auto_read_only(void)
{
  g_autofree char *mnt = tmp_path("ro-mnt");
  g_autofree char *img = g_build_filename(mnt, "img", NULL);
  const char *mount[] = { "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt, NULL };
  const char *remount[] = { "mount", "-o", "remount,ro", mnt, NULL };
  const char *umount[] = { "umount", mnt, NULL };
  g_autoptr(GError) error = NULL;

  g_assert_cmpint(g_mkdir(mnt, 0755), ==, 0);
  if (!run_cmd(mount)) {
    g_rmdir(mnt);
    g_test_skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)");
    return;
  }
  g_assert_true(g_file_set_contents(img, "hello", 5, NULL));
  g_assert_true(run_cmd(remount));

  g_autofree char *plain =
    g_strdup_printf("{'driver':'file','node-name':'a0','filename':'%s'}", img);
  g_assert_false(try_add(plain, &error));
  g_autofree char *want = g_strdup_printf("Could not open '%s': Read-only file system", img);
  g_assert_cmpstr(error->message, ==, want);
  g_clear_error(&error);

  CbtBlockdev *bd = add("a1",
                        "{'driver':'file','node-name':'a1','filename':'%s',"
                        "'auto-read-only':true}",
                        img);
  g_assert_false(cbt_blockdev_is_read_only(bd)); /* as QEMU reports it */
  g_assert_cmpuint(cbt_blockdev_get_size(bd), ==, 512);
  char buf[5];
  g_assert_cmpint(cbt_blockdev_pread(bd, buf, 0, 5), ==, 0);
  g_assert_cmpmem(buf, 5, "hello", 5);
  g_assert_false(cbt_blockdev_acquire_write(bd, &error));
  g_assert_cmpstr(error->message, ==, want);
  /* Reads still work after the failed reopen. */
  g_assert_cmpint(cbt_blockdev_pread(bd, buf, 0, 5), ==, 0);
  del("a1");
  g_assert_true(run_cmd(umount));
  g_rmdir(mnt);
}

/* ---- users, write permission and lock bytes --------------------------------------------- */

static void
test_users(void)
{
  g_autofree char *path = make_file("users.img", MiB, 0, 0);
  CbtBlockdev *bd = add("u0", "{'driver':'file','node-name':'u0','filename':'%s'}", path);
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();

  cbt_blockdev_add_user(bd);
  g_assert_true(cbt_blockdev_acquire_write(bd, &error));
  json_object_set_string_member(args, "node-name", "u0");
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_null(ret);
  g_assert_cmpstr(error->message, ==, "Node u0 is in use");
  cbt_blockdev_release_write(bd);
  cbt_blockdev_remove_user(bd);
  del("u0");
}

/* Another process's view of the lock bytes is another open file description: two descriptors
 * of our own exclude each other exactly as cbtd and QEMU do. */
static void
test_lock_bytes(void)
{
  g_autofree char *path = make_file("lock.img", MiB, 0, 0);
  int fa = open(path, O_RDWR), fb = open(path, O_RDWR);
  CbtBlockdevLock *a = cbt_blockdev_lock_new(fa, path);
  CbtBlockdevLock *b = cbt_blockdev_lock_new(fb, path);
  const guint64 all = CBT_PERM_ALL;
  GError *error = NULL;

  /* A writer that shares everything but resize (what a writable export takes). */
  g_assert_true(cbt_blockdev_lock_set(a, CBT_PERM_CONSISTENT_READ | CBT_PERM_WRITE,
                                      all & ~CBT_PERM_RESIZE, &error));
  /* A reader that shares write: fine. */
  g_assert_true(cbt_blockdev_lock_set(b, CBT_PERM_CONSISTENT_READ, all, &error));
  /* One that refuses to share write (qemu-img, a VM disk): refused. */
  g_assert_false(cbt_blockdev_lock_set(b, CBT_PERM_CONSISTENT_READ, all & ~CBT_PERM_WRITE, &error));
  g_assert_cmpstr(error->message, ==, "Failed to get shared \"write\" lock");
  g_clear_error(&error);
  /* One that wants to resize: refused by a's unshared resize. */
  g_assert_false(cbt_blockdev_lock_set(b, CBT_PERM_RESIZE, all, &error));
  g_assert_cmpstr(error->message, ==, "Failed to get \"resize\" lock");
  g_clear_error(&error);
  /* b's failed attempts left its previous state, and a can drop write and take it back. */
  g_assert_true(cbt_blockdev_lock_set(a, CBT_PERM_CONSISTENT_READ, all, &error));
  g_assert_true(cbt_blockdev_lock_set(b, CBT_PERM_CONSISTENT_READ, all & ~CBT_PERM_WRITE, &error));
  g_assert_false(cbt_blockdev_lock_set(a, CBT_PERM_WRITE, all, &error));
  g_assert_cmpstr(error->message, ==, "Failed to get \"write\" lock");
  g_clear_error(&error);
  cbt_blockdev_lock_free(a);
  cbt_blockdev_lock_free(b);
  close(fa);
  close(fb);
}

/* Write permission on a node against another holder of the image's lock bytes (a separate open
 * file stands for another process), and locking=off. */
static void
test_lock_nodes(void)
{
  g_autofree char *path = make_file("lock2.img", MiB, 0, 0);
  CbtBlockdev *b = add("lb",
                       "{'driver':'raw','node-name':'lb','file':{'driver':'file',"
                       "'filename':'%s'}}",
                       path);
  CbtBlockdev *off = add("lc",
                         "{'driver':'file','node-name':'lc','filename':'%s',"
                         "'locking':'off'}",
                         path);
  int fd = open(path, O_RDWR);
  CbtBlockdevLock *other = cbt_blockdev_lock_new(fd, path);
  GError *error = NULL;

  /* Another process that writes and refuses to share write (qemu-io, a VM). */
  g_assert_true(cbt_blockdev_lock_set(other, CBT_PERM_CONSISTENT_READ | CBT_PERM_WRITE,
                                      CBT_PERM_CONSISTENT_READ | CBT_PERM_WRITE_UNCHANGED, &error));
  cbt_blockdev_add_user(b); /* a read-only export still works */
  g_assert_false(cbt_blockdev_acquire_write(b, &error));
  g_assert_cmpstr(error->message, ==, "Failed to get \"write\" lock");
  g_clear_error(&error);
  g_assert_true(cbt_blockdev_acquire_write(off, &error)); /* locking=off ignores locks */
  cbt_blockdev_release_write(off);
  /* The other process goes away: write permission is granted, and then excludes it. */
  cbt_blockdev_lock_set(other, 0, CBT_PERM_ALL, NULL);
  g_assert_true(cbt_blockdev_acquire_write(b, &error));
  g_assert_false(
    cbt_blockdev_lock_set(other, CBT_PERM_CONSISTENT_READ, CBT_PERM_CONSISTENT_READ, &error));
  g_assert_cmpstr(error->message, ==, "Failed to get shared \"write\" lock");
  g_clear_error(&error);
  cbt_blockdev_release_write(b);
  cbt_blockdev_remove_user(b);
  g_assert_true(
    cbt_blockdev_lock_set(other, CBT_PERM_CONSISTENT_READ, CBT_PERM_CONSISTENT_READ, &error));
  cbt_blockdev_lock_free(other);
  close(fd);
  del("lb");
  del("lc");
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;
  int ret;

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  tmpdir = g_dir_make_tmp("test-blockdev-XXXXXX", &error);
  g_assert_no_error(error);
  rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_qmp_register_block_core(rpc);

  g_test_add_func("/blockdev/file/rw", test_file_rw);
  g_test_add_func("/blockdev/file/read-only", test_file_read_only);
  g_test_add_func("/blockdev/file/unaligned-size", test_file_unaligned_size);
  g_test_add_func("/blockdev/file/block-status", test_file_block_status);
  g_test_add_func("/blockdev/walk/file", test_walk_file);
  g_test_add_func("/blockdev/walk/tmpfs", test_walk_tmpfs);
  g_test_add_func("/blockdev/walk/generic", test_walk_generic);
  g_test_add_func("/blockdev/file/discard", test_file_discard);
  g_test_add_func("/blockdev/file/write-zeroes", test_file_write_zeroes);
  g_test_add_func("/blockdev/file/direct", test_file_direct);
  g_test_add_func("/blockdev/raw/window", test_raw_window);
  g_test_add_func("/blockdev/raw/discard-policy", test_raw_discard_policy);
  g_test_add_func("/blockdev/null", test_null);
  g_test_add_func("/blockdev/add-errors", test_add_errors);
  g_test_add_func("/blockdev/host-device/loop", test_host_device);
  g_test_add_func("/blockdev/track/failed-write", test_track_failed_write);
  g_test_add_func("/blockdev/track/before-backend", test_track_marks_before_backend);
  g_test_add_func("/blockdev/track/several", test_track_several);
  g_test_add_func("/blockdev/drain/concurrent", test_drain_concurrent);
  g_test_add_func("/blockdev/drain/holds-new", test_drain_holds_new_requests);
  g_test_add_func("/blockdev/auto-read-only", test_auto_read_only);
  g_test_add_func("/blockdev/users", test_users);
  g_test_add_func("/blockdev/track/observer", test_write_observer);
  g_test_add_func("/blockdev/store-info", test_store_info);
  g_test_add_func("/blockdev/lock/bytes", test_lock_bytes);
  g_test_add_func("/blockdev/lock/nodes", test_lock_nodes);
  ret = g_test_run();

  cbt_blockdev_close_all();
  cbt_rpc_free(rpc);
  g_autoptr(GDir) dir = g_dir_open(tmpdir, 0, NULL);
  for (const char *name; dir && (name = g_dir_read_name(dir));) {
    g_autofree char *p = tmp_path(name);
    g_unlink(p);
  }
  g_rmdir(tmpdir);
  g_free(tmpdir);
  return ret;
}
