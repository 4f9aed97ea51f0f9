/* tools/backup/qcow2.c — a point's image, written once, front to back, as a qcow2 file.
 *
 * A point is written once and never changed, so it needs none of qcow2's update machinery:
 * data clusters are appended as the copy produces them (several threads at once, each taking
 * the next free clusters), the L2 entries are kept in memory, and finish() appends the L2
 * tables, the L1 table, the refcount blocks and the refcount table and writes the header into
 * cluster 0. Until then the header is zeroes and the file is no image at all; the caller keeps it
 * under a .part name until finish() and an fsync are done (take.c, invariant 1). The layout is
 * QEMU's qcow2 version 3 (docs/interop/qcow2.txt in QEMU's sources): 64 KiB clusters, 16-bit
 * refcounts (every cluster used once), L2 entries with COPIED set, and for an overlay the
 * zero flag on clusters that must read as zeroes over the backing file. `qemu-img check` finds
 * no error in such an image (tests/tools/test_cbt_backup.py checks every point).
 *
 * The data clusters are covered by the pieces' checksums in the manifest; what the writer adds
 * of its own, the header cluster and the tables from tables_offset to the end of the file, is
 * covered by cbt_backup_qcow2_tables_sha256(), so a point is checked without reading its data
 * twice.
 */
#include "backup.h"

#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <gnutls/crypto.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CLUSTER_BITS 16
#define CLUSTER (1u << CLUSTER_BITS)
#define L2_ENTRIES (CLUSTER / 8)
#define REFCOUNTS_PER_BLOCK (CLUSTER / 2)
#define OFLAG_COPIED (1ull << 63)
#define OFLAG_ZERO 1ull
#define EXT_BACKING_FORMAT 0xe2792acau
#define HEADER_LENGTH 104

struct CbtBackupQcow2 {
  int fd;
  char *path, *backing;
  guint64 size;
  guint64 l1_size; /* L2 tables the disk needs */
  guint64 **l2;    /* l1_size tables of L2_ENTRIES, NULL until one entry is set */
  guint64 next;    /* the next free cluster of the file (atomic) */
  guint64 tables;  /* where finish() put the first table: the data clusters end there */
  GMutex lock;     /* allocation of L2 tables */
};

static gboolean
fail_errno(GError **error, const char *what, const char *path, int err)
{
  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "%s %s: %s", what, path,
              g_strerror(err));
  return FALSE;
}

static gboolean
write_at(CbtBackupQcow2 *q, const void *buf, gsize len, guint64 off, GError **error)
{
  const guint8 *p = buf;
  while (len) {
    ssize_t n = pwrite(q->fd, p, len, (off_t)off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return fail_errno(error, "writing", q->path, n < 0 ? errno : ENOSPC);
    p += n;
    len -= (gsize)n;
    off += (guint64)n;
  }
  return TRUE;
}

CbtBackupQcow2 *
cbt_backup_qcow2_create(const char *path, const char *backing, guint64 size, GError **error)
{
  int fd = g_open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    fail_errno(error, "creating", path, errno);
    return NULL;
  }
  CbtBackupQcow2 *q = g_new0(CbtBackupQcow2, 1);
  q->fd = fd;
  q->path = g_strdup(path);
  q->backing = g_strdup(backing);
  q->size = size;
  q->l1_size = MAX((size + (guint64)CLUSTER * L2_ENTRIES - 1) / ((guint64)CLUSTER * L2_ENTRIES), 1);
  q->l2 = g_new0(guint64 *, q->l1_size);
  q->next = 1; /* cluster 0: the header, written last */
  g_mutex_init(&q->lock);
  return q;
}

void
cbt_backup_qcow2_free(CbtBackupQcow2 *q)
{
  if (!q)
    return;
  close(q->fd);
  for (guint64 i = 0; i < q->l1_size; i++)
    g_free(q->l2[i]);
  g_free(q->l2);
  g_mutex_clear(&q->lock);
  g_free(q->path);
  g_free(q->backing);
  g_free(q);
}

static guint64 *
l2_entry(CbtBackupQcow2 *q, guint64 guest_cluster)
{
  guint64 t = guest_cluster / L2_ENTRIES;
  guint64 *table = g_atomic_pointer_get(&q->l2[t]);
  if (!table) {
    g_mutex_lock(&q->lock);
    if (!(table = q->l2[t]))
      g_atomic_pointer_set(&q->l2[t], table = g_new0(guint64, L2_ENTRIES));
    g_mutex_unlock(&q->lock);
  }
  return &table[guest_cluster % L2_ENTRIES];
}

static gboolean
check_range(CbtBackupQcow2 *q, guint64 offset, guint64 len, GError **error)
{
  if (offset % CLUSTER || (len % CLUSTER && offset + len != q->size) || offset + len > q->size) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                "internal: [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT ") is not whole clusters",
                offset, len);
    return FALSE;
  }
  return TRUE;
}

static gboolean
all_zero(const guint8 *buf, gsize len)
{
  return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

gboolean
cbt_backup_qcow2_write(CbtBackupQcow2 *q, guint64 offset, const guint8 *buf, gsize len,
                       gboolean zero_flag, GError **error)
{
  if (!check_range(q, offset, len, error))
    return FALSE;
  /* Runs of clusters that hold data go to consecutive clusters of the file, one write each;
   * a cluster of zeroes is left unallocated (a full) or flagged zero (an overlay). */
  for (gsize at = 0; at < len;) {
    gsize n = MIN(CLUSTER, len - at);
    if (all_zero(buf + at, n)) {
      if (zero_flag)
        *l2_entry(q, (offset + at) / CLUSTER) = OFLAG_ZERO;
      at += n;
      continue;
    }
    gsize run = n;
    while (at + run < len && !all_zero(buf + at + run, MIN(CLUSTER, len - at - run)))
      run += MIN(CLUSTER, len - at - run);
    guint64 clusters = (run + CLUSTER - 1) / CLUSTER;
    guint64 host = __atomic_fetch_add(&q->next, clusters, __ATOMIC_RELAXED);
    if (!write_at(q, buf + at, run, host * CLUSTER, error))
      return FALSE;
    for (guint64 c = 0; c < clusters; c++)
      *l2_entry(q, (offset + at) / CLUSTER + c) = ((host + c) * CLUSTER) | OFLAG_COPIED;
    at += run;
  }
  return TRUE;
}

gboolean
cbt_backup_qcow2_zero(CbtBackupQcow2 *q, guint64 offset, guint64 len, GError **error)
{
  if (!check_range(q, offset, len, error))
    return FALSE;
  for (guint64 c = offset / CLUSTER; c * CLUSTER < offset + len; c++)
    *l2_entry(q, c) = OFLAG_ZERO;
  return TRUE;
}

static void
be64_array(guint64 *out, const guint64 *in, gsize n)
{
  for (gsize i = 0; i < n; i++)
    out[i] = GUINT64_TO_BE(in[i]);
}

/* The header and what follows it in cluster 0: the backing format extension, the end of the
 * extensions and the backing file's name. */
static gboolean
write_header(CbtBackupQcow2 *q, guint64 l1_off, guint64 rt_off, guint64 rt_clusters, GError **error)
{
  g_autofree guint8 *h = g_malloc0(CLUSTER);
  guint32 *u32 = (guint32 *)h;
  gsize at = HEADER_LENGTH;
  gsize blen = q->backing ? strlen(q->backing) : 0;

  if (q->backing) {
    guint32 ext[2] = { GUINT32_TO_BE(EXT_BACKING_FORMAT), GUINT32_TO_BE(5) };
    memcpy(h + at, ext, 8);
    memcpy(h + at + 8, "qcow2", 5);
    at += 16; /* the 5 bytes padded to 8 */
  }
  at += 8; /* the end-of-extensions entry: zeroes */
  if (at + blen > 1023) {
    g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED, "backing file name too long");
    return FALSE;
  }
  memcpy(h + at, q->backing ? q->backing : "", blen);
  u32[0] = GUINT32_TO_BE(0x514649fb); /* "QFI\xfb" */
  u32[1] = GUINT32_TO_BE(3);
  guint64 be = GUINT64_TO_BE(q->backing ? at : 0); /* backing_file_offset */
  memcpy(h + 8, &be, 8);
  u32[4] = GUINT32_TO_BE((guint32)blen);
  u32[5] = GUINT32_TO_BE(CLUSTER_BITS);
  be = GUINT64_TO_BE(q->size);
  memcpy(h + 24, &be, 8);
  /* crypt_method (32) is 0 */
  u32[9] = GUINT32_TO_BE((guint32)q->l1_size);
  be = GUINT64_TO_BE(l1_off);
  memcpy(h + 40, &be, 8);
  be = GUINT64_TO_BE(rt_off);
  memcpy(h + 48, &be, 8);
  u32[14] = GUINT32_TO_BE((guint32)rt_clusters);
  /* nb_snapshots (60), snapshots_offset (64), the feature bits (72, 80, 88) are 0 */
  u32[24] = GUINT32_TO_BE(4); /* refcount_order: 16-bit refcounts */
  u32[25] = GUINT32_TO_BE(HEADER_LENGTH);
  return write_at(q, h, CLUSTER, 0, error);
}

gboolean
cbt_backup_qcow2_finish(CbtBackupQcow2 *q, GError **error)
{
  g_autofree guint64 *l1 = g_new0(guint64, q->l1_size);
  g_autofree guint64 *buf = g_new(guint64, L2_ENTRIES);
  guint64 next = q->next;

  q->tables = next * CLUSTER;
  for (guint64 t = 0; t < q->l1_size; t++) {
    if (!q->l2[t])
      continue;
    be64_array(buf, q->l2[t], L2_ENTRIES);
    if (!write_at(q, buf, CLUSTER, next * CLUSTER, error))
      return FALSE;
    l1[t] = (next++ * CLUSTER) | OFLAG_COPIED;
  }
  guint64 l1_off = next * CLUSTER;
  guint64 l1_clusters = (q->l1_size * 8 + CLUSTER - 1) / CLUSTER;
  g_autofree guint64 *l1_be = g_new0(guint64, l1_clusters * L2_ENTRIES);
  be64_array(l1_be, l1, q->l1_size);
  if (!write_at(q, l1_be, l1_clusters * CLUSTER, l1_off, error))
    return FALSE;
  next += l1_clusters;

  /* The refcount blocks and table count themselves too: grow them until they cover it all. */
  guint64 blocks = 0, rt_clusters = 0;
  for (;;) {
    guint64 total = next + blocks + rt_clusters;
    guint64 b = (total + REFCOUNTS_PER_BLOCK - 1) / REFCOUNTS_PER_BLOCK;
    guint64 r = (b * 8 + CLUSTER - 1) / CLUSTER;
    if (b == blocks && r == rt_clusters)
      break;
    blocks = b;
    rt_clusters = r;
  }
  guint64 total = next + blocks + rt_clusters;
  g_autofree guint16 *rc = g_new(guint16, REFCOUNTS_PER_BLOCK);
  g_autofree guint64 *rt = g_new0(guint64, rt_clusters * L2_ENTRIES);
  for (guint64 b = 0; b < blocks; b++) {
    for (guint64 i = 0; i < REFCOUNTS_PER_BLOCK; i++)
      rc[i] = GUINT16_TO_BE(b * REFCOUNTS_PER_BLOCK + i < total ? 1 : 0);
    if (!write_at(q, rc, CLUSTER, (next + b) * CLUSTER, error))
      return FALSE;
    rt[b] = GUINT64_TO_BE((next + b) * CLUSTER);
  }
  guint64 rt_off = (next + blocks) * CLUSTER;
  if (!write_at(q, rt, rt_clusters * CLUSTER, rt_off, error))
    return FALSE;
  if (ftruncate(q->fd, (off_t)(total * CLUSTER)) < 0)
    return fail_errno(error, "sizing", q->path, errno);
  return write_header(q, l1_off, rt_off, rt_clusters, error);
}

guint64
cbt_backup_qcow2_cluster(void)
{
  return CLUSTER;
}

guint64
cbt_backup_qcow2_tables_offset(CbtBackupQcow2 *q)
{
  return q->tables;
}

static gboolean
hash_range(int fd, gnutls_hash_hd_t hd, guint64 from, guint64 to, guint8 *buf, GError **error,
           const char *path)
{
  while (from < to) {
    ssize_t n = pread(fd, buf, MIN(to - from, CLUSTER), (off_t)from);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return fail_errno(error, "reading", path, n < 0 ? errno : EIO);
    gnutls_hash(hd, buf, (size_t)n);
    from += (guint64)n;
  }
  return TRUE;
}

char *
cbt_backup_qcow2_tables_sha256(const char *path, guint64 tables, guint64 *file_size, GError **error)
{
  int fd = g_open(path, O_RDONLY | O_CLOEXEC, 0);
  struct stat st;
  gnutls_hash_hd_t hd;
  guint8 digest[32];
  g_autofree guint8 *buf = g_malloc(CLUSTER);

  if (fd < 0 || fstat(fd, &st) < 0) {
    int err = errno;
    if (fd >= 0)
      close(fd);
    fail_errno(error, "reading", path, err);
    return NULL;
  }
  *file_size = (guint64)st.st_size;
  gnutls_hash_init(&hd, GNUTLS_DIG_SHA256);
  gboolean ok = tables >= CLUSTER && tables <= *file_size &&
                hash_range(fd, hd, 0, CLUSTER, buf, error, path) &&
                hash_range(fd, hd, tables, *file_size, buf, error, path);
  close(fd);
  gnutls_hash_deinit(hd, digest);
  if (!ok) {
    if (error && !*error)
      g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_FAILED,
                  "%s is shorter than its tables' place", path);
    return NULL;
  }
  GString *hex = g_string_new(NULL);
  for (int i = 0; i < 32; i++)
    g_string_append_printf(hex, "%02x", digest[i]);
  return g_string_free(hex, FALSE);
}
