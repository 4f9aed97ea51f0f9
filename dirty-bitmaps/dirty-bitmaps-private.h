/* dirty-bitmaps/dirty-bitmaps-private.h — the table of named bitmaps per node (table.c), shared
 * with the commands (cmds.c).
 *
 * A recording bitmap that is not persistent is always tracked by its node
 * (cbt_blockdev_track_bitmap) and a non-recording one never is; a persistent bitmap is never
 * tracked: its store marks it through the node's write observer (persist.c). The functions that
 * change either take the node drained. The table never calls a store: the commands call
 * persist.c's durable steps themselves, so that a failing store write fails the command.
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

/* @bd's bitmaps, oldest first (borrowed), or NULL when it has none. */
GPtrArray *cbt_dirty_bitmaps_list(CbtBlockdev *bd);

/* With @bd drained: add @dbm (transfer full) as @bd's newest bitmap, tracked if recording. */
void cbt_dirty_bitmaps_attach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: take @dbm off @bd (untracked); the caller owns it again. */
void cbt_dirty_bitmaps_detach(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
/* With @bd drained: start or stop recording, tracking accordingly. */
void cbt_dirty_bitmaps_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm, gboolean recording);

/* table.c: join the node notifiers. cmds.c: register the transaction actions. persist.c: join
 * OPENED (loading stores). */
void cbt_dirty_bitmaps_table_init(void);
void cbt_dirty_bitmaps_cmds_init(void);
void cbt_dirty_bitmaps_persist_init(void);

/* persist.c: the bitmap stores of nodes (docs/bitmaps.md, "Persistence").
 * check: may @bd keep persistent bitmaps? FALSE with QEMU's refusal for nodes without a store
 *   ("Can't store persistent bitmaps to NODE: Operation not supported") or the reason its store
 *   cannot be used.
 * add, remove, set_recording, rewrite: with @bd drained, the durable step for the persistent
 *   bitmap @dbm (attached to @bd), done when TRUE; on FALSE memory is unchanged (add creates
 *   the store on the first persistent bitmap; set_recording also sets @dbm's flag).
 * untie: @dbm is out of its store: make it an ordinary, tracked bitmap.
 * demote: a store call failed (@why) after memory was put back: take @dbm out of the store
 *   and untie it (TRUE), or, when the store cannot drop it, make it inconsistent (FALSE).
 * refresh: the set of @bd's persistent recording bitmaps changed: (un)install the observer.
 * node_closing: close @bd's store, before the table frees the bits it borrows.
 * fill_info / forget: the recovery members of BlockDirtyInfo, kept per bitmap. */
gboolean cbt_dirty_bitmaps_persist_check(CbtBlockdev *bd, GError **error);
gboolean cbt_dirty_bitmaps_persist_add(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error);
gboolean cbt_dirty_bitmaps_persist_remove(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error);
gboolean cbt_dirty_bitmaps_persist_set_recording(CbtBlockdev *bd, CbtDirtyBitmap *dbm,
                                                 gboolean recording, GError **error);
gboolean cbt_dirty_bitmaps_persist_rewrite(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error);
/* The store records @dbm's break code as it is now (0 too: an undo). */
gboolean cbt_dirty_bitmaps_persist_set_break(CbtBlockdev *bd, CbtDirtyBitmap *dbm, GError **error);
void cbt_dirty_bitmaps_persist_untie(CbtBlockdev *bd, CbtDirtyBitmap *dbm);
gboolean cbt_dirty_bitmaps_persist_demote(CbtBlockdev *bd, CbtDirtyBitmap *dbm, const GError *why);
void cbt_dirty_bitmaps_persist_refresh(CbtBlockdev *bd);
void cbt_dirty_bitmaps_persist_node_closing(CbtBlockdev *bd);
/* The node was resized (drained) and its bitmaps hold new bits: the store takes them and the
 * new size, durably; a persistent bitmap the store cannot take is demoted. */
void cbt_dirty_bitmaps_persist_resized(CbtBlockdev *bd);
void cbt_dirty_bitmaps_persist_fill_info(const CbtDirtyBitmap *dbm, CbtQmpBlockDirtyInfo *info);
void cbt_dirty_bitmaps_persist_forget(CbtDirtyBitmap *dbm);

/* Every error of this module is a GenericError in the bitmap domain. */
#define cbt_dirty_bitmaps_error(error, ...)                                                        \
  g_set_error((error), CBT_BITMAP_ERROR, CBT_BITMAP_ERROR_FAILED, __VA_ARGS__)

G_END_DECLS
