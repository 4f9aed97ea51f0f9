/* blockdev/ internals: the node structure shared by the registry, the drivers and the commands. */
#pragma once

#include <json-glib/json-glib.h>
#include "blockdev/blockdev.h"
#include "common/assert.h"
#include "schemas/qmp-types.h"

typedef struct CbtBlockdevDriver CbtBlockdevDriver;

/* The dirty bitmaps a node marks on writes: immutable once published, replaced while the node
 * is drained, so the write path reads it with one atomic load and no lock. */
typedef struct {
  guint n;
  CbtBitmap *bitmaps[];
} CbtBlockdevTracked;

struct CbtBlockdev {
  gint refcnt;
  char *node_name;
  const CbtBlockdevDriver *drv;
  CbtBlockdev *child;          /* raw's file; NULL for protocol nodes */
  guint parents;               /* nodes that have this one as child */
  guint users;                 /* exports and jobs on this node */
  /* Permissions needed by users of this node and of the nodes above it (QEMU's propagation). */
  guint readers;               /* users: consistent read */
  guint writers;               /* write permission holders */
  guint resize_unshared;       /* windowed raw parents and readers refuse others' resizes */
  gboolean monitor_owned;      /* added by blockdev-add, so blockdev-del may remove it */

  gboolean read_only;
  gboolean auto_read_only;
  gboolean force_share;
  gboolean discard_unmap;
  gboolean cache_direct;
  gboolean cache_no_flush;
  CbtQmpBlockdevDetectZeroesOptions detect_zeroes;

  guint64 size;                /* bytes, a multiple of 512 for protocol nodes as in QEMU */
  guint32 min_io;
  /* QEMU's strong options ({"driver": ..., ...}, children nested) and the file name derived
   * from them: the exact file name, or "json:{...}". */
  JsonObject *full_opts;
  char *exact_filename;        /* NULL when the node needs a json: name */

  gpointer opaque;             /* the driver's state */

  /* I/O admission: requests in flight through this node, and nested drains of it. */
  gint inflight;
  gint draining;
  CbtBlockdevTracked *tracked;
};

struct CbtBlockdevDriver {
  const char *name;
  gboolean protocol;           /* opens a file itself; a parent may borrow its file name */
  gboolean has_dirty_flag;     /* protocol: query reports image.dirty-flag: false */
  /* Driver-specific members of @opts (this driver's branch); common members and the child
   * are already set. */
  gboolean (*open)(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error);
  void (*close)(CbtBlockdev *bd);
  int (*pread)(CbtBlockdev *bd, void *buf, guint64 offset, gsize len);
  int (*pwrite)(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags);
  int (*flush)(CbtBlockdev *bd);
  int (*discard)(CbtBlockdev *bd, guint64 offset, guint64 len);
  int (*write_zeroes)(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags);
  int (*block_status)(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                      guint32 *status);
  /* Optional: report the runs of [offset, offset + len) in order through @fn, stopping when it
   * returns FALSE (cbt_blockdev_block_status_walk checks the order and fills what was left out
   * with data). Without it the walk calls block_status run by run. */
  int (*block_status_walk)(CbtBlockdev *bd, guint64 offset, guint64 len,
                           CbtBlockdevStatusFunc fn, gpointer user_data);
  int (*get_data_fd)(CbtBlockdev *bd, guint64 *fd_offset);
  /* Apply the node's permission counts to the medium (image locks). May be NULL. */
  gboolean (*update_perms)(CbtBlockdev *bd, GError **error);
  /* Bytes allocated on the host, or -1 when unknown. */
  gint64 (*actual_size)(CbtBlockdev *bd);
};

extern const CbtBlockdevDriver cbt_blockdev_file_driver;
extern const CbtBlockdevDriver cbt_blockdev_host_device_driver;
extern const CbtBlockdevDriver cbt_blockdev_raw_driver;
extern const CbtBlockdevDriver cbt_blockdev_null_driver;
extern const CbtBlockdevDriver cbt_blockdev_null_aio_driver;

/* Registry (blockdev.c). */
CbtBlockdev *cbt_blockdev_new(const CbtBlockdevDriver *drv);
/* Publish a fully opened node (it becomes visible to find and query). */
void cbt_blockdev_register(CbtBlockdev *bd);
/* Every published node, newest first (borrowed; main thread). */
GList *cbt_blockdev_list(void);
/* Run the notifiers of @event for @bd. */
void cbt_blockdev_notify(CbtBlockdev *bd, CbtBlockdevEvent event, gpointer data);

/* Re-apply permissions along @bd's chain after its counts changed. */
gboolean cbt_blockdev_update_perms(CbtBlockdev *bd, GError **error);

/* The members of a file, host_device or host_cdrom node's options, else NULL (file.c). */
const CbtQmpBlockdevOptionsFile *cbt_blockdev_file_options(const CbtQmpBlockdevOptions *opts);

/* Opening from BlockdevOptions (open.c). */
CbtBlockdev *cbt_blockdev_open(const CbtQmpBlockdevOptions *opts, GError **error);

/* Query output (info.c, transfer full). */
CbtQmpBlockDeviceInfo *cbt_blockdev_info(CbtBlockdev *bd);
/* The node's file name as QEMU prints it (transfer full). */
char *cbt_blockdev_filename(CbtBlockdev *bd);

/* Image locking with QEMU's lock bytes (lock.c). @fd is the image's open file. */
typedef struct CbtBlockdevLock CbtBlockdevLock;
CbtBlockdevLock *cbt_blockdev_lock_new(int fd, const char *filename);
void cbt_blockdev_lock_free(CbtBlockdevLock *lock);
/* Apply the permissions this process needs and the ones it refuses to share, after checking
 * that no other process conflicts: QEMU's "Failed to get \"write\" lock" errors. */
gboolean cbt_blockdev_lock_set(CbtBlockdevLock *lock, guint64 perm, guint64 shared,
                               GError **error);

/* QEMU's permission bits (block.h), in lock-byte order. */
#define CBT_PERM_CONSISTENT_READ (1u << 0)
#define CBT_PERM_WRITE           (1u << 1)
#define CBT_PERM_WRITE_UNCHANGED (1u << 2)
#define CBT_PERM_RESIZE          (1u << 3)
#define CBT_PERM_ALL             0xfu
