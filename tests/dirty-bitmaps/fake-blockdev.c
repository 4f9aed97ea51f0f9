/* tests/dirty-bitmaps/fake-blockdev.c — test doubles for the unit test of the bitmap commands:
 * the parts of blockdev.h the bitmap module calls. The doubles enforce blockdev.h's contract
 * (tracking changes only while drained, balanced drains, users and references) with
 * assertions, so a contract breach in the bitmap module fails the test. */
#include "fake-blockdev.h"

#include "schemas/qmp-commands.h"
#include "schemas/qmp-encode.h"

struct CbtBlockdev {
  char *name;
  guint64 size;
  gboolean read_only;
  int refs;
  int users;
  int drained;
  GPtrArray *tracked; /* CbtBitmap * */
};

static GHashTable *nodes;                             /* name -> CbtBlockdev */
static GPtrArray *notifiers[CBT_BLOCKDEV_EVENT__MAX]; /* CbtBlockdevNotifyFunc */
static CbtRpc *rpc;

static void
notify(CbtBlockdev *bd, CbtBlockdevEvent event, gpointer data)
{
  for (guint i = 0; notifiers[event] && i < notifiers[event]->len; i++)
    ((CbtBlockdevNotifyFunc)g_ptr_array_index(notifiers[event], i))(bd, data, NULL);
}

CbtBlockdev *
fake_blockdev_add(const char *name, guint64 size, gboolean read_only)
{
  CbtBlockdev *bd = g_new0(CbtBlockdev, 1);

  if (!nodes)
    nodes = g_hash_table_new(g_str_hash, g_str_equal);
  bd->name = g_strdup(name);
  bd->size = size;
  bd->read_only = read_only;
  bd->refs = 1;
  bd->tracked = g_ptr_array_new();
  g_hash_table_insert(nodes, bd->name, bd);
  return bd;
}

gboolean
fake_blockdev_del(const char *name)
{
  CbtBlockdev *bd = cbt_blockdev_find(name);

  g_assert_nonnull(bd);
  if (bd->users)
    return FALSE;
  cbt_blockdev_drain_begin(bd);
  notify(bd, CBT_BLOCKDEV_EVENT_CLOSING, NULL);
  g_assert_cmpuint(bd->tracked->len, ==, 0);
  cbt_blockdev_drain_end(bd);
  g_hash_table_remove(nodes, name);
  cbt_blockdev_unref(bd);
  return TRUE;
}

void
fake_blockdev_write(CbtBlockdev *bd, guint64 offset, guint64 len)
{
  g_assert_cmpint(bd->drained, ==, 0);
  for (guint i = 0; i < bd->tracked->len; i++)
    cbt_bitmap_mark_range(g_ptr_array_index(bd->tracked, i), offset, len);
}

guint
fake_blockdev_tracked(CbtBlockdev *bd)
{
  return bd->tracked->len;
}

int
fake_blockdev_users(CbtBlockdev *bd)
{
  return bd->users;
}

int
fake_blockdev_drained(CbtBlockdev *bd)
{
  return bd->drained;
}

JsonObject *
fake_blockdev_info(CbtBlockdev *bd)
{
  CbtQmpBlockDeviceInfo info = { .node_name = bd->name };
  JsonObject *o = json_object_new();

  notify(bd, CBT_BLOCKDEV_EVENT_QUERY, &info);
  json_object_set_string_member(o, "node-name", bd->name);
  if (info.dirty_bitmaps) {
    json_object_set_member(o, "dirty-bitmaps",
                           cbt_qmp_block_dirty_info_list_encode(info.dirty_bitmaps));
    g_ptr_array_unref(info.dirty_bitmaps);
  }
  return o;
}

void
fake_blockdev_close_all(void)
{
  g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
  GHashTableIter it;
  gpointer key;

  if (!nodes)
    return;
  g_hash_table_iter_init(&it, nodes);
  while (g_hash_table_iter_next(&it, &key, NULL))
    g_ptr_array_add(names, g_strdup(key));
  for (guint i = 0; i < names->len; i++)
    g_assert_true(fake_blockdev_del(g_ptr_array_index(names, i)));
}

/* blockdev.h ------------------------------------------------------------------------------- */

CbtBlockdev *
cbt_blockdev_find(const char *node_name)
{
  return nodes ? g_hash_table_lookup(nodes, node_name) : NULL;
}

CbtBlockdev *
cbt_blockdev_ref(CbtBlockdev *bd)
{
  bd->refs++;
  return bd;
}

void
cbt_blockdev_unref(CbtBlockdev *bd)
{
  g_assert_cmpint(bd->refs, >, 0);
  if (--bd->refs)
    return;
  g_assert_cmpint(bd->drained, ==, 0);
  g_assert_cmpint(bd->users, ==, 0);
  g_ptr_array_unref(bd->tracked);
  g_free(bd->name);
  g_free(bd);
}

const char *
cbt_blockdev_get_node_name(CbtBlockdev *bd)
{
  return bd->name;
}

guint64
cbt_blockdev_get_size(CbtBlockdev *bd)
{
  return bd->size;
}

gboolean
cbt_blockdev_is_read_only(CbtBlockdev *bd)
{
  return bd->read_only;
}

void
cbt_blockdev_add_user(CbtBlockdev *bd)
{
  bd->users++;
}

void
cbt_blockdev_remove_user(CbtBlockdev *bd)
{
  g_assert_cmpint(bd->users, >, 0);
  bd->users--;
}

/* A job's hold (dirty-bitmaps/frozen.c) counts as a user here. */
void
cbt_blockdev_hold(CbtBlockdev *bd)
{
  bd->users++;
}

void
cbt_blockdev_unhold(CbtBlockdev *bd)
{
  g_assert_cmpint(bd->users, >, 0);
  bd->users--;
}

void
cbt_blockdev_track_bitmap(CbtBlockdev *bd, CbtBitmap *bm)
{
  g_assert_cmpint(bd->drained, >, 0);
  g_assert_false(g_ptr_array_find(bd->tracked, bm, NULL));
  g_ptr_array_add(bd->tracked, bm);
}

void
cbt_blockdev_untrack_bitmap(CbtBlockdev *bd, CbtBitmap *bm)
{
  g_assert_cmpint(bd->drained, >, 0);
  g_assert_true(g_ptr_array_remove(bd->tracked, bm));
}

void
cbt_blockdev_notifier_add(CbtBlockdevEvent event, CbtBlockdevNotifyFunc fn, gpointer user_data)
{
  g_assert_null(user_data);
  if (!notifiers[event])
    notifiers[event] = g_ptr_array_new();
  g_ptr_array_add(notifiers[event], fn);
}

G_DEFINE_QUARK(cbt - blockdev - error - quark, cbt_blockdev_error)

void
cbt_blockdev_drain_begin(CbtBlockdev *bd)
{
  bd->drained++;
}

void
cbt_blockdev_drain_end(CbtBlockdev *bd)
{
  g_assert_cmpint(bd->drained, >, 0);
  bd->drained--;
}

/* rpc ------------------------------------------------------------------------------------- */

void
fake_rpc_init(void)
{
  g_autoptr(GError) error = NULL;

  rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  cbt_qmp_register_dirty_bitmap(rpc);
}

JsonNode *
fake_rpc_call(const char *command, const char *json_args, GError **error)
{
  g_autoptr(JsonNode) args = json_from_string(json_args ? json_args : "{}", NULL);

  g_assert_nonnull(args);
  return cbt_rpc_execute(rpc, command, json_node_get_object(args), FALSE, error);
}

/* Persistent bitmaps: a fake node has no store (persist.c then answers QEMU's refusal), so the
 * observer calls only check the drain contract. */
void
cbt_blockdev_add_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark, gpointer opaque)
{
  g_assert_not_reached();
}

void
cbt_blockdev_remove_write_observer(CbtBlockdev *bd, CbtBlockdevWriteFunc mark, gpointer opaque)
{
  g_assert_not_reached();
}

gboolean
cbt_blockdev_get_store_info(CbtBlockdev *bd, CbtBlockdevStoreInfo *info)
{
  return FALSE;
}

const char *
cbt_blockdev_get_driver_name(CbtBlockdev *bd)
{
  return "fake";
}
