/* common/txn.c — the transaction engine (see txn.h). */
#include "common/txn.h"

typedef struct {
  const CbtTxnActionOps *ops;
  gpointer opaque;
} Action;

struct CbtTxn {
  gboolean may_abort;
  GArray *actions; /* Action, oldest first */
};

CbtTxn *
cbt_txn_new(gboolean may_abort)
{
  CbtTxn *txn = g_new0(CbtTxn, 1);

  txn->may_abort = may_abort;
  txn->actions = g_array_new(FALSE, FALSE, sizeof(Action));
  return txn;
}

gboolean
cbt_txn_may_abort(const CbtTxn *txn)
{
  return txn->may_abort;
}

void
cbt_txn_add(CbtTxn *txn, const CbtTxnActionOps *ops, gpointer opaque)
{
  Action a = { ops, opaque };

  g_array_append_val(txn->actions, a);
}

static void
clean_and_free(CbtTxn *txn)
{
  for (guint i = txn->actions->len; i-- > 0;) {
    Action *a = &g_array_index(txn->actions, Action, i);
    if (a->ops->clean)
      a->ops->clean(a->opaque);
  }
  g_array_unref(txn->actions);
  g_free(txn);
}

void
cbt_txn_commit(CbtTxn *txn)
{
  for (guint i = 0; i < txn->actions->len; i++) {
    Action *a = &g_array_index(txn->actions, Action, i);
    if (a->ops->commit)
      a->ops->commit(a->opaque);
  }
  clean_and_free(txn);
}

void
cbt_txn_abort(CbtTxn *txn)
{
  for (guint i = txn->actions->len; i-- > 0;) {
    Action *a = &g_array_index(txn->actions, Action, i);
    if (a->ops->abort)
      a->ops->abort(a->opaque);
  }
  clean_and_free(txn);
}

gboolean
cbt_txn_finish(CbtTxn *txn, gboolean ok)
{
  if (ok)
    cbt_txn_commit(txn);
  else
    cbt_txn_abort(txn);
  return ok;
}
