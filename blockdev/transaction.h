/* blockdev/transaction.h — the `transaction` command's actions (transaction.c).
 *
 * A module implements a kind of TransactionAction with a prepare function registered here: it
 * checks everything first (a failing prepare changes nothing), makes the change, drains every
 * node it touches with cbt_blockdev_drain_in_txn() and records its commit/abort/clean with
 * cbt_txn_add(). A module's plain commands (block-dirty-bitmap-add, ...) run the same prepare
 * in a one-action transaction made with may_abort FALSE, so it need keep no undo.
 *
 * Threads: main thread only.
 */
#pragma once

#include "blockdev/blockdev.h"
#include "common/txn.h"
#include "schemas/qmp-types.h"

G_BEGIN_DECLS

typedef gboolean (*CbtBlockdevTxnPrepare)(const CbtQmpTransactionAction *action, CbtTxn *txn,
                                          GError **error);

void cbt_blockdev_txn_register(CbtQmpTransactionActionKind kind, CbtBlockdevTxnPrepare prepare);
/* TRUE while the actions of a `transaction` with completion-mode grouped are prepared: a job's
 * action joins the group of that transaction's jobs. */
gboolean cbt_blockdev_txn_is_grouped(CbtTxn *txn);
/* Drain @bd until @txn ends (a clean action). */
void cbt_blockdev_drain_in_txn(CbtBlockdev *bd, CbtTxn *txn);

G_END_DECLS
