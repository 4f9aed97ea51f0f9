/* bitmap/store/io.c — the store's I/O layer on the real file system.
 *
 * The lock is an OFD lock (per open file description, released when the descriptor closes,
 * also on kill -9), so a second process, or a second open in this one, cannot write the store.
 *
 * Fault injection for tests of the running daemon (builds without NDEBUG only): when the file
 * named by CBTD_STORE_FAULT_FILE exists and holds "enospc", every write that would allocate
 * blocks (a write into a hole of the store file) fails with ENOSPC, as on a full file system,
 * while overwrites of allocated blocks succeed; when it holds "erofs", every open, write, sync,
 * punch and allocation fails with EROFS, as after a remount read-only. Removing the file ends
 * the fault.
 */
#include "bitmap/store/io.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
  CbtStoreFile base;
  int fd;
} PosixFile;

#ifndef NDEBUG
/* Does [offset, offset + len) touch a hole (so that writing it allocates)? */
static gboolean
touches_hole(int fd, guint64 offset, gsize len)
{
  struct stat st;

  if (fstat(fd, &st) == 0 && offset + len > (guint64)st.st_size)
    return TRUE; /* an append allocates too */
  off_t h = lseek(fd, (off_t)offset, SEEK_HOLE);
  return h >= 0 && (guint64)h < offset + len;
}

/* The fault the test asked for: "enospc" (a full file system) or "erofs" (remounted
 * read-only: every write, sync and open for writing fails). */
static gboolean
fault(const char *kind)
{
  const char *path = g_getenv("CBTD_STORE_FAULT_FILE");
  g_autofree char *text = NULL;

  return path && g_file_get_contents(path, &text, NULL, NULL) && strstr(text, kind);
}
#define FAIL_IF_READ_ONLY()                                                                        \
  G_STMT_START                                                                                     \
  {                                                                                                \
    if (fault("erofs"))                                                                            \
      return -EROFS;                                                                               \
  }                                                                                                \
  G_STMT_END
#else
#define FAIL_IF_READ_ONLY() ((void)0)
#endif

static int
posix_open(const CbtStoreIo *io, const char *path, gboolean create, CbtStoreFile **out)
{
  FAIL_IF_READ_ONLY();
  int fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0600);
  if (fd < 0)
    return -errno;
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
  if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
    int err = errno == EAGAIN || errno == EACCES ? EBUSY : errno;
    close(fd);
    return -err;
  }
  PosixFile *f = g_new0(PosixFile, 1);
  f->base.io = io;
  f->fd = fd;
  *out = &f->base;
  return 0;
}

static gssize
posix_pwrite(CbtStoreFile *file, const void *buf, gsize len, guint64 offset)
{
  PosixFile *f = (PosixFile *)file;

  FAIL_IF_READ_ONLY();
#ifndef NDEBUG
  if (fault("enospc") && touches_hole(f->fd, offset, len))
    return -ENOSPC;
#endif
  gssize n = pwrite(f->fd, buf, len, (off_t)offset);
  return n < 0 ? -errno : n;
}

static gssize
posix_pread(CbtStoreFile *file, void *buf, gsize len, guint64 offset)
{
  gssize n = pread(((PosixFile *)file)->fd, buf, len, (off_t)offset);
  return n < 0 ? -errno : n;
}

static int
posix_sync(CbtStoreFile *file)
{
  FAIL_IF_READ_ONLY();
  return fdatasync(((PosixFile *)file)->fd) < 0 ? -errno : 0;
}

static int
posix_punch(CbtStoreFile *file, guint64 offset, guint64 len)
{
  int fd = ((PosixFile *)file)->fd;

  FAIL_IF_READ_ONLY();
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) == 0)
    return 0;
  if (errno != EOPNOTSUPP)
    return -errno;
  /* A file system without holes: write the zeroes. */
  static const guint8 zeros[65536];
  while (len) {
    gsize n = MIN(len, sizeof zeros);
    int r = cbt_store_io_write(file, zeros, n, offset);
    if (r < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

static int
posix_allocate(CbtStoreFile *file, guint64 offset, guint64 len)
{
  FAIL_IF_READ_ONLY();
  int r = posix_fallocate(((PosixFile *)file)->fd, (off_t)offset, (off_t)len);
  return -r;
}

/* SEEK_DATA or SEEK_HOLE from @offset; the file size when there is no more of either. */
static gint64
seek_from(CbtStoreFile *file, guint64 offset, int whence)
{
  int fd = ((PosixFile *)file)->fd;
  off_t r = lseek(fd, (off_t)offset, whence);

  if (r >= 0)
    return r;
  if (errno == EINVAL && whence == SEEK_DATA)
    return (gint64)offset; /* no SEEK_DATA here: everything is data */
  if (errno != ENXIO && errno != EINVAL)
    return -errno;
  struct stat st;
  return fstat(fd, &st) < 0 ? -errno : st.st_size;
}

static gint64
posix_next_data(CbtStoreFile *file, guint64 offset)
{
  return seek_from(file, offset, SEEK_DATA);
}

static gint64
posix_next_hole(CbtStoreFile *file, guint64 offset)
{
  return seek_from(file, offset, SEEK_HOLE);
}

static gint64
posix_size(CbtStoreFile *file)
{
  struct stat st;

  return fstat(((PosixFile *)file)->fd, &st) < 0 ? -errno : st.st_size;
}

static void
posix_close(CbtStoreFile *file)
{
  PosixFile *f = (PosixFile *)file;

  close(f->fd);
  g_free(f);
}

static const char *
posix_boot_id(const CbtStoreIo *io)
{
  static char id[64];
  static gsize once;

  (void)io;
  if (g_once_init_enter(&once)) {
    g_autofree char *text = NULL;
    if (g_file_get_contents("/proc/sys/kernel/random/boot_id", &text, NULL, NULL))
      g_strlcpy(id, g_strstrip(text), sizeof id);
    g_once_init_leave(&once, 1);
  }
  return id;
}

static const CbtStoreIo posix_io = {
  .open = posix_open,
  .pread = posix_pread,
  .pwrite = posix_pwrite,
  .sync = posix_sync,
  .punch = posix_punch,
  .allocate = posix_allocate,
  .next_data = posix_next_data,
  .next_hole = posix_next_hole,
  .size = posix_size,
  .close = posix_close,
  .boot_id = posix_boot_id,
};

const CbtStoreIo *
cbt_store_io_posix(void)
{
  return &posix_io;
}

int
cbt_store_io_write(CbtStoreFile *f, const void *buf, gsize len, guint64 offset)
{
  while (len) {
    gssize n = f->io->pwrite(f, buf, len, offset);
    if (n == -EINTR)
      continue;
    if (n < 0)
      return (int)n;
    if (n == 0)
      return -EIO;
    buf = (const guint8 *)buf + n;
    offset += (guint64)n;
    len -= (gsize)n;
  }
  return 0;
}

int
cbt_store_io_read(CbtStoreFile *f, void *buf, gsize len, guint64 offset)
{
  while (len) {
    gssize n = f->io->pread(f, buf, len, offset);
    if (n == -EINTR)
      continue;
    if (n < 0)
      return (int)n;
    if (n == 0) {
      memset(buf, 0, len);
      return 0;
    }
    buf = (guint8 *)buf + n;
    offset += (guint64)n;
    len -= (gsize)n;
  }
  return 0;
}
