/* blockdev/dirty-bitmap-cmds-private.h — the registry of named bitmaps per node, shared by the
 * commands (dirty-bitmap-cmds.c) and the registry itself with its hooks (dirty-bitmap-table.c).
 *
 * A recording bitmap is always tracked by its node (cbt_blockdev_track_bitmap) and a
 * non-recording one never is; the functions that change either take the node drained.
 */
#pragma once

#include "bitmap/dirty-bitmap.h"
#include "blockdev/dirty-bitmap-cmds.h"

G_BEGIN_DECLS

/* The bitmap called @name on @bd, or NULL. */
CbtDirtyBitmap *cbt_blockdev_bitmap_find(CbtBlockdev *bd, const char *name);
/* QEMU's lookup by node and name: "Node 'X' not found", "Dirty bitmap 'X' not found".
 * @pbd (may be NULL) receives the node. */
CbtDirtyBitmap *cbt_blockdev_bitmap_lookup(const char *node, const char *name, CbtBlockdev **pbd,
                                           GError **error);

/* With @bd drained: add @dbm (transfer full) as @bd's newest bitmap, tracked if recording. */
void cbt_blockdev_bitmap_attach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: take @dbm off @bd (untracked); the caller owns it again. */
void cbt_blockdev_bitmap_detach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: start or stop recording, tracking accordingly. */
void cbt_blockdev_bitmap_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording);

/* Install the blockdev hooks (query member, node closing). */
void cbt_blockdev_bitmap_install_hooks(void);

/* Every error of this layer is a GenericError in the bitmap domain. */
#define cbt_blockdev_bitmap_error(error, ...) \
  g_set_error((error), CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED, __VA_ARGS__)

G_END_DECLS
