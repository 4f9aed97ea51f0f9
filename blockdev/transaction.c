/* transaction.c — the `transaction` command: the actions of the TransactionAction union,
 * prepared in order through the module that registered each kind, kept or undone together
 * (common/txn.h), with every node an action touches drained from its first use to the end.
 *
 * Modules register the kinds they implement (dirty-bitmaps/: the bitmap actions; job/:
 * blockdev-backup); `abort` is
 * this file's own. A kind without a registration is refused, as QEMU refuses an action of a
 * subsystem it was built without.
 */
#include "blockdev/transaction.h"
#include "common/assert.h"
#include "schemas/qmp-commands.h"

static CbtBlockdevTxnPrepare prepares[CBT_QMP_TRANSACTION_ACTION_KIND__MAX];
static CbtTxn *grouped_txn; /* the `transaction` being prepared, when completion-mode is grouped */

void
cbt_blockdev_txn_register(CbtQmpTransactionActionKind kind, CbtBlockdevTxnPrepare prepare)
{
  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(kind < CBT_QMP_TRANSACTION_ACTION_KIND__MAX);
  prepares[kind] = prepare;
}

static void
drain_clean(gpointer opaque)
{
  CbtBlockdev *bd = opaque;

  cbt_blockdev_drain_end(bd);
  cbt_blockdev_unref(bd);
}

static const CbtTxnActionOps drain_ops = { .name = "drain", .clean = drain_clean };

gboolean
cbt_blockdev_txn_is_grouped(CbtTxn *txn)
{
  return txn && txn == grouped_txn;
}

void
cbt_blockdev_drain_in_txn(CbtBlockdev *bd, CbtTxn *txn)
{
  CBT_ASSERT_MAIN_THREAD();
  cbt_blockdev_drain_begin(bd);
  cbt_txn_add(txn, &drain_ops, cbt_blockdev_ref(bd));
}

static gboolean
prepare_one(const CbtQmpTransactionAction *act, gboolean grouped, CbtTxn *txn, GError **error)
{
  const char *kind = cbt_qmp_transaction_action_kind_to_string(act->type);

  if (act->type == CBT_QMP_TRANSACTION_ACTION_KIND_ABORT) {
    g_set_error_literal(error, CBT_BLOCKDEV_ERROR, 0, "Transaction aborted using Abort action");
    return FALSE;
  }
  if (!prepares[act->type]) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Action '%s' is not supported by cbtd", kind);
    return FALSE;
  }
  /* Only a job's action has a group to join (QEMU's action_check_completion_mode). */
  if (grouped && act->type != CBT_QMP_TRANSACTION_ACTION_KIND_BLOCKDEV_BACKUP) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "Action '%s' does not support Transaction "
                "property completion-mode = grouped",
                kind);
    return FALSE;
  }
  return prepares[act->type](act, txn, error);
}

gboolean
cbt_qmp_transaction(const CbtQmpTransactionArg *args, GError **error)
{
  const CbtQmpTransactionProperties *p = args->properties;
  gboolean grouped = p && p->completion_mode == CBT_QMP_ACTION_COMPLETION_MODE_GROUPED;
  CbtTxn *txn = cbt_txn_new(TRUE);
  gboolean ok = TRUE;

  CBT_ASSERT_MAIN_THREAD();
  grouped_txn = grouped ? txn : NULL;
  for (guint i = 0; ok && i < args->actions->len; i++)
    ok = prepare_one(g_ptr_array_index(args->actions, i), grouped, txn, error);
  grouped_txn = NULL;
  return cbt_txn_finish(txn, ok);
}
