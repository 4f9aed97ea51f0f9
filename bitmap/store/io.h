/* bitmap/store/io.h — the only way a store touches its file (SQLite's VFS idea): the real file
 * system by default, a fault injector or a crash simulator in tests.
 *
 * Every call returns 0 (or a byte count, or an offset) on success and -errno on failure; a short
 * write is an error (-EIO). A CbtStoreFile is the base of an implementation's own struct.
 */
#pragma once

#include <glib.h>
#include <sys/types.h>

G_BEGIN_DECLS

typedef struct CbtStoreIo CbtStoreIo;

typedef struct {
  const CbtStoreIo *io;
} CbtStoreFile;

struct CbtStoreIo {
  /* Open @path for reading and writing, creating it (mode 0600) when @create, and take an
   * exclusive lock that another process cannot get (-EBUSY when it holds it). */
  int (*open)(const CbtStoreIo *io, const char *path, gboolean create, CbtStoreFile **out);
  gssize (*pread)(CbtStoreFile *f, void *buf, gsize len, guint64 offset);
  gssize (*pwrite)(CbtStoreFile *f, const void *buf, gsize len, guint64 offset);
  /* Make every completed write durable (fdatasync). */
  int (*sync)(CbtStoreFile *f);
  /* Make [offset, offset + len) read back as zeroes, freeing its blocks where possible. */
  int (*punch)(CbtStoreFile *f, guint64 offset, guint64 len);
  /* Reserve blocks for [offset, offset + len), so later writes there cannot run out of space. */
  int (*allocate)(CbtStoreFile *f, guint64 offset, guint64 len);
  /* The first offset >= @offset that may hold data (SEEK_DATA); the file size when none. */
  gint64 (*next_data)(CbtStoreFile *f, guint64 offset);
  /* The first offset >= @offset that reads as a hole (SEEK_HOLE); the file size when none. */
  gint64 (*next_hole)(CbtStoreFile *f, guint64 offset);
  gint64 (*size)(CbtStoreFile *f);
  void (*close)(CbtStoreFile *f);
  /* An id of the running kernel's boot (Linux: /proc/sys/kernel/random/boot_id). */
  const char *(*boot_id)(const CbtStoreIo *io);
};

/* The real file system. */
const CbtStoreIo *cbt_store_io_posix(void);

/* Write all of @len or fail (-errno; a short write is -EIO). */
int cbt_store_io_write(CbtStoreFile *f, const void *buf, gsize len, guint64 offset);
/* Read all of @len; bytes past the end of the file read as zeroes. */
int cbt_store_io_read(CbtStoreFile *f, void *buf, gsize len, guint64 offset);

G_END_DECLS
