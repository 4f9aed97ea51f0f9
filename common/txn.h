/* common/txn.h — transactions: changes that are made at once and either all kept or all undone.
 *
 * A caller prepares each change itself, in order (each sees the earlier ones' effects), and on
 * success records it with cbt_txn_add(): how to keep it (commit), undo it (abort) and release
 * what it held either way (clean). Then cbt_txn_commit() commits every recorded action in the
 * order added, or cbt_txn_abort() undoes them newest first; both run every clean afterwards,
 * newest first, and free the transaction. A prepare that fails must leave nothing to undo.
 *
 * A transaction made with may_abort FALSE (a plain command: one action, committed unless its
 * own prepare fails) lets an action skip keeping what an undo would need: only actions added
 * before that one action's prepare succeeded (a drain, say) can be aborted, and they need no
 * undo data.
 *
 * Threads: one transaction belongs to one thread.
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct CbtTxn CbtTxn;

/* Each may be NULL. @opaque is the one given to cbt_txn_add(). */
typedef struct {
  const char *name; /* for debugging */
  void (*commit)(gpointer opaque);
  void (*abort)(gpointer opaque);
  void (*clean)(gpointer opaque);
} CbtTxnActionOps;

CbtTxn *cbt_txn_new(gboolean may_abort);
gboolean cbt_txn_may_abort(const CbtTxn *txn);
void cbt_txn_add(CbtTxn *txn, const CbtTxnActionOps *ops, gpointer opaque);
void cbt_txn_commit(CbtTxn *txn);
void cbt_txn_abort(CbtTxn *txn);
/* Commit when @ok, else abort; returns @ok. */
gboolean cbt_txn_finish(CbtTxn *txn, gboolean ok);

G_END_DECLS
