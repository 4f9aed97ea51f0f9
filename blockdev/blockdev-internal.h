/* blockdev/ internals: the node structure shared by the registry, the drivers and the commands. */
#pragma once

#include <json-glib/json-glib.h>
#include "blockdev/blockdev.h"
#include "common/assert.h"
#include "schemas/qmp-types.h"

typedef struct CbtBlockdevDriver CbtBlockdevDriver;
typedef struct CbtBlockdevChild CbtBlockdevChild;

/* A write observer (cbt_blockdev_add_write_observer). */
typedef struct {
  CbtBlockdevWriteFunc mark;
  gpointer opaque;
} CbtBlockdevObserver;

/* The dirty bitmaps a node marks on writes and the observers it tells: immutable once
 * published, replaced while the node is drained, so the write path reads it with one atomic load
 * and no lock. One allocation: @observers points just past the @n bitmaps. */
typedef struct {
  guint n;
  guint n_observers;
  CbtBlockdevObserver *observers;
  CbtBitmap *bitmaps[];
} CbtBlockdevTracked;

/* QEMU's permission bits (block.h), in lock-byte order. */
#define CBT_PERM_CONSISTENT_READ (1u << 0)
#define CBT_PERM_WRITE (1u << 1)
#define CBT_PERM_WRITE_UNCHANGED (1u << 2)
#define CBT_PERM_RESIZE (1u << 3)
#define CBT_PERM_ALL 0xfu

/* What a child is to its parent (QEMU's BdrvChildRole, the bits cbtd uses). */
#define CBT_BLOCKDEV_CHILD_DATA (1u << 0)     /* holds the parent's data */
#define CBT_BLOCKDEV_CHILD_PRIMARY (1u << 1)  /* the one the parent takes its properties from */
#define CBT_BLOCKDEV_CHILD_FILTERED (1u << 2) /* a filter's child: the data passes unchanged */

/* An edge of the graph: @parent uses @node as its child @name. The parent holds a reference on
 * @node; @perm is what the parent needs of it and @shared what it lets others do (QEMU's
 * permission model), both derived from the parent's own needs by its driver's child_perm. */
struct CbtBlockdevChild {
  CbtBlockdev *parent;
  CbtBlockdev *node;
  char *name;
  guint role;
  guint64 perm;
  guint64 shared;
};

struct CbtBlockdev {
  gint refcnt;
  char *node_name;
  const CbtBlockdevDriver *drv;
  /* The graph (graph.c), changed on the main thread only, with the nodes concerned drained
   * whenever requests could be in flight. */
  GPtrArray *children;    /* CbtBlockdevChild * (owned), in the order attached */
  GPtrArray *parents;     /* CbtBlockdevChild * of the nodes above (borrowed) */
  CbtBlockdevChild *file; /* QEMU's bs->file: the child named "file" (formats, filters) or
                           * blkdebug's "image", or NULL */
  guint users;            /* exports and jobs on this node */
  guint writers;          /* users holding write permission */
  /* Cumulative permissions: what this node's users and parents need of it, and what all of
   * them let others do (graph.c, cbt_blockdev_refresh_perms). */
  guint64 perm;
  guint64 shared;
  gboolean monitor_owned; /* added by blockdev-add, so blockdev-del may remove it */
  /* Registry order (blockdev.c): taken when the node is created, which is when QEMU names it,
   * so children a driver opens itself (blkdebug's image, copy-before-write's target) are
   * newer than their parent, as in query-named-block-nodes of QEMU. */
  guint64 seq;
  /* Writes, zero-writes and carried-out discards that reached this node (atomic), and the
   * count as of its last successful flush: QEMU's write_gen and flushed_gen, which decide
   * whether a flush raises flush_to_disk (blkdebug's events, the only users). */
  gint write_gen;
  gint flushed_gen;
  guint holds;        /* cbt_blockdev_hold(): blockdev-del says the node is in use */
  guint blocks;       /* cbt_blockdev_block(): operations are blocked by... */
  char *block_reason; /* ...this (the first blocker's reason) */

  gboolean read_only;
  gboolean auto_read_only;
  gboolean force_share;
  gboolean discard_unmap;
  gboolean cache_direct;
  gboolean cache_no_flush;
  CbtQmpBlockdevDetectZeroesOptions detect_zeroes;

  guint64 size;         /* bytes, a multiple of 512 for protocol nodes as in QEMU */
  guint32 min_io;       /* limits (graph.c, cbt_blockdev_refresh_limits) */
  guint32 max_transfer; /* the longest read or write the node takes in one piece, 0: any */
  /* QEMU's strong options ({"driver": ..., ...}, children nested) and the file name derived
   * from them: the exact file name, or "json:{...}". */
  JsonObject *full_opts;
  char *exact_filename; /* NULL when the node needs a json: name */

  gpointer opaque; /* the driver's state */

  /* I/O admission (graph.c): requests that entered the graph at this node and are in flight,
   * and the drains in effect on this node or any node below it. */
  gint inflight;
  gint draining;
  gint drains_own; /* drains of this node itself (main thread) */
  CbtBlockdevTracked *tracked;

  guint resizers; /* block_resize in progress: a holder that needs resize (graph.c) */
  /* The write threshold (stats.c): 0 when disarmed; read on every write with one relaxed
   * load, disarmed by the compare-and-swap of the write that crosses it. */
  guint64 write_threshold;
  guint64 wr_highest;      /* end of the highest write that reached the node (relaxed atomics) */
  CbtBlockdevStats stats;  /* requests that entered the graph here (relaxed atomics) */
  GPtrArray *export_stats; /* CbtBlockdevExportStats * (owned), oldest first (main thread) */
  guint64 discard_ok, discard_failed, discard_bytes_ok; /* file.c: the backend's discards */
};

/* A child a driver has (its driver table lists them, NULL-terminated by name). */
typedef struct {
  const char *name;
  guint role;
} CbtBlockdevChildSpec;

struct CbtBlockdevDriver {
  const char *name;
  gboolean protocol;       /* opens a file itself; a parent may borrow its file name */
  gboolean has_dirty_flag; /* protocol: query reports image.dirty-flag: false */
  gboolean is_filter;      /* passes its FILTERED child's data through unchanged */
  gboolean no_image_info;  /* QEMU's bdrv_get_info fails: the query shows no dirty-flag */
  gboolean writes_wait;    /* a write may wait for other I/O first (copy-before-write's copy) */
  const CbtBlockdevChildSpec *children; /* NULL for protocol drivers */
  /* Request flags (CBT_BLOCKDEV_FUA, _MAY_UNMAP, _NO_FALLBACK) the driver honours itself. The
   * I/O path carries out FUA for the others with a flush after the write, and drops the rest. */
  guint supported_flags;
  /* Driver-specific members of @opts (this driver's branch); common members and the children
   * are already set. */
  gboolean (*open)(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error);
  void (*close)(CbtBlockdev *bd);
  /* What @bd needs of child @c and lets others do, given what @bd's own users and parents
   * need of it (@perm) and share (@shared). NULL: pass both through (a format or filter that
   * changes nothing about its data's size or content under others). */
  void (*child_perm)(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
                     guint64 *ret_perm, guint64 *ret_shared);
  /* Set @bd's limits from its children; NULL: min_io the largest of the DATA children's,
   * max_transfer the smallest non-zero one (QEMU's bdrv_merge_limits). */
  void (*refresh_limits)(CbtBlockdev *bd);
  int (*pread)(CbtBlockdev *bd, void *buf, guint64 offset, gsize len);
  int (*pwrite)(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags);
  int (*flush)(CbtBlockdev *bd);
  int (*discard)(CbtBlockdev *bd, guint64 offset, guint64 len);
  int (*write_zeroes)(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags);
  int (*block_status)(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum, guint32 *status);
  /* Optional: report the runs of [offset, offset + len) in order through @fn, stopping when it
   * returns FALSE (cbt_blockdev_block_status_walk checks the order and fills what was left out
   * with data). Without it the walk calls block_status run by run. */
  int (*block_status_walk)(CbtBlockdev *bd, guint64 offset, guint64 len, CbtBlockdevStatusFunc fn,
                           gpointer user_data);
  /* The frozen view of a snapshot-style filter (a copy-before-write node), for the node that
   * reads it (snapshot-access): data, status and discard of the point in time. Optional. */
  int (*snapshot_pread)(CbtBlockdev *bd, void *buf, guint64 offset, gsize len);
  int (*snapshot_block_status)(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                               guint32 *status);
  int (*snapshot_discard)(CbtBlockdev *bd, guint64 offset, guint64 len);
  int (*get_data_fd)(CbtBlockdev *bd, guint64 *fd_offset);
  /* Apply the node's cumulative permissions (bd->perm, bd->shared) to the medium (image
   * locks). May be NULL. */
  gboolean (*update_perms)(CbtBlockdev *bd, GError **error);
  /* Optional: the anonymous dirty bitmaps QEMU's driver keeps that query-named-block-nodes
   * lists on node @shown (@bd itself or one of its children), newest first, appended to @out
   * (CbtQmpBlockDirtyInfo *, owned). Main thread. */
  void (*query_bitmaps)(CbtBlockdev *bd, CbtBlockdev *shown, GPtrArray *out);
  /* Bytes allocated on the host, or -1 when unknown. */
  gint64 (*actual_size)(CbtBlockdev *bd);
  /* Optional (block_resize, with the nodes drained): make the node @size bytes, setting
   * bd->size, or FALSE with QEMU's text. A format resizes its child through
   * cbt_blockdev_truncate(). Without it the node cannot be resized. */
  gboolean (*truncate)(CbtBlockdev *bd, guint64 size, GError **error);
  /* Optional: child @c's size changed; set bd->size from it (raw without `size`). */
  void (*child_resized)(CbtBlockdev *bd, CbtBlockdevChild *c);
  /* Optional: one of QEMU's block-layer events (BLKDBG_EVENT) happened on @bd, from the
   * request's thread (blkdebug.c; the events and where they come from are listed in the
   * schema's BlkdebugEvent). */
  void (*debug_event)(CbtBlockdev *bd, CbtQmpBlkdebugEvent event);
};

extern const CbtBlockdevDriver cbt_blockdev_file_driver;
extern const CbtBlockdevDriver cbt_blockdev_host_device_driver;
extern const CbtBlockdevDriver cbt_blockdev_raw_driver;
extern const CbtBlockdevDriver cbt_blockdev_null_driver;
extern const CbtBlockdevDriver cbt_blockdev_null_aio_driver;
extern const CbtBlockdevDriver cbt_blockdev_cbw_driver;
extern const CbtBlockdevDriver cbt_blockdev_snapshot_access_driver;
extern const CbtBlockdevDriver cbt_blockdev_blkdebug_driver;

/* Raise @event on @bd (NULL: nothing) for a driver that waits for such events (blkdebug);
 * where QEMU's drivers call BLKDBG_EVENT(child, event), cbtd's call this on the child node. */
static inline void
cbt_blockdev_debug_event(CbtBlockdev *bd, CbtQmpBlkdebugEvent event)
{
  if (bd && bd->drv->debug_event)
    bd->drv->debug_event(bd, event);
}

/* Registry (blockdev.c). */
CbtBlockdev *cbt_blockdev_new(const CbtBlockdevDriver *drv);
/* Publish a fully opened node (it becomes visible to find and query). */
void cbt_blockdev_register(CbtBlockdev *bd);
/* Every published node, newest first (borrowed; main thread). */
GList *cbt_blockdev_list(void);
/* Run the notifiers of @event for @bd. */
void cbt_blockdev_notify(CbtBlockdev *bd, CbtBlockdevEvent event, gpointer data);

/* The graph (graph.c). attach takes a reference on @child; detach drops it. Both on the main
 * thread, refreshing drain counts and limits (permissions are the caller's to refresh). */
CbtBlockdevChild *cbt_blockdev_attach_child(CbtBlockdev *parent, CbtBlockdev *child,
                                            const char *name, guint role);
void cbt_blockdev_detach_child(CbtBlockdevChild *c);
/* Recompute the cumulative permissions of @bd and of every node below it, and apply them to
 * the media. FALSE with @error when a medium refuses (another process holds a lock): the
 * caller undoes the change that asked for them and refreshes again. */
gboolean cbt_blockdev_refresh_perms(CbtBlockdev *bd, GError **error);
void cbt_blockdev_refresh_limits(CbtBlockdev *bd);
/* FALSE with "Block node is read-only" when @bd or a node below it is read-only. */
gboolean cbt_blockdev_check_writable(CbtBlockdev *bd, GError **error);
/* The node's primary child, or NULL. */
CbtBlockdev *cbt_blockdev_primary_child(CbtBlockdev *bd);

/* The frozen view of a snapshot-style filter @bd (its driver's snapshot_* operations), for the
 * node that reads it; -ENOTSUP when @bd has none. Between io_begin and io_end on the reader. */
/* copy-before-write.c: bound what @cbw copies to its target (0: unbounded; past it a copy
 * fails with ENOSPC) and be told, once, when its snapshot breaks. */
void cbt_blockdev_cbw_set_limit(CbtBlockdev *cbw, guint64 max_bytes,
                                CbtBlockdevSnapshotBrokenFunc fn, gpointer data);
/* copy-before-write.c, for a backup's filter (backup-filter.c): write the zero runs of the
 * source to the target (it is a real image); copy only the clusters @bm selects (before any
 * write); the next cluster still to copy at or after @offset (-1: none); claim and copy the
 * first run of those in [offset, offset + max) as a writer would (1: none there; else 0 or the
 * copy's -errno, @is_read telling which side failed; *stop: the end of the run); wait until no
 * copy is in flight; a copy of the clusters still to copy; bytes copied so far. */
void cbt_blockdev_cbw_set_zero_target(CbtBlockdev *cbw);
/* TRUE when @bd is a backup's filter (a copy-before-write node with set_zero_target). */
gboolean cbt_blockdev_cbw_is_backup(CbtBlockdev *bd);
void cbt_blockdev_cbw_select(CbtBlockdev *cbw, const CbtBitmap *bm);
gint64 cbt_blockdev_cbw_next_needed(CbtBlockdev *cbw, guint64 offset);
int cbt_blockdev_cbw_copy_needed(CbtBlockdev *cbw, guint64 offset, guint64 max, guint64 *stop,
                                 gboolean *is_read);
void cbt_blockdev_cbw_settle(CbtBlockdev *cbw);
CbtBitmap *cbt_blockdev_cbw_copy_need(CbtBlockdev *cbw);
guint64 cbt_blockdev_cbw_progress(CbtBlockdev *cbw);
int cbt_blockdev_snapshot_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len);
int cbt_blockdev_snapshot_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                                       guint32 *status);
int cbt_blockdev_snapshot_discard(CbtBlockdev *bd, guint64 offset, guint64 len);

/* The members of a file, host_device or host_cdrom node's options, else NULL (file.c). */
const CbtQmpBlockdevOptionsFile *cbt_blockdev_file_options(const CbtQmpBlockdevOptions *opts);

/* Where a raw node's window starts in its child (raw.c). */
guint64 cbt_blockdev_raw_offset(CbtBlockdev *bd);
/* After blockdev-reopen gave a raw node another `file` child: its file name follows (raw.c). */
void cbt_blockdev_raw_file_changed(CbtBlockdev *bd);

/* Opening from BlockdevOptions (open.c). */
CbtBlockdev *cbt_blockdev_open(const CbtQmpBlockdevOptions *opts, GError **error);
/* For a driver's open with a child beyond `file` (copy-before-write's target): open @ref (or
 * look it up) as @parent's child @name, inheriting @parent's common options, attach it with the
 * role of the driver's table and record its options in @parent's under @name. */
CbtBlockdevChild *cbt_blockdev_open_child(CbtBlockdev *parent, const CbtQmpBlockdevRef *ref,
                                          const char *name, GError **error);

/* For nodes cbtd builds itself (snapshot.c): open @opts as a node with a generated name that
 * the monitor does not own, so only the caller's reference keeps it (open.c). */
CbtBlockdev *cbt_blockdev_open_internal(const CbtQmpBlockdevOptions *opts, GError **error);
/* Make @file the `file` child of raw node @bd, which the caller drains, and refresh the
 * permissions; on a refusal the old child is back and FALSE is returned (reopen.c). */
gboolean cbt_blockdev_swap_file(CbtBlockdev *bd, CbtBlockdev *file, GError **error);

/* Resize @bd to @size bytes with QEMU's checks and texts, then raise RESIZED on it and on every
 * parent that follows its size (resize.c). The caller holds the resize permission and the
 * nodes drained. */
gboolean cbt_blockdev_truncate(CbtBlockdev *bd, guint64 size, GError **error);
/* @bd's size changed from @old_size: RESIZED for it, then for the parents that follow it. */
void cbt_blockdev_resized(CbtBlockdev *bd, guint64 old_size);

/* The write path's accounting (stats.c): @bd's threshold and highest offset for a write of
 * [offset, offset + len) that reached it. One relaxed load each when nothing changes. */
void cbt_blockdev_threshold_crossed(CbtBlockdev *bd, guint64 threshold, guint64 end);
static inline void
cbt_blockdev_account_write(CbtBlockdev *bd, guint64 offset, guint64 len, gboolean data)
{
  guint64 end = offset + len;
  guint64 t = __atomic_load_n(&bd->write_threshold, __ATOMIC_RELAXED);

  if (G_UNLIKELY(t != 0) && t < end)
    cbt_blockdev_threshold_crossed(bd, t, end);
  if (!data)
    return;
  guint64 cur = __atomic_load_n(&bd->wr_highest, __ATOMIC_RELAXED);
  while (cur < end && !__atomic_compare_exchange_n(&bd->wr_highest, &cur, end, TRUE,
                                                   __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
}

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
gboolean cbt_blockdev_lock_set(CbtBlockdevLock *lock, guint64 perm, guint64 shared, GError **error);
