/* blockdev/dirty-bitmap-cmds.h — named dirty bitmaps of block nodes: the block-dirty-bitmap-*
 * commands, `transaction`, the `dirty-bitmaps` member of query-named-block-nodes, and the
 * resolution of an NBD export's `bitmaps` list.
 *
 * Main thread only. blockdev/ must not depend on nbd/, so the NBD hooks are plain functions
 * here with the signatures of nbd.h's CbtNbdBitmapLookup / CbtNbdBitmapRelease; the daemon
 * passes them to cbt_nbd_set_bitmap_hooks().
 */
#pragma once

#include <glib.h>

#include "bitmap/bitmap.h"
#include "blockdev/blockdev.h"
#include "rpc/rpc.h"

G_BEGIN_DECLS

/* Register the bitmap commands and `transaction`, and install the blockdev hooks (node_info,
 * node_closing) that list and drop a node's bitmaps. */
void cbt_blockdev_register_bitmap_commands(CbtRpc *rpc);

/* CbtNbdBitmapLookup: find bitmap @name on @node (@node_name NULL: the export's node, plain-name
 * form; else the node the {node, name} form named), check it may be exported in qsd's words,
 * then mark it busy and take a user on @node (so the node cannot be deleted under the export).
 * The returned bits stay valid until cbt_blockdev_dirty_bitmap_export_release(). */
CbtBitmap *cbt_blockdev_dirty_bitmap_export_lookup(CbtBlockdev *node, const char *node_name,
                                                   const char *name, gboolean readonly_export,
                                                   GError **error);
/* CbtNbdBitmapRelease: undo one successful lookup of @bm. */
void cbt_blockdev_dirty_bitmap_export_release(CbtBitmap *bm);

G_END_DECLS
