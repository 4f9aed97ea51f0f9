/* graph.c — the block graph: nodes joined by named child edges; drain and I/O admission, and
 * permissions, over it.
 *
 * Admission is a Dekker-style handshake without a lock on the fast path. A request enters the
 * graph at one node (an export's, a job's) and is counted there only; it then looks at that
 * node's `draining`, which counts the drains in effect on the node or on any node below it. A
 * drain of node X raises `draining` on X and on every node above X (each once, however many
 * paths lead there), then waits until nothing is in flight on any of them. Both sides use
 * sequentially consistent atomics, so at least one of them sees the other; the walk over the
 * graph happens on the drain's side, on the main thread, never on the request's. Only a
 * request that meets a drain, and a drain that must wait, touch the mutex and condition.
 *
 * Invariants (main thread; checked by tests/blockdev):
 *  (1) node->draining == the sum of drains_own over the node and every distinct node below it;
 *  (2) an edge is in exactly its parent's `children` and its node's `parents`;
 *  (3) a node's `perm`/`shared` are what its users and the edges above it need and share, as of
 *      the last cbt_blockdev_refresh_perms() that reached it; a refresh that finds one holder
 *      (the users, or an edge) needing what another does not share fails with QEMU's
 *      "Permission conflict" text, and its caller undoes the change.
 * The graph changes only on the main thread, and where requests could be in flight only with the
 * nodes concerned drained, so the I/O path may follow a node's `file` edge without a lock.
 */
#include "blockdev/blockdev-internal.h"

#include <errno.h>

static GMutex admit_lock;
static GCond admit_cond;

/* ---- walks (main thread) ------------------------------------------------------------------ */

/* @bd and every node above it (TRUE) or below it (FALSE), each once, into @set. */
static void
collect(CbtBlockdev *bd, gboolean up, GHashTable *set)
{
  if (!g_hash_table_add(set, bd))
    return;
  GPtrArray *edges = up ? bd->parents : bd->children;
  for (guint i = 0; edges && i < edges->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(edges, i);
    collect(up ? c->parent : c->node, up, set);
  }
}

static GHashTable *
reach(CbtBlockdev *bd, gboolean up)
{
  GHashTable *set = g_hash_table_new(NULL, NULL);

  collect(bd, up, set);
  return set;
}

/* Invariant (1) for @bd, from scratch. */
static gint
count_drains(CbtBlockdev *bd)
{
  g_autoptr(GHashTable) below = reach(bd, FALSE);
  GHashTableIter it;
  gpointer n;
  gint sum = 0;

  g_hash_table_iter_init(&it, below);
  while (g_hash_table_iter_next(&it, &n, NULL))
    sum += ((CbtBlockdev *)n)->drains_own;
  return sum;
}

/* After an edge below @bd came or went: every node above it counts again. */
static void
recount_above(CbtBlockdev *bd)
{
  g_autoptr(GHashTable) above = reach(bd, TRUE);
  GHashTableIter it;
  gpointer n;

  g_hash_table_iter_init(&it, above);
  while (g_hash_table_iter_next(&it, &n, NULL))
    g_atomic_int_set(&((CbtBlockdev *)n)->draining, count_drains(n));
}

/* ---- edges -------------------------------------------------------------------------------- */

CbtBlockdevChild *
cbt_blockdev_attach_child(CbtBlockdev *parent, CbtBlockdev *child, const char *name, guint role)
{
  CbtBlockdevChild *c = g_new0(CbtBlockdevChild, 1);

  CBT_ASSERT_MAIN_THREAD();
  c->parent = parent;
  c->node = cbt_blockdev_ref(child);
  c->name = g_strdup(name);
  c->role = role;
  c->shared = CBT_PERM_ALL;
  g_ptr_array_add(parent->children, c);
  g_ptr_array_add(child->parents, c);
  if (g_str_equal(name, "file"))
    parent->file = c;
  recount_above(parent);
  cbt_blockdev_refresh_limits(parent);
  return c;
}

void
cbt_blockdev_detach_child(CbtBlockdevChild *c)
{
  CbtBlockdev *parent = c->parent, *child = c->node;

  CBT_ASSERT_MAIN_THREAD();
  g_ptr_array_remove(parent->children, c);
  g_ptr_array_remove(child->parents, c);
  if (parent->file == c)
    parent->file = NULL;
  recount_above(parent);
  g_free(c->name);
  g_free(c);
  cbt_blockdev_refresh_perms(child, NULL);
  cbt_blockdev_unref(child);
}

CbtBlockdev *
cbt_blockdev_primary_child(CbtBlockdev *bd)
{
  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    if (c->role & CBT_BLOCKDEV_CHILD_PRIMARY)
      return c->node;
  }
  return NULL;
}

CbtBlockdev *
cbt_blockdev_get_child(CbtBlockdev *bd)
{
  return cbt_blockdev_primary_child(bd);
}

void
cbt_blockdev_refresh_limits(CbtBlockdev *bd)
{
  if (bd->drv->refresh_limits) {
    bd->drv->refresh_limits(bd);
    return;
  }
  if (bd->children->len == 0)
    return; /* a protocol node set its own at open */
  bd->min_io = 1;
  bd->max_transfer = 0;
  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    guint32 max = c->node->max_transfer;
    if (!(c->role & CBT_BLOCKDEV_CHILD_DATA))
      continue;
    bd->min_io = MAX(bd->min_io, c->node->min_io);
    if (max && (!bd->max_transfer || max < bd->max_transfer))
      bd->max_transfer = max;
  }
}

/* ---- admission and drain ------------------------------------------------------------------ */

void
cbt_blockdev_io_begin(CbtBlockdev *bd)
{
  for (;;) {
    g_atomic_int_inc(&bd->inflight);
    if (G_LIKELY(!g_atomic_int_get(&bd->draining)))
      return;
    /* Back off so the drain can finish, and wait for it to end. */
    cbt_blockdev_io_end(bd);
    g_mutex_lock(&admit_lock);
    while (g_atomic_int_get(&bd->draining))
      g_cond_wait(&admit_cond, &admit_lock);
    g_mutex_unlock(&admit_lock);
  }
}

void
cbt_blockdev_io_end(CbtBlockdev *bd)
{
  if (g_atomic_int_dec_and_test(&bd->inflight) && g_atomic_int_get(&bd->draining)) {
    g_mutex_lock(&admit_lock);
    g_cond_broadcast(&admit_cond);
    g_mutex_unlock(&admit_lock);
  }
}

static gboolean
any_inflight(GHashTable *nodes)
{
  GHashTableIter it;
  gpointer n;

  g_hash_table_iter_init(&it, nodes);
  while (g_hash_table_iter_next(&it, &n, NULL))
    if (g_atomic_int_get(&((CbtBlockdev *)n)->inflight) != 0)
      return TRUE;
  return FALSE;
}

void
cbt_blockdev_drain_begin(CbtBlockdev *bd)
{
  g_autoptr(GHashTable) above = reach(bd, TRUE);
  GHashTableIter it;
  gpointer n;

  CBT_ASSERT_MAIN_THREAD();
  bd->drains_own++;
  g_hash_table_iter_init(&it, above);
  while (g_hash_table_iter_next(&it, &n, NULL))
    g_atomic_int_inc(&((CbtBlockdev *)n)->draining);
  g_mutex_lock(&admit_lock);
  while (any_inflight(above))
    g_cond_wait(&admit_cond, &admit_lock);
  g_mutex_unlock(&admit_lock);
}

void
cbt_blockdev_drain_end(CbtBlockdev *bd)
{
  g_autoptr(GHashTable) above = reach(bd, TRUE);
  GHashTableIter it;
  gpointer n;

  CBT_ASSERT_MAIN_THREAD();
  g_return_if_fail(bd->drains_own > 0);
  bd->drains_own--;
  g_mutex_lock(&admit_lock);
  g_hash_table_iter_init(&it, above);
  while (g_hash_table_iter_next(&it, &n, NULL))
    g_atomic_int_add(&((CbtBlockdev *)n)->draining, -1);
  g_cond_broadcast(&admit_cond);
  g_mutex_unlock(&admit_lock);
}

/* ---- permissions -------------------------------------------------------------------------- */

/* What the users of @bd itself need: consistent reads for every user, write for a writer; an
 * export lets others do anything but resize the node under it (QEMU's BlockBackend). */
static void
user_perms(CbtBlockdev *bd, guint64 *perm, guint64 *shared)
{
  *perm = (bd->users ? CBT_PERM_CONSISTENT_READ : 0) | (bd->writers ? CBT_PERM_WRITE : 0);
  *shared = bd->users ? CBT_PERM_ALL & ~CBT_PERM_RESIZE : CBT_PERM_ALL;
}

static void
cumulate(CbtBlockdev *bd)
{
  user_perms(bd, &bd->perm, &bd->shared);
  if (bd->resizers)
    bd->perm |= CBT_PERM_RESIZE;
  for (guint i = 0; i < bd->parents->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->parents, i);
    bd->perm |= c->perm;
    bd->shared &= c->shared;
  }
}

/* QEMU's names of the permission bits, in bit order. */
static char *
perm_names(guint64 perm)
{
  static const char *const names[] = { "consistent read", "write", "write unchanged", "resize" };
  GString *out = g_string_new(NULL);

  for (guint i = 0; i < G_N_ELEMENTS(names); i++)
    if (perm & (1u << i))
      g_string_append_printf(out, "%s%s", out->len ? ", " : "", names[i]);
  return g_string_free(out, FALSE);
}

/* One holder of permissions on a node: a parent's edge, the node's users together, or a
 * block_resize in progress (QEMU's BlockBackends: an export, and the one block_resize makes,
 * are each "an unnamed block device" using the node as its "root"). */
typedef struct {
  const CbtBlockdevChild *edge; /* NULL: the users, or the resize */
  guint64 perm, shared;
} Holder;

static char *
holder_text(const Holder *h, const CbtBlockdev *bd)
{
  if (!h->edge)
    return g_strdup_printf("an unnamed block device (uses node '%s' as 'root' child)",
                           bd->node_name);
  return g_strdup_printf("node '%s' (uses node '%s' as '%s' child)", h->edge->parent->node_name,
                         bd->node_name, h->edge->name);
}

/* QEMU's parents' compliance check: every holder must share what every other one needs. A
 * resize comes first (the newest BlockBackend), then the users, then the parents newest first,
 * as QEMU's list of parents is ordered. */
static gboolean
check_conflicts(CbtBlockdev *bd, GError **error)
{
  g_autoptr(GArray) hs = g_array_new(FALSE, FALSE, sizeof(Holder));
  Holder users = { NULL, 0, CBT_PERM_ALL }, resize = { NULL, CBT_PERM_RESIZE, CBT_PERM_ALL };

  if (bd->resizers)
    g_array_append_val(hs, resize);
  user_perms(bd, &users.perm, &users.shared);
  if (bd->users || bd->writers)
    g_array_append_val(hs, users);
  for (guint i = bd->parents->len; i-- > 0;) {
    const CbtBlockdevChild *c = g_ptr_array_index(bd->parents, i);
    Holder h = { c, c->perm, c->shared };
    g_array_append_val(hs, h);
  }
  for (guint a = 0; a < hs->len; a++) {
    for (guint b = 0; b < hs->len; b++) {
      const Holder *ha = &g_array_index(hs, Holder, a), *hb = &g_array_index(hs, Holder, b);
      guint64 denied = hb->perm & ~ha->shared;
      if (a == b || !denied)
        continue;
      g_autofree char *names = perm_names(denied), *req = holder_text(hb, bd);
      g_autofree char *unshared = holder_text(ha, bd);
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                  "Permission conflict on node '%s': permissions '%s' are both required by %s "
                  "and unshared by %s.",
                  bd->node_name, names, req, unshared);
      return FALSE;
    }
  }
  return TRUE;
}

static gboolean
refresh(CbtBlockdev *bd, GError **error)
{
  cumulate(bd);
  if (!check_conflicts(bd, error))
    return FALSE;
  /* QEMU's bdrv_node_refresh_perm: nobody may write a read-only node (a blkdebug parent's
   * take-child-perms could ask it). */
  if ((bd->perm & (CBT_PERM_WRITE | CBT_PERM_WRITE_UNCHANGED)) && bd->read_only) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Block node is read-only");
    return FALSE;
  }
  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    if (bd->drv->child_perm) {
      bd->drv->child_perm(bd, c, bd->perm, bd->shared, &c->perm, &c->shared);
    } else {
      c->perm = bd->perm;
      c->shared = bd->shared;
    }
  }
  if (bd->drv->update_perms && !bd->drv->update_perms(bd, error))
    return FALSE;
  for (guint i = 0; i < bd->children->len; i++) {
    CbtBlockdevChild *c = g_ptr_array_index(bd->children, i);
    if (!refresh(c->node, error))
      return FALSE;
  }
  return TRUE;
}

gboolean
cbt_blockdev_refresh_perms(CbtBlockdev *bd, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  return refresh(bd, error);
}

/* Every node @bd's I/O reaches, @bd first: what a writer must find writable. */
gboolean
cbt_blockdev_check_writable(CbtBlockdev *bd, GError **error)
{
  g_autoptr(GHashTable) below = reach(bd, FALSE);
  GHashTableIter it;
  gpointer n;

  g_hash_table_iter_init(&it, below);
  while (g_hash_table_iter_next(&it, &n, NULL)) {
    if (((CbtBlockdev *)n)->read_only) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Block node is read-only");
      return FALSE;
    }
  }
  return TRUE;
}
