/* lock.c — image locking compatible with QEMU, so cbtd, qemu-img, qemu-nbd, qemu-storage-daemon
 * and QEMU itself exclude each other the same way they exclude one another.
 *
 * QEMU's scheme (file-posix): open-file-description (OFD) read locks on single bytes. Byte
 * PERM_BASE + i is read-locked while the process holds permission i; byte SHARED_BASE + i is
 * read-locked while it refuses to share permission i with anyone. Another process that wants
 * permission i must find SHARED_BASE + i unlocked; one that refuses to share i must find
 * PERM_BASE + i unlocked. A conflict shows as a failed F_OFD_GETLK test for a write lock.
 * We lock first and test afterwards, so two processes racing both see each other.
 */
#include <errno.h>
#include <fcntl.h>
#include "blockdev/blockdev-internal.h"

#define PERM_BASE 100
#define SHARED_BASE 200
#define NPERMS 4

static const char *const perm_names[NPERMS] = {
  "consistent read",
  "write",
  "write unchanged",
  "resize",
};

struct CbtBlockdevLock {
  int fd;
  char *filename;
  guint64 perm;   /* permissions whose bytes we hold */
  guint64 shared; /* permissions we share (their bytes are not locked) */
};

CbtBlockdevLock *
cbt_blockdev_lock_new(int fd, const char *filename)
{
  CbtBlockdevLock *lock = g_new0(CbtBlockdevLock, 1);

  lock->fd = fd;
  lock->filename = g_strdup(filename);
  lock->shared = CBT_PERM_ALL;
  return lock;
}

void
cbt_blockdev_lock_free(CbtBlockdevLock *lock)
{
  /* Closing the descriptor releases the locks; the caller closes it. */
  g_free(lock->filename);
  g_free(lock);
}

static int
lock_byte(int fd, int byte, short type)
{
  struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };

  return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* TRUE when another open file holds a lock on @byte. */
static gboolean
byte_taken(int fd, int byte)
{
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };

  if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
    return FALSE;
  return fl.l_type != F_UNLCK;
}

static gboolean
apply(CbtBlockdevLock *lock, guint64 perm, guint64 shared, GError **error)
{
  for (int i = 0; i < NPERMS; i++) {
    guint64 bit = 1ull << i;
    int r = lock_byte(lock->fd, PERM_BASE + i, (perm & bit) ? F_RDLCK : F_UNLCK);
    if (r == 0)
      r = lock_byte(lock->fd, SHARED_BASE + i, (shared & bit) ? F_UNLCK : F_RDLCK);
    if (r < 0) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to lock byte %d",
                  (perm & bit) ? PERM_BASE + i : SHARED_BASE + i);
      return FALSE;
    }
  }
  return TRUE;
}

static gboolean
check(CbtBlockdevLock *lock, guint64 perm, guint64 shared, GError **error)
{
  for (int i = 0; i < NPERMS; i++) {
    if ((perm & (1ull << i)) && byte_taken(lock->fd, SHARED_BASE + i)) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to get \"%s\" lock", perm_names[i]);
      return FALSE;
    }
  }
  for (int i = 0; i < NPERMS; i++) {
    if (!(shared & (1ull << i)) && byte_taken(lock->fd, PERM_BASE + i)) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Failed to get shared \"%s\" lock", perm_names[i]);
      return FALSE;
    }
  }
  return TRUE;
}

gboolean
cbt_blockdev_lock_set(CbtBlockdevLock *lock, guint64 perm, guint64 shared, GError **error)
{
  if (perm == lock->perm && shared == lock->shared)
    return TRUE;
  /* Only what we newly take or newly refuse can conflict. */
  guint64 new_perm = perm & ~lock->perm;
  guint64 new_unshared = lock->shared & ~shared;

  if (!apply(lock, perm, shared, error) ||
      !check(lock, new_perm, CBT_PERM_ALL & ~new_unshared, error)) {
    apply(lock, lock->perm, lock->shared, NULL);
    return FALSE;
  }
  lock->perm = perm;
  lock->shared = shared;
  return TRUE;
}
