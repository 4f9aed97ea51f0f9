/* The C generated from the schema: decoders (defaults, has_ flags, unions, alternates, lists),
 * encoders (schema order, optional members, unsigned 64-bit numbers) and their refusal of values
 * that were never checked. */
#include <string.h>

#include "common/assert.h"
#include "rpc/rpc.h"
#include "schemas/qmp-encode.h"
#include "schemas/qmp-types.h"

static CbtRpc *rpc;

/* @json checked against @type as the dispatcher does (keyval: the command line's strings). */
static JsonNode *
checked(const char *type, const char *json, gboolean keyval)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) in = NULL;

  if (keyval) {
    gboolean is_json;
    g_autoptr(JsonObject) o = cbt_rpc_option_parse(json, NULL, &is_json, &error);
    g_assert_no_error(error);
    in = json_node_init_object(json_node_alloc(), o);
  } else {
    in = cbt_rpc_json_parse(json, -1, &error);
    g_assert_no_error(error);
  }
  JsonNode *out = cbt_rpc_check_type(rpc, type, in, keyval, &error);
  g_assert_no_error(error);
  return out;
}

static void
test_defaults(void)
{
  g_autoptr(JsonNode) n = checked("BlockdevOptions",
                                  "driver=raw,node-name=d0,"
                                  "file.driver=file,file.filename=/x.img,file.read-only=on",
                                  TRUE);
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtQmpBlockdevOptions) o = cbt_qmp_blockdev_options_decode(n, &error);

  g_assert_no_error(error);
  g_assert_cmpint(o->driver, ==, CBT_QMP_BLOCKDEV_DRIVER_RAW);
  g_assert_cmpstr(o->node_name, ==, "d0");
  /* Absent members with a schema default hold it, and say they were absent. */
  g_assert_false(o->has_discard);
  g_assert_cmpint(o->discard, ==, CBT_QMP_BLOCKDEV_DISCARD_OPTIONS_IGNORE);
  g_assert_false(o->has_read_only);
  g_assert_false(o->read_only);
  g_assert_false(o->u.raw.has_offset);
  g_assert_cmpint(o->u.raw.offset, ==, 0);
  g_assert_null(o->cache);

  const CbtQmpBlockdevRef *ref = o->u.raw.file;
  g_assert_cmpint(ref->type, ==, CBT_QMP_BLOCKDEV_REF_KIND_DEFINITION);
  const CbtQmpBlockdevOptions *file = ref->u.definition;
  g_assert_cmpint(file->driver, ==, CBT_QMP_BLOCKDEV_DRIVER_FILE);
  g_assert_cmpstr(file->u.file.filename, ==, "/x.img");
  g_assert_true(file->has_read_only);
  g_assert_true(file->read_only);
  g_assert_cmpint(file->u.file.locking, ==, CBT_QMP_ON_OFF_AUTO_AUTO);
  g_assert_cmpint(file->u.file.aio, ==, CBT_QMP_BLOCKDEV_AIO_OPTIONS_THREADS);

  /* A member the schema gives a default but the input sets keeps its value and its has_. */
  g_autoptr(JsonNode) n2 = checked("BlockdevOptions",
                                   "{\"driver\": \"null-co\","
                                   " \"node-name\": \"n\", \"size\": 4096}",
                                   FALSE);
  g_autoptr(CbtQmpBlockdevOptions) nul = cbt_qmp_blockdev_options_decode(n2, NULL);
  g_assert_true(nul->u.null_co.has_size);
  g_assert_cmpint(nul->u.null_co.size, ==, 4096);
  g_assert_false(nul->u.null_co.has_read_zeroes);
  g_autoptr(JsonNode) n3 = checked("BlockdevOptions",
                                   "{\"driver\": \"null-co\","
                                   " \"node-name\": \"n\"}",
                                   FALSE);
  g_autoptr(CbtQmpBlockdevOptions) nul2 = cbt_qmp_blockdev_options_decode(n3, NULL);
  g_assert_false(nul2->u.null_co.has_size);
  g_assert_cmpint(nul2->u.null_co.size, ==, 1 << 30);
}

static void
test_union_alternate_list(void)
{
  g_autoptr(JsonNode) n = checked("BlockExportOptions",
                                  "{\"type\": \"nbd\", \"id\": \"e\", \"node-name\": \"d0\","
                                  " \"bitmaps\": [\"b0\", {\"node\": \"f0\", \"name\": \"b1\"}]}",
                                  FALSE);
  g_autoptr(CbtQmpBlockExportOptions) o = cbt_qmp_block_export_options_decode(n, NULL);

  g_assert_nonnull(o);
  g_assert_cmpint(o->type, ==, CBT_QMP_BLOCK_EXPORT_TYPE_NBD);
  g_assert_false(o->has_writable);
  g_assert_null(o->u.nbd.name);
  g_assert_cmpuint(o->u.nbd.bitmaps->len, ==, 2);
  const CbtQmpBlockDirtyBitmapOrStr *b0 = g_ptr_array_index(o->u.nbd.bitmaps, 0);
  const CbtQmpBlockDirtyBitmapOrStr *b1 = g_ptr_array_index(o->u.nbd.bitmaps, 1);
  g_assert_cmpint(b0->type, ==, CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_LOCAL);
  g_assert_cmpstr(b0->u.local, ==, "b0");
  g_assert_cmpint(b1->type, ==, CBT_QMP_BLOCK_DIRTY_BITMAP_OR_STR_KIND_EXTERNAL);
  g_assert_cmpstr(b1->u.external->node, ==, "f0");
  g_assert_cmpstr(b1->u.external->name, ==, "b1");

  /* Encoded again: the given members, in schema order; absent ones stay absent. */
  g_autoptr(JsonNode) back = cbt_qmp_block_export_options_encode(o);
  g_autofree char *text = json_to_string(back, FALSE);
  g_assert_cmpstr(text, ==,
                  "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"d0\","
                  "\"bitmaps\":[\"b0\",{\"node\":\"f0\",\"name\":\"b1\"}]}");

  g_autoptr(JsonNode) t = checked("q_obj_transaction-arg",
                                  "{\"actions\": [{\"type\": \"abort\","
                                  " \"data\": {}}, {\"type\": \"block-dirty-bitmap-merge\","
                                  " \"data\": {\"node\": \"d0\", \"target\": \"t\","
                                  " \"bitmaps\": [\"s\"]}}]}",
                                  FALSE);
  g_autoptr(CbtQmpTransactionArg) txn = cbt_qmp_transaction_arg_decode(t, NULL);
  g_assert_nonnull(txn);
  g_assert_null(txn->properties);
  const CbtQmpTransactionAction *merge = g_ptr_array_index(txn->actions, 1);
  g_assert_cmpint(merge->type, ==, CBT_QMP_TRANSACTION_ACTION_KIND_BLOCK_DIRTY_BITMAP_MERGE);
  g_assert_cmpstr(merge->u.block_dirty_bitmap_merge.data->target, ==, "t");
}

static void
test_encode(void)
{
  CbtQmpBlockDirtyInfo info = { .recording = TRUE, .granularity = 65536, .count = 3 };
  g_autoptr(JsonNode) n = cbt_qmp_block_dirty_info_encode(&info);
  g_autofree char *text = cbt_rpc_json_to_string(n, FALSE);
  /* No name (anonymous), no inconsistent (absent unless true is the caller's choice). */
  g_assert_cmpstr(text, ==,
                  "{\"recording\": true, \"persistent\": false, \"busy\": false, "
                  "\"granularity\": 65536, \"count\": 3}");

  /* uint64 above INT64_MAX prints as the number it is. */
  CbtQmpBlockdevOptionsNull null = { .has_latency_ns = TRUE, .latency_ns = G_MAXUINT64 };
  g_autoptr(JsonNode) n2 = cbt_qmp_blockdev_options_null_encode(&null);
  g_autofree char *t2 = cbt_rpc_json_to_string(n2, FALSE);
  g_assert_cmpstr(t2, ==, "{\"latency-ns\": 18446744073709551615}");

  CbtQmpBlockdevDriver d;
  g_assert_true(cbt_qmp_blockdev_driver_from_string("null-co", &d));
  g_assert_cmpint(d, ==, CBT_QMP_BLOCKDEV_DRIVER_NULL_CO);
  g_assert_cmpstr(cbt_qmp_blockdev_driver_to_string(d), ==, "null-co");
  g_assert_false(cbt_qmp_blockdev_driver_from_string("nope", &d));
}

/* A decoder given JSON nobody checked refuses it instead of reading garbage. */
static void
test_unchecked(void)
{
  static const char *const bad[] = {
    "{\"node\": 1, \"name\": \"a\"}",
    "{\"name\": \"a\"}",
    "[]",
    "{\"node\": \"d0\", \"name\": \"a\", \"granularity\": \"big\"}",
  };

  for (gsize i = 0; i < G_N_ELEMENTS(bad); i++) {
    g_autoptr(GError) error = NULL;
    g_autoptr(JsonNode) n = json_from_string(bad[i], NULL);
    g_autoptr(CbtQmpBlockDirtyBitmapAdd) a = cbt_qmp_block_dirty_bitmap_add_decode(n, &error);
    g_assert_null(a);
    g_assert_error(error, CBT_QMP_ERROR, 0);
  }
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) n = json_from_string("{\"type\": \"nbd\", \"id\": \"e\","
                                           " \"node-name\": \"d\", \"bitmaps\": [3]}",
                                           NULL);
  g_assert_null(cbt_qmp_block_export_options_decode(n, &error));
  g_assert_error(error, CBT_QMP_ERROR, 0);
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  rpc = cbt_rpc_new(&error);
  g_assert_no_error(error);
  g_test_add_func("/qmp-types/defaults", test_defaults);
  g_test_add_func("/qmp-types/union-alternate-list", test_union_alternate_list);
  g_test_add_func("/qmp-types/encode", test_encode);
  g_test_add_func("/qmp-types/unchecked", test_unchecked);
  int ret = g_test_run();
  cbt_rpc_free(rpc);
  return ret;
}
