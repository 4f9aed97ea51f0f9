/* The block graph (blockdev/graph.c) where it is more than a chain: a filter with two children,
 * a node with two parents. Drain and admission walk it (graph.c invariant (1)), permissions
 * follow the drivers' child_perm, limits come from the children, the I/O path carries out the
 * flags a driver does not honour, the snapshot hooks reach their driver, and the node
 * notifiers see every node come and go. The nodes of the test driver below are built by hand;
 * the leaves are real null-co nodes. */
#include <errno.h>
#include <string.h>

#include "blockdev/blockdev-internal.h"
#include "schemas/qmp-commands.h"

static CbtRpc *rpc;

/* ---- a test filter: two children, counts what reaches it ----------------------------------- */

typedef struct {
  gint writes, flushes, zeroes, snapshot_reads;
  guint last_flags;
} Counts;

static int
t_pwrite(CbtBlockdev *bd, const void *buf, guint64 offset, gsize len, guint flags)
{
  Counts *c = bd->opaque;

  c->writes++;
  c->last_flags = flags;
  return cbt_blockdev_pwrite(bd->file->node, buf, offset, len, flags);
}

static int
t_write_zeroes(CbtBlockdev *bd, guint64 offset, guint64 len, guint flags)
{
  Counts *c = bd->opaque;

  c->zeroes++;
  c->last_flags = flags;
  return 0;
}

static int
t_flush(CbtBlockdev *bd)
{
  ((Counts *)bd->opaque)->flushes++;
  return 0;
}

static int
t_snapshot_pread(CbtBlockdev *bd, void *buf, guint64 offset, gsize len)
{
  ((Counts *)bd->opaque)->snapshot_reads++;
  memset(buf, 0x5a, len);
  return 0;
}

/* The target is written behind the guest's back: others may not write it (copy-before-write). */
static void
t_child_perm(CbtBlockdev *bd, const CbtBlockdevChild *c, guint64 perm, guint64 shared,
             guint64 *ret_perm, guint64 *ret_shared)
{
  *ret_perm = perm;
  *ret_shared = shared;
  if (g_str_equal(c->name, "target")) {
    *ret_perm = CBT_PERM_WRITE;
    *ret_shared = shared & ~CBT_PERM_WRITE;
  }
}

static void
t_close(CbtBlockdev *bd)
{
  g_clear_pointer(&bd->opaque, g_free);
}

static const CbtBlockdevChildSpec t_children[] = {
  { "file", CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY | CBT_BLOCKDEV_CHILD_FILTERED },
  { "target", CBT_BLOCKDEV_CHILD_DATA },
  { NULL, 0 },
};

static const CbtBlockdevDriver test_filter = {
  .name = "test-filter",
  .is_filter = TRUE,
  .children = t_children,
  .supported_flags = 0, /* honours no flag itself */
  .close = t_close,
  .child_perm = t_child_perm,
  .pwrite = t_pwrite,
  .write_zeroes = t_write_zeroes,
  .flush = t_flush,
  .snapshot_pread = t_snapshot_pread,
};

static CbtBlockdev *
leaf(const char *name)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *json = g_strdup_printf("{\"driver\": \"null-co\", \"node-name\": \"%s\"}", name);
  g_autoptr(JsonNode) args = cbt_rpc_json_parse(json, -1, &error);
  g_autoptr(JsonNode) ret =
    cbt_rpc_execute(rpc, "blockdev-add", json_node_get_object(args), FALSE, &error);
  g_assert_no_error(error);
  return cbt_blockdev_find(name);
}

static void
del(const char *name)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();

  json_object_set_string_member(args, "node-name", name);
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_no_error(error);
}

/* A filter over @file and @target, published as @name (the caller holds the only reference). */
static CbtBlockdev *
filter(const char *name, CbtBlockdev *file, CbtBlockdev *target)
{
  CbtBlockdev *bd = cbt_blockdev_new(&test_filter);

  bd->node_name = g_strdup(name);
  bd->size = cbt_blockdev_get_size(file);
  bd->full_opts = json_object_new();
  bd->opaque = g_new0(Counts, 1);
  cbt_blockdev_attach_child(bd, file, "file", t_children[0].role);
  cbt_blockdev_attach_child(bd, target, "target", t_children[1].role);
  g_assert_true(cbt_blockdev_refresh_perms(bd, NULL));
  cbt_blockdev_refresh_limits(bd);
  cbt_blockdev_register(bd);
  return bd;
}

/* ---- notifiers ------------------------------------------------------------------------------ */

static GString *events;

static void
on_event(CbtBlockdev *bd, gpointer data, gpointer user_data)
{
  g_string_append_printf(events, "%s:%s ", (const char *)user_data, cbt_blockdev_get_node_name(bd));
}

/* ---- the tests ------------------------------------------------------------------------------ */

/*        top (filter)      other (filter)
 *        /        \         /        \
 *     src          tgt ----'          x2
 * tgt has two parents; draining it must hold requests entering at either. */
typedef struct {
  CbtBlockdev *src, *tgt, *x2, *top, *other;
} Graph;

static void
graph_build(Graph *g)
{
  g->src = leaf("src");
  g->tgt = leaf("tgt");
  g->x2 = leaf("x2");
  g->top = filter("top", g->src, g->tgt);
  g->other = filter("other", g->tgt, g->x2);
}

static void
graph_free(Graph *g)
{
  cbt_blockdev_unref(g->top);
  cbt_blockdev_unref(g->other);
  del("x2");
  del("tgt");
  del("src");
}

static void
test_edges(void)
{
  Graph g;

  graph_build(&g);
  g_assert_cmpuint(g.tgt->parents->len, ==, 2);
  g_assert_cmpuint(g.top->children->len, ==, 2);
  g_assert_true(g.top->file->node == g.src);
  g_assert_true(cbt_blockdev_get_child(g.top) == g.src);
  g_assert_true(cbt_blockdev_primary_child(g.other) == g.tgt);
  /* A node that is another's child cannot be deleted. */
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) args = json_object_new();
  json_object_set_string_member(args, "node-name", "tgt");
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, "blockdev-del", args, FALSE, &error);
  g_assert_null(ret);
  g_assert_cmpstr(error->message, ==, "Block device tgt is in use");
  graph_free(&g);
}

static void
test_drain_counts(void)
{
  Graph g;

  graph_build(&g);
  cbt_blockdev_drain_begin(g.tgt);
  /* Invariant (1): the drain is counted on tgt and on each node above it, once. */
  g_assert_cmpint(g.tgt->draining, ==, 1);
  g_assert_cmpint(g.top->draining, ==, 1);
  g_assert_cmpint(g.other->draining, ==, 1);
  g_assert_cmpint(g.src->draining, ==, 0);
  g_assert_cmpint(g.x2->draining, ==, 0);
  cbt_blockdev_drain_begin(g.top);
  g_assert_cmpint(g.top->draining, ==, 2);
  g_assert_cmpint(g.tgt->draining, ==, 1);
  /* An edge added under a drained node: the new parent counts the drain below it. */
  CbtBlockdevChild *extra =
    cbt_blockdev_attach_child(g.x2, g.tgt, "extra", CBT_BLOCKDEV_CHILD_DATA);
  g_assert_cmpint(g.x2->draining, ==, 1);
  g_assert_cmpint(g.other->draining, ==, 1); /* tgt reached twice, counted once */
  cbt_blockdev_detach_child(extra);
  g_assert_cmpint(g.x2->draining, ==, 0);
  cbt_blockdev_drain_end(g.top);
  cbt_blockdev_drain_end(g.tgt);
  g_assert_cmpint(g.top->draining, ==, 0);
  g_assert_cmpint(g.other->draining, ==, 0);
  g_assert_cmpint(g.tgt->draining, ==, 0);
  graph_free(&g);
}

typedef struct {
  CbtBlockdev *bd;
  gint done;
} Entry;

static gpointer
enter(gpointer data)
{
  Entry *e = data;

  cbt_blockdev_io_begin(e->bd);
  g_atomic_int_set(&e->done, 1);
  cbt_blockdev_io_end(e->bd);
  return NULL;
}

static void
test_drain_holds_every_parent(void)
{
  Graph g;
  Entry a = { 0 }, b = { 0 }, c = { 0 };

  graph_build(&g);
  a.bd = g.top;
  b.bd = g.other;
  c.bd = g.src;
  cbt_blockdev_drain_begin(g.tgt);
  GThread *ta = g_thread_new("a", enter, &a);
  GThread *tb = g_thread_new("b", enter, &b);
  GThread *tc = g_thread_new("c", enter, &c);
  g_thread_join(tc); /* src is not above tgt: admitted at once */
  g_assert_cmpint(c.done, ==, 1);
  g_usleep(50000);
  g_assert_cmpint(g_atomic_int_get(&a.done), ==, 0);
  g_assert_cmpint(g_atomic_int_get(&b.done), ==, 0);
  cbt_blockdev_drain_end(g.tgt);
  g_thread_join(ta);
  g_thread_join(tb);
  g_assert_cmpint(a.done + b.done, ==, 2);

  /* A request in flight at the top holds a drain of a node below it. */
  cbt_blockdev_io_begin(g.top);
  g_assert_cmpint(g.top->inflight, ==, 1);
  g_assert_cmpint(g.tgt->inflight, ==, 0); /* counted where it entered only */
  cbt_blockdev_io_end(g.top);
  graph_free(&g);
}

static void
test_perms(void)
{
  Graph g;

  graph_build(&g);
  g_assert_cmpuint(g.tgt->perm, ==, CBT_PERM_WRITE); /* both filters write their targets */
  g_assert_cmpuint(g.tgt->shared & CBT_PERM_WRITE, ==, 0);
  cbt_blockdev_add_user(g.top);
  g_assert_true(cbt_blockdev_acquire_write(g.top, NULL));
  g_assert_cmpuint(g.top->perm, ==, CBT_PERM_CONSISTENT_READ | CBT_PERM_WRITE);
  /* The user's needs reach the filtered child; an export never shares resize. */
  g_assert_cmpuint(g.src->perm, ==, CBT_PERM_CONSISTENT_READ | CBT_PERM_WRITE);
  g_assert_cmpuint(g.src->shared, ==, CBT_PERM_ALL & ~CBT_PERM_RESIZE);
  g_assert_cmpuint(g.tgt->shared, ==, CBT_PERM_ALL & ~CBT_PERM_RESIZE & ~CBT_PERM_WRITE);
  cbt_blockdev_release_write(g.top);
  cbt_blockdev_remove_user(g.top);
  g_assert_cmpuint(g.src->perm, ==, 0);
  g_assert_cmpuint(g.src->shared, ==, CBT_PERM_ALL);
  /* A read-only node below refuses a writer above. */
  g.x2->read_only = TRUE;
  g_autoptr(GError) error = NULL;
  g_assert_false(cbt_blockdev_acquire_write(g.other, &error));
  g_assert_cmpstr(error->message, ==, "Block node is read-only");
  g.x2->read_only = FALSE;
  graph_free(&g);
}

static void
test_flags_and_snapshot(void)
{
  Graph g;
  guint8 buf[4096];

  graph_build(&g);
  Counts *c = g.top->opaque;
  /* FUA that the driver does not honour: carried out with a flush after the write. */
  g_assert_cmpint(cbt_blockdev_pwrite(g.top, buf, 0, sizeof buf, CBT_BLOCKDEV_FUA), ==, 0);
  g_assert_cmpint(c->writes, ==, 1);
  g_assert_cmpuint(c->last_flags, ==, 0);
  g_assert_cmpint(c->flushes, ==, 1);
  g_assert_cmpint(cbt_blockdev_pwrite(g.top, buf, 0, sizeof buf, 0), ==, 0);
  g_assert_cmpint(c->flushes, ==, 1);
  /* A zero-write that must be cheap cannot be promised by this driver: refused, untouched. */
  g_assert_cmpint(cbt_blockdev_write_zeroes(g.top, 0, 4096, CBT_BLOCKDEV_NO_FALLBACK), ==,
                  -ENOTSUP);
  g_assert_cmpint(c->zeroes, ==, 0);
  g_assert_cmpint(cbt_blockdev_write_zeroes(g.top, 0, 4096, CBT_BLOCKDEV_MAY_UNMAP), ==, 0);
  g_assert_cmpint(c->zeroes, ==, 1);
  g_assert_cmpuint(c->last_flags, ==, 0);
  /* The frozen view reaches the driver that has one, and no other. */
  g_assert_cmpint(cbt_blockdev_snapshot_pread(g.top, buf, 0, 512), ==, 0);
  g_assert_cmpint(buf[511], ==, 0x5a);
  g_assert_cmpint(c->snapshot_reads, ==, 1);
  g_assert_cmpint(cbt_blockdev_snapshot_pread(g.src, buf, 0, 512), ==, -ENOTSUP);
  g_assert_cmpint(cbt_blockdev_snapshot_pread(g.top, buf, g.top->size, 512), ==, -EINVAL);
  g_assert_cmpint(cbt_blockdev_snapshot_discard(g.top, 0, 512), ==, -ENOTSUP);
  graph_free(&g);
}

static void
test_notifiers(void)
{
  events = g_string_new(NULL);
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_OPENED, on_event, "opened");
  cbt_blockdev_notifier_add(CBT_BLOCKDEV_EVENT_CLOSING, on_event, "closing");
  CbtBlockdev *n1 = leaf("n1");
  CbtBlockdev *f = filter("f", n1, n1);
  cbt_blockdev_unref(f);
  del("n1");
  g_assert_cmpstr(events->str, ==, "opened:n1 opened:f closing:f closing:n1 ");
  cbt_blockdev_notifier_remove(CBT_BLOCKDEV_EVENT_OPENED, on_event, "opened");
  cbt_blockdev_notifier_remove(CBT_BLOCKDEV_EVENT_CLOSING, on_event, "closing");
  leaf("n2");
  del("n2");
  g_assert_cmpstr(events->str, ==, "opened:n1 opened:f closing:f closing:n1 ");
  g_string_free(events, TRUE);
}

/* The contracts are checked, not only written: off the main thread a registry call dies. */
static void
test_main_thread_contract(void)
{
  if (g_test_subprocess()) {
    GThread *t = g_thread_new("off-main", (GThreadFunc)cbt_blockdev_find, "x");
    g_thread_join(t);
    return;
  }
  g_test_trap_subprocess(NULL, 0, 0);
  g_test_trap_assert_failed();
  g_test_trap_assert_stderr("*cbt_blockdev_find: called off the main thread*");
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_qmp_register_block_core(rpc);
  g_test_add_func("/graph/edges", test_edges);
  g_test_add_func("/graph/drain-counts", test_drain_counts);
  g_test_add_func("/graph/drain-holds-every-parent", test_drain_holds_every_parent);
  g_test_add_func("/graph/perms", test_perms);
  g_test_add_func("/graph/flags-and-snapshot", test_flags_and_snapshot);
  g_test_add_func("/graph/notifiers", test_notifiers);
  g_test_add_func("/graph/main-thread-contract", test_main_thread_contract);
  int ret = g_test_run();
  cbt_blockdev_close_all();
  cbt_rpc_free(rpc);
  return ret;
}
