/* blockdev/ — block nodes: backends (file, host_device, raw, null-co, blkdebug), the I/O path
 * by bytes, drain, allocation status, image locking and the blockdev-* commands.
 *
 * A node is addressed by its node-name (QEMU's rules). A format node (raw) has one child node; I/O
 * on a node marks that node's recording dirty bitmaps, then passes down to its child, whose own
 * bitmaps are marked in turn, so a bitmap on a protocol node sees the writes of the format node
 * above it, as in QEMU.
 *
 * Threads: the registry and the commands run on the main thread. The I/O calls are thread-safe
 * and may be called from any thread between cbt_blockdev_io_begin() and cbt_blockdev_io_end();
 * cbt_blockdev_drain_begin() (main thread) waits until no request is in flight and admits no new
 * one until cbt_blockdev_drain_end().
 */
#pragma once

#include <glib.h>
#include <stdint.h>
#include "bitmap/bitmap.h"
#include "rpc/rpc.h"
#include "schemas/qmp-types.h"

G_BEGIN_DECLS

typedef struct CbtBlockdev CbtBlockdev;

/* Error texts are QEMU's; every blockdev error is a QMP GenericError. */
#define CBT_BLOCKDEV_ERROR (cbt_blockdev_error_quark())
GQuark cbt_blockdev_error_quark(void);

/* I/O request flags. */
#define CBT_BLOCKDEV_FUA (1u << 0)         /* durable before returning */
#define CBT_BLOCKDEV_MAY_UNMAP (1u << 1)   /* write_zeroes may deallocate */
#define CBT_BLOCKDEV_NO_FALLBACK (1u << 2) /* write_zeroes: -ENOTSUP unless it is cheap */

/* Block status bits, as NBD base:allocation defines them. */
#define CBT_BLOCKDEV_STATUS_HOLE (1u << 0) /* not allocated */
#define CBT_BLOCKDEV_STATUS_ZERO (1u << 1) /* reads as zeroes */

/* Close every node (at exit), children after parents. */
void cbt_blockdev_close_all(void);

/* Lookup; the node stays valid while referenced. Main thread only. */
CbtBlockdev *cbt_blockdev_find(const char *node_name);
CbtBlockdev *cbt_blockdev_ref(CbtBlockdev *bd);
void cbt_blockdev_unref(CbtBlockdev *bd);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtBlockdev, cbt_blockdev_unref)

const char *cbt_blockdev_get_node_name(CbtBlockdev *bd);
guint64 cbt_blockdev_get_size(CbtBlockdev *bd);
gboolean cbt_blockdev_is_read_only(CbtBlockdev *bd);
/* TRUE when discard=unmap: only then does a discard reach the medium (and mark bitmaps). */
gboolean cbt_blockdev_can_discard(CbtBlockdev *bd);
/* Smallest I/O size the backend handles without read-modify-write (1 for files). */
guint32 cbt_blockdev_get_min_io(CbtBlockdev *bd);
/* The longest read or write the node takes in one piece (a blkdebug node's max-transfer, and
 * so any node above it), 0 for no limit: what an NBD export advertises as its maximum block
 * size. Longer requests are still served, cut into pieces. */
guint32 cbt_blockdev_get_max_transfer(CbtBlockdev *bd);
/* The node's child (raw's file), or NULL. */
CbtBlockdev *cbt_blockdev_get_child(CbtBlockdev *bd);

/* Users (exports, jobs): a node with users refuses blockdev-del ("Node X is in use"). */
void cbt_blockdev_add_user(CbtBlockdev *bd);
void cbt_blockdev_remove_user(CbtBlockdev *bd);
/* QEMU's hold of a node by a block job: blockdev-del refuses a held node as one that is used
 * in the graph ("Block device X is in use"), and a blocked one first of all ("Node 'X' is busy:
 * REASON", QEMU's op blockers), as a job's target and filter are. Counted; main thread. */
void cbt_blockdev_hold(CbtBlockdev *bd);
void cbt_blockdev_unhold(CbtBlockdev *bd);
void cbt_blockdev_block(CbtBlockdev *bd, const char *reason);
void cbt_blockdev_unblock(CbtBlockdev *bd);
/* FALSE with "Node 'X' is busy: REASON" when @bd is blocked. */
gboolean cbt_blockdev_check_unblocked(CbtBlockdev *bd, GError **error);

/* Write permission, taken by writable exports: fails on read-only nodes and when another
 * process holds the image lock (QEMU's lock bytes, so cbtd and QEMU exclude each other). */
gboolean cbt_blockdev_acquire_write(CbtBlockdev *bd, GError **error);
void cbt_blockdev_release_write(CbtBlockdev *bd);

/* The I/O path. Each call returns 0 or a negative errno. */
void cbt_blockdev_io_begin(CbtBlockdev *bd);
void cbt_blockdev_io_end(CbtBlockdev *bd);
/* Whether a write entering at @bd may wait for other I/O before it is carried out (a
 * copy-before-write filter on its path copies the old data first), so that a thread which must
 * stay responsive hands it to another. Between io_begin and io_end. */
gboolean cbt_blockdev_writes_may_wait(CbtBlockdev *bd);
int cbt_blockdev_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len);
int cbt_blockdev_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags);
int cbt_blockdev_flush(CbtBlockdev *bd);
int cbt_blockdev_discard(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags);
int cbt_blockdev_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags);
/* Status of [offset, offset + *pnum) where *pnum <= len is set to the length of the run that
 * starts at @offset and has status *status (CBT_BLOCKDEV_STATUS_*). Never returns *pnum == 0. */
int cbt_blockdev_block_status(CbtBlockdev *bd, guint64 offset, guint64 len, guint64 *pnum,
                              guint32 *status);
/* One run of a status walk: [offset, offset + len) has @status. Return FALSE to stop the walk. */
typedef gboolean (*CbtBlockdevStatusFunc)(guint64 offset, guint64 len, guint32 status,
                                          gpointer user_data);
/* The status of [offset, offset + len) as consecutive runs, in order, from @offset on: @fn sees
 * every byte once until it returns FALSE. Neighbouring runs may have equal status. Cheaper than
 * calling cbt_blockdev_block_status run by run where the backend can map many runs at once (a
 * file's extents). Returns 0 (covered or stopped) or a negative errno, after which the runs
 * already reported stand. */
int cbt_blockdev_block_status_walk(CbtBlockdev *bd, guint64 offset, guint64 len,
                                   CbtBlockdevStatusFunc fn, gpointer user_data);
/* For zero-copy reads: the fd and the byte offset within it that holds @bd's offset 0, or -1
 * when the data does not live in one file (null-co). */
int cbt_blockdev_get_data_fd(CbtBlockdev *bd, guint64 *fd_offset);

/* Dirty tracking: every write, write_zeroes and carried-out discard on @bd marks each tracked
 * bitmap (cbt_bitmap_mark_range) before the backend call, failed requests included. Call with
 * @bd drained; the bitmap must outlive its tracking. */
void cbt_blockdev_track_bitmap(CbtBlockdev *bd, CbtBitmap *bm);
void cbt_blockdev_untrack_bitmap(CbtBlockdev *bd, CbtBitmap *bm);

/* Write observers: @mark sees every range a write, write_zeroes or carried-out discard on @bd
 * covers, right after the tracked bitmaps and before the backend call (so before the data can
 * reach the medium), failed requests included. It runs on the request's thread, between
 * io_begin and io_end, and must not block for long: a persistent bitmap store
 * (dirty-bitmaps/persist.c) is the user. Main thread; the node is drained inside, as for
 * cbt_blockdev_track_bitmap. Removing an observer that is not there does nothing. */
typedef void (*CbtBlockdevWriteFunc)(gpointer opaque, guint64 offset, guint64 len);
void cbt_blockdev_add_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark, gpointer opaque);
void cbt_blockdev_remove_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark,
                                        gpointer opaque);

/* Where a file or host_device node keeps persistent bitmaps: its image and the bitmap-* options
 * (schemas/block-core.json). Borrowed strings, valid while the node is. */
typedef struct {
  const char *node_name;    /* the file or host_device node's */
  const char *filename;     /* the image's path */
  int fd;                   /* the image's descriptor (for fstat: the device identity) */
  gboolean is_device;       /* a block or character device, not a regular file */
  const char *store;        /* bitmap-store, or NULL for the default place */
  guint32 sync_interval_ms; /* bitmap-sync-interval */
  guint64 region_size;      /* bitmap-intent-region */
  gboolean via_format;      /* asked of a raw node: the rest describes the file node below */
  guint64 offset;           /* where the asked node's byte 0 lies in the image (raw's window) */
} CbtBlockdevStoreInfo;
/* For a file or host_device node, or a raw node above one (its file child's, with the window's
 * offset); FALSE (and @info untouched) for any other node. */
gboolean cbt_blockdev_get_store_info(CbtBlockdev *bd, CbtBlockdevStoreInfo *info);
/* The driver's name ("file", "raw", "null-co", ...). */
const char *cbt_blockdev_get_driver_name(CbtBlockdev *bd);

/* Node events: notifier lists any module can join, main thread only. A notifier runs for every
 * node, in the order the notifiers were added.
 *   OPENED   a node was opened and is now visible to lookups (@data NULL)
 *   CLOSING  a node is about to close, drained, and will not be visible again (@data NULL):
 *            whatever a module keeps for it goes now
 *   RESIZED  a node's size changed (block_resize), drained (@data: the old size, a guint64 *):
 *            bitmaps follow the new size
 *   QUERY    query-named-block-nodes is describing the node (@data: its CbtQmpBlockDeviceInfo
 *            *): a module fills the members it owns (dirty-bitmaps) */
typedef enum {
  CBT_BLOCKDEV_EVENT_OPENED,
  CBT_BLOCKDEV_EVENT_CLOSING,
  CBT_BLOCKDEV_EVENT_RESIZED,
  CBT_BLOCKDEV_EVENT_QUERY,
  CBT_BLOCKDEV_EVENT__MAX,
} CbtBlockdevEvent;
typedef void (*CbtBlockdevNotifyFunc)(CbtBlockdev *bd, gpointer data, gpointer user_data);
void cbt_blockdev_notifier_add(CbtBlockdevEvent event, CbtBlockdevNotifyFunc fn,
                               gpointer user_data);
void cbt_blockdev_notifier_remove(CbtBlockdevEvent event, CbtBlockdevNotifyFunc fn,
                                  gpointer user_data);

/* copy-before-write's `bitmap` option: a copy (transfer full) of the bits of dirty bitmap @name
 * on node @node, or NULL with QEMU's lookup errors ("Node 'X' not found", "Dirty bitmap 'X' not
 * found"). Named bitmaps live in a module above this one, so it installs the function (the
 * daemon wires dirty-bitmaps/ in). Main thread. */
typedef CbtBitmap *(*CbtBlockdevBitmapCopyFunc)(const char *node, const char *name, GError **error);
void cbt_blockdev_set_bitmap_copy(CbtBlockdevBitmapCopyFunc fn);

/* A point-in-time view of a raw node over a file node (snapshot.c; docs/user-guide.md,
 * "Fleecing"): taken atomically, in one drained section of @bd, while @bd stays writable. The
 * scratch is a sparse unlinked file in @scratch_dir (NULL: $TMPDIR). A failure undoes every step
 * before it. Main thread. */
typedef struct CbtBlockdevSnapshot CbtBlockdevSnapshot;
/* Runs as the last step of the drained section, so what it does (copy bitmaps, start one) is
 * at the instant of the view; on FALSE everything is undone (it must leave nothing behind). */
typedef gboolean (*CbtBlockdevSnapshotFunc)(CbtBlockdev *bd, gpointer opaque, GError **error);
CbtBlockdevSnapshot *cbt_blockdev_snapshot_new(CbtBlockdev *bd, const char *scratch_dir,
                                               CbtBlockdevSnapshotFunc at_instant, gpointer opaque,
                                               GError **error);
/* The view broke (a copy to the scratch failed): called once, from the writer's thread. */
typedef void (*CbtBlockdevSnapshotBrokenFunc)(int err, gpointer data);
/* Bound the old data the scratch takes to @max_bytes (0: unbounded) and be told when the view
 * breaks. Main thread, right after cbt_blockdev_snapshot_new(). */
void cbt_blockdev_snapshot_set_limit(CbtBlockdevSnapshot *snap, guint64 max_bytes,
                                     CbtBlockdevSnapshotBrokenFunc fn, gpointer data);
/* The node that reads the view (a snapshot-access node), and the node it is a view of. */
CbtBlockdev *cbt_blockdev_snapshot_get_view(CbtBlockdevSnapshot *snap);
CbtBlockdev *cbt_blockdev_snapshot_get_source(CbtBlockdevSnapshot *snap);
/* Undo it all, newest first: @bd back on its file child, the nodes built for it gone. */
void cbt_blockdev_snapshot_free(CbtBlockdevSnapshot *snap);

/* I/O statistics (query-blockstats): counted by the server where a request enters the graph,
 * on the node and on the export's own block, with relaxed atomics and no lock. Times are
 * CLOCK_MONOTONIC nanoseconds (cbt_blockdev_now_ns). */
typedef enum {
  CBT_BLOCKDEV_ACCT_READ,
  CBT_BLOCKDEV_ACCT_WRITE,
  CBT_BLOCKDEV_ACCT_FLUSH,
  CBT_BLOCKDEV_ACCT_UNMAP,
  CBT_BLOCKDEV_ACCT__MAX,
} CbtBlockdevAcct;
typedef struct {
  guint64 bytes[CBT_BLOCKDEV_ACCT__MAX];
  guint64 ops[CBT_BLOCKDEV_ACCT__MAX];
  guint64 total_ns[CBT_BLOCKDEV_ACCT__MAX];
  guint64 failed[CBT_BLOCKDEV_ACCT__MAX];
  guint64 invalid[CBT_BLOCKDEV_ACCT__MAX];
  gint64 last_access_ns; /* 0 before the first counted request */
} CbtBlockdevStats;
gint64 cbt_blockdev_now_ns(void);
/* A request of @kind over @bytes that started at @start_ns ended now (@now_ns), failed or not. */
void cbt_blockdev_stats_done(CbtBlockdevStats *s, CbtBlockdevAcct kind, guint64 bytes,
                             gint64 start_ns, gint64 now_ns, gboolean failed);
/* A request of @kind the server refused before it reached the node. */
void cbt_blockdev_stats_invalid(CbtBlockdevStats *s, CbtBlockdevAcct kind);
/* The node's own block (requests that entered the graph at @bd). */
CbtBlockdevStats *cbt_blockdev_get_stats(CbtBlockdev *bd);
/* An export's block, listed under its node by query-blockstats (`exports`) until removed. Main
 * thread; the block stays valid until cbt_blockdev_remove_export_stats(). */
typedef struct CbtBlockdevExportStats CbtBlockdevExportStats;
CbtBlockdevExportStats *cbt_blockdev_add_export_stats(CbtBlockdev *bd, const char *id);
CbtBlockdevStats *cbt_blockdev_export_stats_get(CbtBlockdevExportStats *es);
void cbt_blockdev_remove_export_stats(CbtBlockdev *bd, CbtBlockdevExportStats *es);
/* A push-mode backup's copy-before-write filter (backup-filter.c; QEMU's blockdev-backup): put
 * over @source with @target as its target, so the target receives the source's old data before
 * any write changes it. Call with @source drained: that is the backup's instant. A raw node over
 * its whole file child gets the filter between itself and the file (its users write through
 * it); any other node gets it on top and must have no other writer. @select (may be NULL: all)
 * says which clusters the backup copies; @node_name NULL gives a generated name. Main thread. */
typedef struct CbtBlockdevBackupFilter CbtBlockdevBackupFilter;
CbtBlockdevBackupFilter *cbt_blockdev_backup_filter_new(CbtBlockdev *source, CbtBlockdev *target,
                                                        const char *node_name,
                                                        const CbtBitmap *select, GError **error);
CbtBlockdev *cbt_blockdev_backup_filter_node(CbtBlockdevBackupFilter *f);
/* Bytes selected, and bytes of them copied so far (by the job or before a write). Any thread. */
guint64 cbt_blockdev_backup_filter_total(CbtBlockdevBackupFilter *f);
guint64 cbt_blockdev_backup_filter_progress(CbtBlockdevBackupFilter *f);
/* The job's side, from its own thread: the next cluster still to copy at or after @offset (-1:
 * none); copy the first run of such clusters in [offset, offset + max) (1: none there, 0: copied
 * up to *stop, or a -errno with @is_read telling whether the source's read failed; the clusters
 * of a failed copy stay to copy); wait until no copy is in flight. */
gint64 cbt_blockdev_backup_filter_next(CbtBlockdevBackupFilter *f, guint64 offset);
int cbt_blockdev_backup_filter_copy(CbtBlockdevBackupFilter *f, guint64 offset, guint64 max,
                                    guint64 *stop, gboolean *is_read);
void cbt_blockdev_backup_filter_settle(CbtBlockdevBackupFilter *f);
/* The clusters not copied (transfer full; call with the source drained for a stable answer). */
CbtBitmap *cbt_blockdev_backup_filter_remaining(CbtBlockdevBackupFilter *f);
/* Take the filter out again (drains the source itself). Main thread. */
void cbt_blockdev_backup_filter_free(CbtBlockdevBackupFilter *f);

/* Drain: wait for in-flight requests on @bd (and nodes above it), admit none until _end. */
void cbt_blockdev_drain_begin(CbtBlockdev *bd);
void cbt_blockdev_drain_end(CbtBlockdev *bd);

G_END_DECLS
