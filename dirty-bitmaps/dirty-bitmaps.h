/* dirty-bitmaps/ — the named dirty bitmaps of block nodes: the block-dirty-bitmap-* commands and
 * their transaction actions, the `dirty-bitmaps` member of query-named-block-nodes, and the
 * bitmaps an NBD export publishes.
 *
 * The module sits above blockdev/: it keeps its own table of each node's bitmaps, joins the
 * node notifiers (a closing node's bitmaps go with it; a query lists them) and registers its
 * transaction actions, all in cbt_dirty_bitmaps_init().
 *
 * Threads: main thread only. Only the bits (CbtBitmap) are touched elsewhere: marked by the
 * write path, read by NBD's block status.
 */
#pragma once

#include <glib.h>

#include "bitmap/bitmap.h"
#include "bitmap/dirty-bitmap.h"
#include "blockdev/blockdev.h"
#include "schemas/qmp-types.h"

G_BEGIN_DECLS

/* Join blockdev's notifiers and the transaction; once, before any node opens. */
void cbt_dirty_bitmaps_init(void);
/* The daemon's --state-dir (NULL: none), where host devices without a bitmap-store option keep
 * their persistent bitmaps (<dir>/bitmaps/<node-name>.cbt). Before any node opens. */
void cbt_dirty_bitmaps_set_state_dir(const char *dir);

/* An export's `bitmaps` entry: find bitmap @name on @node (@node_name NULL: the export's node,
 * plain-name form; else the node the {node, name} form named), check it may be exported in
 * qemu-storage-daemon's words, then mark it busy and take a user on @node (so the node cannot
 * be deleted under the export). The bits stay valid until cbt_dirty_bitmaps_export_release(). */
CbtBitmap *cbt_dirty_bitmaps_export_lookup(CbtBlockdev *node, const char *node_name,
                                           const char *name, gboolean readonly_export,
                                           GError **error);
/* Undo one successful lookup of @bm. */
void cbt_dirty_bitmaps_export_release(CbtBitmap *bm);
/* A snapshot export's `bitmaps` entry (docs/user-guide.md, "Fleecing"): a copy (transfer full)
 * of the bits of bitmap @name on @node as they are now, with the lookup's checks but the
 * recording one (the copy does not change); @persistent tells whether the bitmap is. Call with
 * @node drained, so no write is half marked. */
CbtBitmap *cbt_dirty_bitmaps_freeze(CbtBlockdev *node, const char *name, gboolean *persistent,
                                    GError **error);
/* copy-before-write's `bitmap` option (cbt_blockdev_set_bitmap_copy(): blockdev/ sits below
 * this module): the bits of bitmap @name of node @node as they are, copied with the node
 * drained so no write is half-marked (transfer full), or NULL with QEMU's error. */
CbtBitmap *cbt_dirty_bitmaps_copy_named(const char *node, const char *name, GError **error);
/* Bitmap @name of @node's identity for NBD readers: "UUID:unbroken" or "UUID:broken"
 * (transfer full), NULL when there is no such bitmap (docs/bitmaps.md, "Identity"). */
char *cbt_dirty_bitmaps_identity_text(CbtBlockdev *node, const char *name);
/* A snapshot export's `checkpoint`: block-dirty-bitmap-add of a recording bitmap @name on
 * @node (its checks and texts, e.g. "Bitmap already exists: X"), with @node drained;
 * @granularity 0 takes block-dirty-bitmap-add's default. */
gboolean cbt_dirty_bitmaps_checkpoint(CbtBlockdev *node, const char *name, guint32 granularity,
                                      gboolean persistent, GError **error);

/* Bitmap @name of @bd (borrowed), or NULL. Main thread. */
CbtDirtyBitmap *cbt_dirty_bitmaps_get(CbtBlockdev *bd, const char *name);
/* A backup job's hold on a bitmap (frozen.c; QEMU's successor): with @bd drained (the job's
 * instant), make @dbm busy, copy its bits as the job's selection and start a successor that
 * records every later write of @bd. The caller has checked @dbm (cbt_dirty_bitmap_check()). */
typedef struct CbtDirtyBitmapsFrozen CbtDirtyBitmapsFrozen;
CbtDirtyBitmapsFrozen *cbt_dirty_bitmaps_freeze_for_job(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* The bits as they were at the instant (borrowed, valid until the end). */
const CbtBitmap *cbt_dirty_bitmaps_frozen_selection(CbtDirtyBitmapsFrozen *f);
/* End the freeze (drains @bd itself): @clear_copied makes the bitmap its successor, plus
 * @not_copied when given (QEMU's abdicate, then merge); otherwise the bitmap is left as if the job
 * had never run (QEMU's reclaim). Frees @f. */
void cbt_dirty_bitmaps_frozen_end(CbtDirtyBitmapsFrozen *f, gboolean clear_copied,
                                  const CbtBitmap *not_copied);

/* QMP BlockDirtyInfo of @dbm (transfer full): name absent when anonymous, inconsistent only
 * when true, count not clipped to the node's size. */
CbtQmpBlockDirtyInfo *cbt_dirty_bitmaps_info(const CbtDirtyBitmap *dbm);

G_END_DECLS
