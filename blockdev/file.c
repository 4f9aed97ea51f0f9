/* file.c — the `file` (regular file) and `host_device` (block or character device) backends.
 *
 * Plain positional syscalls on one descriptor, safe from any number of threads. With
 * cache.direct the image is also opened without O_DIRECT, and requests that are not aligned for
 * O_DIRECT use that second descriptor: the kernel keeps both views coherent, and clients need
 * not know about alignment. The size is the file's, rounded up to 512 bytes as QEMU reports it;
 * the bytes past the end of the file read as zeroes.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>
#include "blockdev/blockdev-internal.h"

#define SECTOR 512u
#define DIRECT_ALIGN 4096u
#define ZERO_CHUNK (1u << 20)
#define FIEMAP_BATCH 256u /* extents per FS_IOC_FIEMAP call (14 KiB) */
#define HOLE_STATUS (CBT_BLOCKDEV_STATUS_HOLE | CBT_BLOCKDEV_STATUS_ZERO)

typedef struct {
  int fd;          /* the image, O_DIRECT with cache.direct */
  int fd_buffered; /* == fd without cache.direct */
  char *filename;
  /* auto-read-only opens read-only when writing is refused, and reopens for writing when write
   * permission is asked for (QEMU's dynamic auto-read-only). The read-only descriptors stay
   * open until the node closes: a reader may still be using one, and the first holds the lock
   * bytes. */
  gboolean writable;
  int ro_fd, ro_fd_buffered; /* -1 until such a reopen */
  gboolean is_device;
  gboolean tail_padded;  /* the file's size is not a multiple of 512 */
  gint fiemap;           /* status walks may map extents with FIEMAP (see fiemap_trusted) */
  CbtBlockdevLock *lock; /* NULL with locking=off */
  /* Where persistent bitmaps live (dirty-bitmaps/persist.c reads these). */
  char *bitmap_store;
  guint32 bitmap_sync_interval;
  guint64 bitmap_intent_region;
} FileState;

static gboolean get_size(FileState *s, const struct stat *st, guint64 *size, GError **error);

static FileState *
state(CbtBlockdev *bd)
{
  return bd->opaque;
}

/* The descriptors change at most once (the reopen above), from the main thread. */
static int
image_fd(FileState *s)
{
  return g_atomic_int_get(&s->fd);
}

static int
fd_for(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len)
{
  FileState *s = state(bd);
  int fd = image_fd(s), buffered = g_atomic_int_get(&s->fd_buffered);

  if (fd != buffered &&
      ((guintptr)buf % DIRECT_ALIGN || offset % DIRECT_ALIGN || len % DIRECT_ALIGN))
    return buffered;
  return fd;
}

static int
file_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  int fd = fd_for(bd, buf, offset, len);
  gsize done = 0;

  while (done < len) {
    ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(offset + done));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -errno;
    if (r == 0) {
      /* Past the end of the file (the padding up to 512 bytes, or a file that shrank). */
      memset((char *)buf + done, 0, len - done);
      break;
    }
    done += (gsize)r;
  }
  return 0;
}

static int
write_all(int fd, const void *buf, guint64 offset, gsize len, gboolean dsync)
{
  gsize done = 0;

  while (done < len) {
    struct iovec iov = { (char *)buf + done, len - done };
    ssize_t r = dsync ? pwritev2(fd, &iov, 1, (off_t)(offset + done), RWF_DSYNC)
                      : pwrite(fd, iov.iov_base, iov.iov_len, (off_t)(offset + done));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 && dsync && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) {
      int err = write_all(fd, buf, offset, len, FALSE);
      return err ? err : (fdatasync(fd) < 0 ? -errno : 0);
    }
    if (r < 0)
      return -errno;
    if (r == 0)
      return -EIO;
    done += (gsize)r;
  }
  return 0;
}

static int
file_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  return write_all(fd_for(bd, buf, offset, len), buf, offset, len, (flags & CBT_BLOCKDEV_FUA) != 0);
}

static int
file_flush(CbtBlockdev *bd)
{
  return fdatasync(image_fd(state(bd))) < 0 ? -errno : 0;
}

static int
file_discard(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  FileState *s = state(bd);
  int r;

  if (s->is_device) {
    guint64 range[2] = { offset, len };
    r = ioctl(image_fd(s), BLKDISCARD, range);
  } else {
    r =
      fallocate(image_fd(s), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len);
  }
  /* A discard is advisory: a medium that cannot do it has done nothing wrong. */
  if (r < 0 && (errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL))
    r = 0;
  r = r < 0 ? -errno : 0;
  /* QEMU's file-posix counters (query-blockstats driver-specific). */
  if (r < 0) {
    __atomic_add_fetch(&bd->discard_failed, 1, __ATOMIC_RELAXED);
  } else {
    __atomic_add_fetch(&bd->discard_ok, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&bd->discard_bytes_ok, len, __ATOMIC_RELAXED);
  }
  return r;
}

/* QEMU's allocate_first_block(): a file grown from empty gets its first block written, so
 * that the file system learns its alignment; zeroes, as the growth reads anyway. */
static void
allocate_first_block(int fd, guint64 size)
{
  static const guint8 zeroes[4096];
  gsize n = size < sizeof zeroes ? SECTOR : sizeof zeroes;
  ssize_t r;

  do
    r = pwrite(fd, zeroes, n, 0);
  while (r < 0 && errno == EINTR);
}

/* file-posix's raw_co_truncate with exact=false: a regular file is truncated (growing reads as
 * zeroes); a device cannot grow, and a smaller size leaves it as it is. */
static gboolean
file_truncate(CbtBlockdev *bd, guint64 size, GError **error)
{
  FileState *s = state(bd);
  int fd = image_fd(s);
  struct stat st;

  if (fstat(fd, &st) < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to fstat() the file: %s", g_strerror(errno));
    return FALSE;
  }
  if (s->is_device) {
    guint64 cur;
    if (!get_size(s, &st, &cur, error))
      return FALSE;
    if (size > cur) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot grow device files");
      return FALSE;
    }
    bd->size = (cur + SECTOR - 1) / SECTOR * SECTOR;
    return TRUE;
  }
  if (ftruncate(fd, (off_t)size) < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Could not resize file: %s", g_strerror(errno));
    return FALSE;
  }
  if (st.st_size == 0 && size > 0)
    allocate_first_block(fd, size);
  s->tail_padded = size % SECTOR != 0;
  bd->size = (size + SECTOR - 1) / SECTOR * SECTOR;
  return TRUE;
}

static int
write_zero_buffers(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  g_autofree void *zeroes = NULL;
  gsize chunk = (gsize)MIN(len, ZERO_CHUNK);

  zeroes = g_aligned_alloc0(1, chunk, DIRECT_ALIGN);
  while (len > 0) {
    gsize n = (gsize)MIN(len, chunk);
    int r = file_pwrite(bd, zeroes, offset, n, flags);
    if (r < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

/* Zero a range with one cheap call, as QEMU's file-posix does: punch a hole when allowed,
 * otherwise FALLOC_FL_ZERO_RANGE, or punch and re-allocate where ZERO_RANGE is missing (tmpfs). */
static int
zero_cheaply(FileState *s, guint64 offset, guint64 len, guint flags)
{
  off_t off = (off_t)offset, n = (off_t)len;
  int fd = image_fd(s);

  if ((flags & CBT_BLOCKDEV_MAY_UNMAP) &&
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n) == 0)
    return 0;
  if (fallocate(fd, FALLOC_FL_ZERO_RANGE, off, n) == 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENODEV)
    return -errno;
  if (!s->is_device && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n) == 0)
    return fallocate(fd, 0, off, n) == 0 ? 0 : -errno;
  if (s->is_device) {
    guint64 range[2] = { offset, len };
    /* BLKZEROOUT may write zeroes itself: not cheap. */
    if (!(flags & CBT_BLOCKDEV_NO_FALLBACK) && ioctl(fd, BLKZEROOUT, range) == 0)
      return 0;
  }
  return -ENOTSUP;
}

static int
file_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  int r = zero_cheaply(state(bd), offset, len, flags);

  if (r == 0)
    return (flags & CBT_BLOCKDEV_FUA) ? file_flush(bd) : 0;
  if (r != -ENOTSUP || (flags & CBT_BLOCKDEV_NO_FALLBACK))
    return r;
  return write_zero_buffers(bd, offset, len, flags);
}

static int
file_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status)
{
  FileState *s = state(bd);
  guint64 end = offset + len;
  off_t data, hole;

  *pnum = len;
  *status = 0;
  if (s->is_device)
    return 0;
  data = lseek(image_fd(s), (off_t)offset, SEEK_DATA);
  if (data < 0 && errno != ENXIO)
    return 0; /* no SEEK_DATA here: report data, which is always safe */
  if (data < 0 || (guint64)data > offset) {
    /* A hole up to the next data, or to the end (ENXIO: no data at or after @offset). */
    *pnum = data < 0 ? len : MIN((guint64)data, end) - offset;
    *status = HOLE_STATUS;
    return 0;
  }
  hole = lseek(image_fd(s), (off_t)offset, SEEK_HOLE);
  if (hole > (off_t)offset)
    *pnum = MIN((guint64)hole, end) - offset;
  return 0;
}

/* ---- status walks ------------------------------------------------------------------------ */

/* A walk maps many extents per FS_IOC_FIEMAP call instead of two lseek() calls per run, and must
 * still give exactly what SEEK_DATA/SEEK_HOLE give (file_block_status, and QEMU's answers):
 * written, delayed and inline extents are data, gaps are holes, and an unwritten (preallocated)
 * extent is asked of lseek, as it is data where the page cache holds its pages. */
typedef struct {
  CbtBlockdev *bd;
  CbtBlockdevStatusFunc fn;
  gpointer user_data;
  guint64 pos; /* reported up to here */
} FileWalk;

enum { WALK_STOPPED, WALK_DONE, WALK_MORE };

/* Report [w->pos, to) with @status; FALSE when the caller stops. */
static gboolean
walk_run(FileWalk *w, guint64 to, guint32 status)
{
  guint64 from = w->pos;

  w->pos = to;
  return w->fn(from, to - from, status, w->user_data);
}

/* [w->pos, to) the way file_block_status sees it, run by run. */
static gboolean
walk_seek(FileWalk *w, guint64 to)
{
  while (w->pos < to) {
    guint64 pnum;
    guint32 status;
    file_block_status(w->bd, w->pos, to - w->pos, &pnum, &status);
    if (!walk_run(w, w->pos + pnum, status))
      return FALSE;
  }
  return TRUE;
}

/* One FS_IOC_FIEMAP call for [w->pos, eof) and its runs. Without FIEMAP_FLAG_SYNC: that would
 * write back the whole file first, and delayed extents are reported as such anyway. Returns
 * WALK_MORE when the batch was full, or a negative errno when the call failed. */
static int
walk_fiemap_batch(FileWalk *w, struct fiemap *fm, guint64 eof)
{
  gboolean last = FALSE;

  memset(fm, 0, sizeof(*fm));
  fm->fm_start = w->pos;
  fm->fm_length = eof - w->pos;
  fm->fm_extent_count = FIEMAP_BATCH;
  if (ioctl(image_fd(state(w->bd)), FS_IOC_FIEMAP, fm) < 0)
    return -errno;
  for (guint32 i = 0; i < fm->fm_mapped_extents && !last; i++) {
    const struct fiemap_extent *e = &fm->fm_extents[i];
    guint64 from = MAX(e->fe_logical, w->pos);
    guint64 to = MIN(e->fe_logical + e->fe_length, eof);

    last = (e->fe_flags & FIEMAP_EXTENT_LAST) != 0;
    if (from >= to)
      continue; /* outside what is left (the file changed meanwhile) */
    if (from > w->pos && !walk_run(w, from, HOLE_STATUS))
      return WALK_STOPPED;
    if (!((e->fe_flags & FIEMAP_EXTENT_UNWRITTEN) ? walk_seek(w, to) : walk_run(w, to, 0)))
      return WALK_STOPPED;
  }
  if (!last && fm->fm_mapped_extents == FIEMAP_BATCH)
    return WALK_MORE;
  /* The call saw all of [w->pos, eof): what no extent covers is a hole. */
  if (w->pos < eof && !walk_run(w, eof, HOLE_STATUS))
    return WALK_STOPPED;
  return WALK_DONE;
}

static int
file_block_status_walk(CbtBlockdev *bd, guint64 offset, guint64 len, CbtBlockdevStatusFunc fn,
                       gpointer user_data)
{
  FileState *s = state(bd);
  FileWalk w = { .bd = bd, .fn = fn, .user_data = user_data, .pos = offset };
  g_autofree struct fiemap *fm = NULL;
  guint64 end = offset + len, eof;
  int r = WALK_MORE;
  struct stat st;

  if (!g_atomic_int_get(&s->fiemap) || fstat(image_fd(s), &st) < 0) {
    walk_seek(&w, end);
    return 0;
  }
  /* SEEK_DATA finds nothing past the end of the file (the padding up to 512 bytes, or a file
   * that shrank), whatever blocks are allocated there (fallocate with KEEP_SIZE). */
  eof = CLAMP((guint64)st.st_size, offset, end);
  fm = g_malloc(sizeof(*fm) + FIEMAP_BATCH * sizeof(struct fiemap_extent));
  while (r == WALK_MORE && w.pos < eof) {
    guint64 from = w.pos;
    r = walk_fiemap_batch(&w, fm, eof);
    if (r == WALK_MORE && w.pos == from)
      r = -EIO; /* a full batch with nothing new: lseek finishes */
  }
  if (r < 0) {
    if (r == -EOPNOTSUPP || r == -ENOTTY)
      g_atomic_int_set(&s->fiemap, FALSE);
    r = walk_seek(&w, eof) ? WALK_DONE : WALK_STOPPED;
  }
  if (r != WALK_STOPPED && w.pos < end)
    walk_run(&w, end, HOLE_STATUS);
  return 0;
}

static int
file_get_data_fd(CbtBlockdev *bd, guint64 *fd_offset)
{
  FileState *s = state(bd);

  if (s->tail_padded)
    return -1; /* the node is longer than the file: its tail is not in the fd */
  *fd_offset = 0;
  return g_atomic_int_get(&s->fd_buffered);
}

static gint64
file_actual_size(CbtBlockdev *bd)
{
  struct stat st;

  if (fstat(image_fd(state(bd)), &st) < 0)
    return -1;
  return (gint64)st.st_blocks * 512;
}

static gboolean
reopen_writable(CbtBlockdev *bd, FileState *s, GError **error)
{
  int fd = open(s->filename, O_CLOEXEC | O_RDWR | (bd->cache_direct ? O_DIRECT : 0));
  int buffered = fd;

  if (fd >= 0 && bd->cache_direct && (buffered = open(s->filename, O_CLOEXEC | O_RDWR)) < 0) {
    int err = errno;
    close(fd);
    fd = -1;
    errno = err;
  }
  if (fd < 0) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Could not open '%s': %s", s->filename,
                g_strerror(errno));
    return FALSE;
  }
  s->ro_fd = s->fd;
  s->ro_fd_buffered = s->fd_buffered;
  g_atomic_int_set(&s->fd_buffered, buffered);
  g_atomic_int_set(&s->fd, fd);
  s->writable = TRUE;
  return TRUE;
}

static gboolean
file_update_perms(CbtBlockdev *bd, GError **error)
{
  FileState *s = state(bd);

  if ((bd->perm & CBT_PERM_WRITE) && !s->writable && !reopen_writable(bd, s, error))
    return FALSE;
  if (!s->lock)
    return TRUE;
  /* force-share: this process refuses nobody anything (QEMU's BDRV_O_NO_SHARE off). */
  return cbt_blockdev_lock_set(s->lock, bd->perm, bd->force_share ? CBT_PERM_ALL : bd->shared,
                               error);
}

static void
close_pair(int fd, int buffered)
{
  if (buffered != fd && buffered >= 0)
    close(buffered);
  if (fd >= 0)
    close(fd);
}

static void
file_close(CbtBlockdev *bd)
{
  FileState *s = state(bd);

  g_clear_pointer(&s->lock, cbt_blockdev_lock_free);
  close_pair(s->fd, s->fd_buffered);
  close_pair(s->ro_fd, s->ro_fd_buffered);
  g_free(s->filename);
  g_free(s->bitmap_store);
  g_free(s);
  bd->opaque = NULL;
}

/* ---- opening ----------------------------------------------------------------------------- */

static gboolean
check_options(CbtBlockdev *bd, const CbtQmpBlockdevOptionsFile *o, GError **error)
{
  if (o->pr_manager) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "No persistent reservation manager with id '%s'",
                o->pr_manager);
    return FALSE;
  }
  if (o->aio == CBT_QMP_BLOCKDEV_AIO_OPTIONS_NATIVE && !bd->cache_direct) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "aio=native was specified, but it requires "
                "cache.direct=on, which was not specified.");
    return FALSE;
  }
  /* The store keeps one bit per region in a word-sized map; below 1 MiB the map of a large
   * device would be larger than the fine map it summarises. */
  guint64 region = o->bitmap_intent_region;
  if (region < (1u << 20) || (region & (region - 1))) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Parameter 'bitmap-intent-region' must be a power of two of at least 1 MiB");
    return FALSE;
  }
  if (o->bitmap_store && !o->bitmap_store[0]) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Parameter 'bitmap-store' must not be empty");
    return FALSE;
  }
  return TRUE;
}

/* Opens read-write unless the node is read-only; *writable tells which it got. */
static int
open_image(CbtBlockdev *bd, const char *filename, gboolean direct, gboolean *writable,
           GError **error)
{
  int flags = O_CLOEXEC | (direct ? O_DIRECT : 0);
  int fd = open(filename, flags | (bd->read_only ? O_RDONLY : O_RDWR));

  *writable = !bd->read_only && fd >= 0;
  /* auto-read-only: fall back to reading; asking for write permission reopens. */
  if (fd < 0 && bd->auto_read_only && (errno == EACCES || errno == EROFS || errno == EPERM))
    fd = open(filename, flags | O_RDONLY);
  if (fd < 0)
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Could not open '%s': %s", filename,
                g_strerror(errno));
  return fd;
}

static gboolean
check_type(CbtBlockdev *bd, const char *filename, const struct stat *st, GError **error)
{
  gboolean device = bd->drv == &cbt_blockdev_host_device_driver;

  if (!device && !S_ISREG(st->st_mode)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "'file' driver requires '%s' to be a regular file",
                filename);
    return FALSE;
  }
  if (device && !S_ISBLK(st->st_mode) && !S_ISCHR(st->st_mode)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "'host_device' driver requires '%s' to be either "
                "a character or block device",
                filename);
    return FALSE;
  }
  return TRUE;
}

static gboolean
get_size(FileState *s, const struct stat *st, guint64 *size, GError **error)
{
  if (S_ISBLK(st->st_mode)) {
    if (ioctl(s->fd, BLKGETSIZE64, size) < 0) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to get the device size: %s",
                  g_strerror(errno));
      return FALSE;
    }
    return TRUE;
  }
  if (S_ISCHR(st->st_mode)) {
    off_t end = lseek(s->fd, 0, SEEK_END);
    *size = end < 0 ? 0 : (guint64)end;
    return TRUE;
  }
  *size = (guint64)st->st_size;
  s->tail_padded = *size % SECTOR != 0;
  return TRUE;
}

/* Only where FIEMAP reports delayed allocation (data written but not yet given blocks) does it
 * show every byte SEEK_DATA calls data; elsewhere (tmpfs, NFS, ...) walks use lseek. */
static gboolean
fiemap_trusted(int fd)
{
  struct statfs sfs;

  if (fstatfs(fd, &sfs) < 0)
    return FALSE;
  switch ((guint32)sfs.f_type) {
  case EXT4_SUPER_MAGIC:
  case XFS_SUPER_MAGIC:
  case BTRFS_SUPER_MAGIC:
    return TRUE;
  default:
    return FALSE;
  }
}

/* file, host_device and host_cdrom share one branch type. */
const CbtQmpBlockdevOptionsFile *
cbt_blockdev_file_options(const CbtQmpBlockdevOptions *opts)
{
  switch (opts->driver) {
  case CBT_QMP_BLOCKDEV_DRIVER_FILE:
    return &opts->u.file;
  case CBT_QMP_BLOCKDEV_DRIVER_HOST_DEVICE:
    return &opts->u.host_device;
  case CBT_QMP_BLOCKDEV_DRIVER_HOST_CDROM:
    return &opts->u.host_cdrom;
  default:
    return NULL;
  }
}

static gboolean
file_open(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  const CbtQmpBlockdevOptionsFile *o = cbt_blockdev_file_options(opts);
  const char *filename = o->filename;
  g_autofree FileState *s = g_new0(FileState, 1);
  gboolean buffered_writable = TRUE;
  struct stat st;
  guint64 size;

  if (!check_options(bd, o, error))
    return FALSE;
  s->ro_fd = s->ro_fd_buffered = -1;
  s->fd = open_image(bd, filename, bd->cache_direct, &s->writable, error);
  if (s->fd < 0)
    return FALSE;
  s->fd_buffered = s->fd;
  if (fstat(s->fd, &st) < 0 || !check_type(bd, filename, &st, error) ||
      !get_size(s, &st, &size, error))
    goto fail;
  if (bd->cache_direct &&
      (s->fd_buffered = open_image(bd, filename, FALSE, &buffered_writable, error)) < 0) {
    s->fd_buffered = s->fd;
    goto fail;
  }
  s->writable = s->writable && buffered_writable;
  s->is_device = !S_ISREG(st.st_mode);
  s->fiemap = !s->is_device && fiemap_trusted(s->fd);
  if (o->locking != CBT_QMP_ON_OFF_AUTO_OFF)
    s->lock = cbt_blockdev_lock_new(s->fd, filename);
  bd->size = (size + SECTOR - 1) / SECTOR * SECTOR;
  s->filename = g_strdup(filename);
  s->bitmap_store = g_strdup(o->bitmap_store);
  s->bitmap_sync_interval = o->bitmap_sync_interval;
  s->bitmap_intent_region = o->bitmap_intent_region;
  bd->exact_filename = g_strdup(filename);
  json_object_set_string_member(bd->full_opts, "filename", filename);
  bd->opaque = g_steal_pointer(&s);
  return TRUE;

fail:
  if (error && !*error)
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Could not open '%s': %s", filename,
                g_strerror(errno));
  if (s->fd_buffered != s->fd)
    close(s->fd_buffered);
  close(s->fd);
  return FALSE;
}

gboolean
cbt_blockdev_get_store_info(CbtBlockdev *bd, CbtBlockdevStoreInfo *info)
{
  FileState *s = bd->opaque;

  if (bd->drv == &cbt_blockdev_raw_driver && bd->opaque && bd->file) {
    if (!cbt_blockdev_get_store_info(bd->file->node, info))
      return FALSE;
    info->via_format = TRUE;
    info->offset += cbt_blockdev_raw_offset(bd);
    return TRUE;
  }
  if ((bd->drv != &cbt_blockdev_file_driver && bd->drv != &cbt_blockdev_host_device_driver) || !s)
    return FALSE;
  *info = (CbtBlockdevStoreInfo){ 0 };
  info->node_name = bd->node_name;
  info->filename = s->filename;
  info->fd = image_fd(s);
  info->is_device = s->is_device;
  info->store = s->bitmap_store;
  info->sync_interval_ms = s->bitmap_sync_interval;
  info->region_size = s->bitmap_intent_region;
  return TRUE;
}

/* file and host_device differ only in name: the backend checks what the path is. */
#define FILE_DRIVER(drv_name)                                                                      \
  {                                                                                                \
    .name = drv_name, .protocol = TRUE, .has_dirty_flag = TRUE,                                    \
    .supported_flags = CBT_BLOCKDEV_FUA | CBT_BLOCKDEV_MAY_UNMAP | CBT_BLOCKDEV_NO_FALLBACK,       \
    .open = file_open, .close = file_close, .pread = file_pread, .pwrite = file_pwrite,            \
    .flush = file_flush, .discard = file_discard, .write_zeroes = file_write_zeroes,               \
    .block_status = file_block_status, .block_status_walk = file_block_status_walk,                \
    .get_data_fd = file_get_data_fd, .update_perms = file_update_perms,                            \
    .actual_size = file_actual_size, .truncate = file_truncate,                                    \
  }

const CbtBlockdevDriver cbt_blockdev_file_driver = FILE_DRIVER("file");
const CbtBlockdevDriver cbt_blockdev_host_device_driver = FILE_DRIVER("host_device");
