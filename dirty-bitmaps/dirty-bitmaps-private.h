/* dirty-bitmaps/dirty-bitmaps-private.h — the table of named bitmaps per node (table.c), shared
 * with the commands (cmds.c).
 *
 * A recording bitmap is always tracked by its node (cbt_blockdev_track_bitmap) and a
 * non-recording one never is; the functions that change either take the node drained.
 */
#pragma once

#include "common/assert.h"
#include "dirty-bitmaps/dirty-bitmaps.h"

G_BEGIN_DECLS

/* The bitmap called @name on @bd, or NULL. */
CbtDirtyBitmap *cbt_dirty_bitmaps_find(CbtBlockdev *bd, const char *name);
/* QEMU's lookup by node and name: "Node 'X' not found", "Dirty bitmap 'X' not found".
 * @pbd (may be NULL) receives the node. */
CbtDirtyBitmap *cbt_dirty_bitmaps_lookup(const char *node, const char *name, CbtBlockdev **pbd,
                                         GError **error);

/* With @bd drained: add @dbm (transfer full) as @bd's newest bitmap, tracked if recording. */
void cbt_dirty_bitmaps_attach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: take @dbm off @bd (untracked); the caller owns it again. */
void cbt_dirty_bitmaps_detach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: start or stop recording, tracking accordingly. */
void cbt_dirty_bitmaps_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording);

/* table.c: join the node notifiers. cmds.c: register the transaction actions. */
void cbt_dirty_bitmaps_table_init(void);
void cbt_dirty_bitmaps_cmds_init(void);

/* Every error of this module is a GenericError in the bitmap domain. */
#define cbt_dirty_bitmaps_error(error, ...)                                                        \
  g_set_error((error), CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED, __VA_ARGS__)

G_END_DECLS
