/* tests/dirty-bitmaps/test-bitmap-cmds.c — unit test of dirty-bitmaps/ (and the `transaction`
 * command of blockdev/transaction.c) against test doubles of blockdev/'s nodes
 * (fake-blockdev.c), through the real rpc/ with the generated marshallers: state, texts,
 * tracking, drains, undo, and the export holds. The daemon-level behaviour is compared with
 * qemu-storage-daemon by the Python tests next to this file. */
#include <stdarg.h>

#include "common/assert.h"
#include "dirty-bitmaps/dirty-bitmaps-private.h"
#include "fake-blockdev.h"
#include "schemas/qmp-commands.h"
#include "schemas/qmp-encode.h"

#define GiB (G_GUINT64_CONSTANT(1) << 30)
/* x-debug-block-dirty-bitmap-sha256 of an empty 1 GiB bitmap at 64 KiB, from qsd 7.2. */
#define EMPTY_1G_64K "e5a00aa9991ac8a5ee3109844d84a55583bd20572ad3ffcd42792f3c36b183ad"

static CbtBlockdev *d0, *d2, *r0;

static void
setup(void)
{
  d0 = fake_blockdev_add("d0", GiB, FALSE);
  d2 = fake_blockdev_add("d2", 2 * GiB, FALSE);
  r0 = fake_blockdev_add("r0", GiB, TRUE);
}

static void
teardown(void)
{
  fake_blockdev_close_all();
}

static void
assert_undrained(void)
{
  g_assert_cmpint(fake_blockdev_drained(d0), ==, 0);
  g_assert_cmpint(fake_blockdev_drained(d2), ==, 0);
  g_assert_cmpint(fake_blockdev_drained(r0), ==, 0);
}

static JsonNode *
call(const char *cmd, GError **error, const char *fmt, va_list ap)
{
  g_autofree char *args = g_strdup_vprintf(fmt, ap);
  JsonNode *ret = fake_rpc_call(cmd, args, error);
  assert_undrained();
  return ret;
}

static G_GNUC_PRINTF(2, 3) void ok(const char *cmd, const char *fmt, ...)
{
  g_autoptr(GError) error = NULL;
  va_list ap;

  va_start(ap, fmt);
  g_autoptr(JsonNode) ret = call(cmd, &error, fmt, ap);
  va_end(ap);
  g_assert_no_error(error);
  g_assert_nonnull(ret);
}

static G_GNUC_PRINTF(3, 4) void fails(const char *desc, const char *cmd, const char *fmt, ...)
{
  g_autoptr(GError) error = NULL;
  va_list ap;

  va_start(ap, fmt);
  g_autoptr(JsonNode) ret = call(cmd, &error, fmt, ap);
  va_end(ap);
  g_assert_null(ret);
  g_assert_nonnull(error);
  g_assert_cmpstr(error->message, ==, desc);
}

/* The node's `dirty-bitmaps` as JSON text, or "-" when the member is absent. The identity
 * members (random, timed) are checked present and left out: test_bitmap_identity.py tests
 * them. */
static char *
bitmaps_json(CbtBlockdev *bd)
{
  g_autoptr(JsonObject) info = fake_blockdev_info(bd);
  static const char *const identity[] = { "bitmap-uuid", "bitmap-created", "unbroken",
                                          "broken-reason" };

  if (!json_object_has_member(info, "dirty-bitmaps"))
    return g_strdup("-");
  JsonArray *a = json_object_get_array_member(info, "dirty-bitmaps");
  for (guint i = 0; i < json_array_get_length(a); i++) {
    JsonObject *b = json_array_get_object_element(a, i);
    g_assert_true(json_object_has_member(b, "bitmap-uuid"));
    g_assert_true(json_object_has_member(b, "unbroken"));
    for (gsize k = 0; k < G_N_ELEMENTS(identity); k++)
      if (json_object_has_member(b, identity[k]))
        json_object_remove_member(b, identity[k]);
  }
  return json_to_string(json_object_get_member(info, "dirty-bitmaps"), FALSE);
}

static void
assert_bitmaps(CbtBlockdev *bd, const char *expected)
{
  g_autofree char *got = bitmaps_json(bd);
  g_assert_cmpstr(got, ==, expected);
}

static char *
sha(const char *node, const char *name)
{
  g_autofree char *args = g_strdup_printf("{\"node\":\"%s\",\"name\":\"%s\"}", node, name);
  g_autoptr(JsonNode) ret = fake_rpc_call("x-debug-block-dirty-bitmap-sha256", args, NULL);
  g_assert_nonnull(ret);
  return g_strdup(json_object_get_string_member(json_node_get_object(ret), "sha256"));
}

#define BM(name, rec, gran, count)                                                                 \
  "{\"name\":\"" name "\",\"recording\":" rec ",\"persistent\":false,\"busy\":false,"              \
  "\"granularity\":" gran ",\"count\":" count "}"
#define BUSY_BM(name, rec)                                                                         \
  "{\"name\":\"" name "\",\"recording\":" rec ",\"persistent\":false,\"busy\":true,"               \
  "\"granularity\":65536,\"count\":0}"

static void
test_add(void)
{
  setup();
  assert_bitmaps(d0, "-");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"a\"}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"b\",\"granularity\":512,"
                               "\"disabled\":true,\"persistent\":false}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"c\",\"granularity\":2147483648}");
  assert_bitmaps(d0, "[" BM("c", "true", "2147483648", "0") "," BM("b", "false", "512", "0") "," BM(
                       "a", "true", "65536", "0") "]");
  g_assert_cmpuint(fake_blockdev_tracked(d0), ==, 2);
  /* Same name on another node; read-only nodes take (transient) bitmaps. */
  ok("block-dirty-bitmap-add", "{\"node\":\"r0\",\"name\":\"a\"}");
  g_autofree char *h = sha("d0", "a");
  g_assert_cmpstr(h, ==, EMPTY_1G_64K);

  /* QEMU's order: name, node, granularity, persistence, exists, length. */
  fails("Bitmap name cannot be empty", "block-dirty-bitmap-add",
        "{\"node\":\"nope\",\"name\":\"\",\"granularity\":3}");
  fails("Cannot find device='nope' nor node-name='nope'", "block-dirty-bitmap-add",
        "{\"node\":\"nope\",\"name\":\"a\",\"granularity\":3}");
  fails("Granularity must be power of 2 and at least 512", "block-dirty-bitmap-add",
        "{\"node\":\"d0\",\"name\":\"a\",\"granularity\":3,\"persistent\":true}");
  fails("Granularity must be power of 2 and at least 512", "block-dirty-bitmap-add",
        "{\"node\":\"d0\",\"name\":\"z\",\"granularity\":0}");
  fails("Granularity must be power of 2 and at least 512", "block-dirty-bitmap-add",
        "{\"node\":\"d0\",\"name\":\"z\",\"granularity\":1000}");
  fails("Can't store persistent bitmaps to d0: Operation not supported", "block-dirty-bitmap-add",
        "{\"node\":\"d0\",\"name\":\"a\",\"persistent\":true}");
  fails("Bitmap already exists: a", "block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"a\"}");
  g_autofree char *n1023 = g_strnfill(1023, 'n');
  g_autofree char *n1024 = g_strnfill(1024, 'n');
  g_autofree char *too_long = g_strconcat("Bitmap name too long: ", n1024, NULL);
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"%s\"}", n1023);
  fails(too_long, "block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"%s\"}", n1024);
  teardown();
}

static void
test_recording(void)
{
  setup();
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"a\",\"granularity\":4096}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"b\",\"disabled\":true}");
  /* 100 bytes at 40 MiB + 1000: one 4 KiB chunk. */
  fake_blockdev_write(d0, 40 * 1024 * 1024 + 1000, 100);
  assert_bitmaps(d0, "[" BM("b", "false", "65536", "0") "," BM("a", "true", "4096", "4096") "]");
  ok("block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"a\"}");
  ok("block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"a\"}");
  ok("block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"b\"}");
  ok("block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"b\"}");
  g_assert_cmpuint(fake_blockdev_tracked(d0), ==, 1);
  fake_blockdev_write(d0, 0, 1);
  assert_bitmaps(d0,
                 "[" BM("b", "true", "65536", "65536") "," BM("a", "false", "4096", "4096") "]");
  ok("block-dirty-bitmap-clear", "{\"node\":\"d0\",\"name\":\"b\"}");
  ok("block-dirty-bitmap-clear", "{\"node\":\"d0\",\"name\":\"a\"}");
  assert_bitmaps(d0, "[" BM("b", "true", "65536", "0") "," BM("a", "false", "4096", "0") "]");
  g_autofree char *h = sha("d0", "b");
  g_assert_cmpstr(h, ==, EMPTY_1G_64K);
  ok("block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"b\"}");
  g_assert_cmpuint(fake_blockdev_tracked(d0), ==, 0);
  ok("block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"a\"}");
  assert_bitmaps(d0, "-");

  const char *cmds[] = { "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                         "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
                         "x-debug-block-dirty-bitmap-sha256" };
  for (gsize i = 0; i < G_N_ELEMENTS(cmds); i++) {
    fails("Node 'nope' not found", cmds[i], "{\"node\":\"nope\",\"name\":\"a\"}");
    fails("Dirty bitmap 'a' not found", cmds[i], "{\"node\":\"d0\",\"name\":\"a\"}");
  }
  teardown();
}

static void
test_merge(void)
{
  setup();
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"t\",\"granularity\":65536}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"s\",\"granularity\":512,"
                               "\"disabled\":true}");
  ok("block-dirty-bitmap-add", "{\"node\":\"r0\",\"name\":\"s\",\"granularity\":4096}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d2\",\"name\":\"big\"}");
  fake_blockdev_write(d0, 0, 1);
  fake_blockdev_write(r0, 200000, 1);
  ok("block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"t\"}");
  g_autofree char *before = bitmaps_json(d0);

  fails("Parameter 'bitmaps' must not be empty", "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":[]}");
  fails("Dirty bitmap 'x' not found", "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"x\",\"bitmaps\":[\"s\"]}");
  fails("Dirty bitmap 'nope' not found", "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":"
        "[{\"node\":\"r0\",\"name\":\"s\"},\"nope\"]}");
  fails("Node 'zz' not found", "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":"
        "[\"s\",{\"node\":\"zz\",\"name\":\"s\"}]}");
  fails("Bitmaps are of different sizes (destination size is 1073741824, source size is "
        "2147483648) and can't be merged",
        "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":"
        "[\"s\",{\"node\":\"d2\",\"name\":\"big\"}]}");
  /* Every failure left the target as it was. */
  g_autofree char *after = bitmaps_json(d0);
  g_assert_cmpstr(after, ==, before);

  /* Different granularities; the target among the sources. */
  ok("block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":[\"t\","
                                 "{\"node\":\"r0\",\"name\":\"s\"}]}");
  assert_bitmaps(d0, "[" BM("s", "false", "512", "0") "," BM("t", "false", "65536", "131072") "]");
  ok("block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"s\",\"bitmaps\":[\"t\"]}");
  assert_bitmaps(d0,
                 "[" BM("s", "false", "512", "131072") "," BM("t", "false", "65536", "131072") "]");
  teardown();
}

/* Apply @actions (a JSON array) as a transaction that must fail with @desc and leave every
 * node's bitmaps and checksums as they were. */
static void
txn_fails_cleanly(const char *desc, const char *actions)
{
  g_autofree char *d0_before = bitmaps_json(d0);
  g_autofree char *r0_before = bitmaps_json(r0);
  g_autofree char *ha = sha("d0", "a");
  g_autofree char *hb = sha("d0", "b");

  fails(desc, "transaction", "{\"actions\":%s}", actions);
  g_autofree char *d0_after = bitmaps_json(d0);
  g_autofree char *r0_after = bitmaps_json(r0);
  g_autofree char *ha2 = sha("d0", "a");
  g_autofree char *hb2 = sha("d0", "b");
  g_assert_cmpstr(d0_after, ==, d0_before);
  g_assert_cmpstr(r0_after, ==, r0_before);
  g_assert_cmpstr(ha2, ==, ha);
  g_assert_cmpstr(hb2, ==, hb);
}

#define ACT(type, data) "{\"type\":\"" type "\",\"data\":" data "}"
#define A_B "{\"node\":\"d0\",\"name\":\"b\"}"

static void
test_transaction(void)
{
  const char *steps[] = {
    ACT("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"n\",\"granularity\":512}"),
    ACT("block-dirty-bitmap-clear", A_B),
    ACT("block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"b\",\"bitmaps\":[\"a\"]}"),
    ACT("block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"a\"}"),
    ACT("block-dirty-bitmap-disable", A_B),
    ACT("block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"a\"}"),
    ACT("block-dirty-bitmap-add", "{\"node\":\"r0\",\"name\":\"n\"}"),
  };

  setup();
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"a\",\"granularity\":4096}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"b\",\"granularity\":65536}");
  fake_blockdev_write(d0, 0, 100);
  ok("block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"a\"}");
  fake_blockdev_write(d0, 1 << 20, 100);
  fake_blockdev_write(d0, 5 << 20, 100);

  /* A failure injected after each prefix of the steps undoes the whole prefix. */
  for (gsize n = 0; n <= G_N_ELEMENTS(steps); n++) {
    g_autoptr(GString) acts = g_string_new("[");
    for (gsize i = 0; i < n; i++)
      g_string_append_printf(acts, "%s,", steps[i]);
    g_autofree char *abort_acts = g_strdup_printf("%s" ACT("abort", "{}") "]", acts->str);
    txn_fails_cleanly("Transaction aborted using Abort action", abort_acts);
    g_autofree char *bad_acts = g_strdup_printf(
      "%s" ACT("block-dirty-bitmap-clear", "{\"node\":\"d0\",\"name\":\"zz\"}") "]", acts->str);
    txn_fails_cleanly("Dirty bitmap 'zz' not found", bad_acts);
    g_assert_cmpuint(fake_blockdev_tracked(d0), ==, 1);
  }

  /* Later actions see earlier ones; a removal happens at commit only. */
  txn_fails_cleanly("Bitmap already exists: t4",
                    "[" ACT("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"t4\"}") "," ACT(
                      "block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"t4\"}") "]");
  txn_fails_cleanly("Bitmap already exists: b", "[" ACT("block-dirty-bitmap-remove", A_B) "," ACT(
                                                  "block-dirty-bitmap-add", A_B) "]");
  txn_fails_cleanly(
    "Bitmap 'b' is currently in use by another operation and cannot be used",
    "[" ACT("block-dirty-bitmap-remove", A_B) "," ACT("block-dirty-bitmap-clear", A_B) "]");
  /* qsd 7.2 crashes on the first two and disables b on the third. */
  txn_fails_cleanly("Dirty bitmap 'zz' not found",
                    "[" ACT("block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"zz\"}") "]");
  txn_fails_cleanly("Node 'zz' not found",
                    "[" ACT("block-dirty-bitmap-enable", "{\"node\":\"zz\",\"name\":\"b\"}") "]");
  txn_fails_cleanly(
    "Bitmap 'b' is currently in use by another operation and cannot be used",
    "[" ACT("block-dirty-bitmap-remove", A_B) "," ACT("block-dirty-bitmap-enable", A_B) "]");
  fails("Action 'block-dirty-bitmap-clear' does not support Transaction property "
        "completion-mode = grouped",
        "transaction",
        "{\"actions\":[" ACT("block-dirty-bitmap-clear",
                             A_B) "],\"properties\":{\"completion-mode\":\"grouped\"}}");
  fails("Transaction aborted using Abort action", "transaction",
        "{\"actions\":[" ACT("abort", "{}") "],\"properties\":{\"completion-mode\":\"grouped\"}}");
  ok("transaction", "{\"actions\":[],\"properties\":{\"completion-mode\":\"grouped\"}}");
  ok("transaction",
     "{\"actions\":[" ACT("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"tz\"}") "," ACT(
       "block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"tz\"}") "]}");

  /* Checkpoint: freeze b, start c. Writes then reach c only. */
  ok("transaction",
     "{\"actions\":[" ACT("block-dirty-bitmap-disable", A_B) "," ACT(
       "block-dirty-bitmap-add",
       "{\"node\":\"d0\",\"name\":\"c\"}") "],"
                                           "\"properties\":{\"completion-mode\":\"individual\"}}");
  fake_blockdev_write(d0, 9 << 20, 1);
  assert_bitmaps(d0, "[" BM("c", "true", "65536", "65536") "," BM(
                       "b", "false", "65536", "196608") "," BM("a", "false", "4096", "4096") "]");
  /* All steps at once commit. */
  g_autoptr(GString) all = g_string_new("[");
  for (gsize i = 0; i < G_N_ELEMENTS(steps); i++)
    g_string_append_printf(all, "%s%s", i ? "," : "", steps[i]);
  g_string_append(all, "]");
  ok("transaction", "{\"actions\":%s}", all->str);
  assert_bitmaps(d0, "[" BM("n", "true", "512", "0") "," BM("c", "true", "65536", "65536") "," BM(
                       "b", "false", "65536", "65536") "]");
  assert_bitmaps(r0, "[" BM("n", "true", "65536", "0") "]");
  teardown();
}

static void
test_export(void)
{
  g_autoptr(GError) error = NULL;

  setup();
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"rec\"}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"off\",\"disabled\":true}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"t2\"}");
  ok("block-dirty-bitmap-add", "{\"node\":\"r0\",\"name\":\"rec\"}");

  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, NULL, "nope", TRUE, &error));
  g_assert_cmpstr(error->message, ==, "Bitmap 'nope' is not found");
  g_clear_error(&error);
  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, "d0", "nope", TRUE, &error));
  g_assert_cmpstr(error->message, ==, "Dirty bitmap 'nope' not found");
  g_clear_error(&error);
  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, NULL, "rec", TRUE, &error));
  g_assert_cmpstr(error->message, ==, "Enabled bitmap 'rec' incompatible with readonly export");
  g_clear_error(&error);
  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, "d0", "rec", TRUE, &error));
  g_assert_cmpstr(error->message, ==, "Enabled bitmap 'rec' incompatible with readonly export");
  g_clear_error(&error);

  /* Recording bitmaps: writable exports, or read-only exports of read-only nodes. */
  CbtBitmap *rec = cbt_dirty_bitmaps_export_lookup(d0, NULL, "rec", FALSE, &error);
  g_assert_no_error(error);
  CbtBitmap *off = cbt_dirty_bitmaps_export_lookup(d0, "d0", "off", TRUE, &error);
  g_assert_no_error(error);
  CbtBitmap *rrec = cbt_dirty_bitmaps_export_lookup(r0, NULL, "rec", TRUE, &error);
  g_assert_no_error(error);
  g_assert_cmpint(fake_blockdev_users(d0), ==, 2);

  const char *busy = "Bitmap 'off' is currently in use by another operation and cannot be used";
  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, NULL, "off", TRUE, &error));
  g_assert_cmpstr(error->message, ==, busy);
  g_clear_error(&error);
  const char *cmds[] = { "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                         "block-dirty-bitmap-enable", "block-dirty-bitmap-disable" };
  for (gsize i = 0; i < G_N_ELEMENTS(cmds); i++)
    fails(busy, cmds[i], "{\"node\":\"d0\",\"name\":\"off\"}");
  fails(busy, "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"off\",\"bitmaps\":[\"rec\"]}");
  fails("Bitmap 'rec' is currently in use by another operation and cannot be used",
        "block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"t2\",\"bitmaps\":[\"rec\"]}");
  g_autofree char *h = sha("d0", "off");
  g_assert_cmpstr(h, ==, EMPTY_1G_64K);
  assert_bitmaps(d0, "[" BM("t2", "true", "65536",
                            "0") "," BUSY_BM("off", "false") "," BUSY_BM("rec", "true") "]");
  /* The exported bitmap keeps recording on a writable export. */
  fake_blockdev_write(d0, 0, 1);
  g_assert_true(cbt_bitmap_get(rec, 0));
  g_assert_false(fake_blockdev_del("d0"));

  cbt_dirty_bitmaps_export_release(rec);
  cbt_dirty_bitmaps_export_release(off);
  cbt_dirty_bitmaps_export_release(rrec);
  g_assert_cmpint(fake_blockdev_users(d0), ==, 0);
  ok("block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"off\"}");
  /* Deleting the node drops its bitmaps (the fake asserts they are untracked). */
  g_assert_true(fake_blockdev_del("d0"));
  teardown();
}

/* Read-only and inconsistent bitmaps only come from qcow2 images, which cbtd cannot open yet;
 * set the flags directly to check which checks each command applies (dirty-bitmap.h's matrix). */
static void
test_state_matrix(void)
{
  g_autoptr(GError) error = NULL;
  const char *ro = "Bitmap 'ro' is readonly and cannot be modified";
  const char *inc = "Bitmap 'inc' is inconsistent and cannot be used";

  setup();
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"ro\",\"disabled\":true}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"inc\",\"disabled\":true}");
  ok("block-dirty-bitmap-add", "{\"node\":\"d0\",\"name\":\"t\"}");
  cbt_dirty_bitmap_set_read_only(cbt_dirty_bitmaps_find(d0, "ro"), TRUE);
  cbt_dirty_bitmap_set_inconsistent(cbt_dirty_bitmaps_find(d0, "inc"));

  fails(ro, "block-dirty-bitmap-clear", "{\"node\":\"d0\",\"name\":\"ro\"}");
  fails(ro, "block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"ro\"}");
  fails(ro, "block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"ro\",\"bitmaps\":[\"t\"]}");
  ok("block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"ro\"}");
  ok("block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"ro\"}");
  ok("block-dirty-bitmap-merge", "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":[\"ro\"]}");
  CbtBitmap *bm = cbt_dirty_bitmaps_export_lookup(d0, NULL, "ro", TRUE, &error);
  g_assert_no_error(error);
  cbt_dirty_bitmaps_export_release(bm);

  fails(inc, "block-dirty-bitmap-clear", "{\"node\":\"d0\",\"name\":\"inc\"}");
  fails(inc, "block-dirty-bitmap-enable", "{\"node\":\"d0\",\"name\":\"inc\"}");
  fails(inc, "block-dirty-bitmap-disable", "{\"node\":\"d0\",\"name\":\"inc\"}");
  fails(inc, "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"inc\",\"bitmaps\":[\"t\"]}");
  fails(inc, "block-dirty-bitmap-merge",
        "{\"node\":\"d0\",\"target\":\"t\",\"bitmaps\":[\"inc\"]}");
  g_assert_null(cbt_dirty_bitmaps_export_lookup(d0, NULL, "inc", TRUE, &error));
  g_assert_cmpstr(error->message, ==, inc);
  g_autofree char *h = sha("d0", "inc");
  g_assert_cmpstr(h, ==, EMPTY_1G_64K);
  assert_bitmaps(
    d0, "[" BM("t", "true", "65536",
               "0") ",{\"name\":\"inc\",\"recording\":false,"
                    "\"persistent\":false,\"busy\":false,\"granularity\":65536,\"count\":0,"
                    "\"inconsistent\":true}," BM("ro", "false", "65536", "0") "]");
  /* The way out of an inconsistent bitmap is to remove it. */
  ok("block-dirty-bitmap-remove", "{\"node\":\"d0\",\"name\":\"inc\"}");
  cbt_dirty_bitmap_set_read_only(cbt_dirty_bitmaps_find(d0, "ro"), FALSE);
  teardown();
}

static JsonObject *
info(const CbtDirtyBitmap *dbm, JsonNode **node)
{
  g_autoptr(CbtQmpBlockDirtyInfo) i = cbt_dirty_bitmaps_info(dbm);

  *node = cbt_qmp_block_dirty_info_encode(i);
  g_assert_true(JSON_NODE_HOLDS_OBJECT(*node));
  return json_node_get_object(*node);
}

static void
test_info(void)
{
  g_autoptr(CbtDirtyBitmap) dbm = cbt_dirty_bitmap_new("b0", 100000, 65536);
  g_autoptr(JsonNode) n1 = NULL, n2 = NULL, n3 = NULL, n4 = NULL;

  JsonObject *o = info(dbm, &n1);
  /* QEMU's six, and cbtd's identity: a v4 UUID, the creation time, unbroken. */
  g_assert_cmpuint(json_object_get_size(o), ==, 9);
  g_autofree char *uuid = cbt_dirty_bitmap_get_uuid_string(dbm);
  g_assert_cmpstr(json_object_get_string_member(o, "bitmap-uuid"), ==, uuid);
  g_assert_true(g_uuid_string_is_valid(uuid));
  g_assert_cmpint(uuid[14], ==, '4');
  g_assert_cmpint(json_object_get_int_member(o, "bitmap-created"), ==,
                  (gint64)cbt_dirty_bitmap_get_created(dbm));
  g_assert_true(json_object_get_boolean_member(o, "unbroken"));
  g_assert_cmpstr(json_object_get_string_member(o, "name"), ==, "b0");
  g_assert_true(json_object_get_boolean_member(o, "recording"));
  g_assert_false(json_object_get_boolean_member(o, "persistent"));
  g_assert_false(json_object_get_boolean_member(o, "busy"));
  g_assert_cmpint(json_object_get_int_member(o, "granularity"), ==, 65536);
  g_assert_cmpint(json_object_get_int_member(o, "count"), ==, 0);
  g_assert_false(json_object_has_member(o, "inconsistent"));

  /* count is bits x granularity, not clipped: a dirty partial last chunk counts 65536. */
  cbt_bitmap_mark_range(cbt_dirty_bitmap_get_bitmap(dbm), 99999, 1);
  cbt_dirty_bitmap_set_recording(dbm, FALSE);
  cbt_dirty_bitmap_set_persistent(dbm, TRUE);
  cbt_dirty_bitmap_busy_ref(dbm);
  o = info(dbm, &n2);
  g_assert_cmpint(json_object_get_int_member(o, "count"), ==, 65536);
  g_assert_false(json_object_get_boolean_member(o, "recording"));
  g_assert_true(json_object_get_boolean_member(o, "persistent"));
  g_assert_true(json_object_get_boolean_member(o, "busy"));
  cbt_dirty_bitmap_busy_unref(dbm);

  /* One dirty bit of a 1 GiB node at 2 GiB granularity reports 2 GiB. */
  g_autoptr(CbtDirtyBitmap) big = cbt_dirty_bitmap_new("b1", GiB, 1u << 31);
  cbt_bitmap_mark_range(cbt_dirty_bitmap_get_bitmap(big), 5, 1);
  o = info(big, &n3);
  g_assert_cmpint(json_object_get_int_member(o, "count"), ==, 2 * GiB);
  g_assert_cmpuint(cbt_dirty_bitmap_get_count(big), ==, 2 * GiB);

  /* Inconsistent: not recording, count 0, the member present; anonymous: no name. */
  g_autoptr(CbtDirtyBitmap) anon = cbt_dirty_bitmap_new(NULL, GiB, 4096);
  cbt_bitmap_mark_range(cbt_dirty_bitmap_get_bitmap(anon), 0, GiB);
  cbt_dirty_bitmap_set_inconsistent(anon);
  o = info(anon, &n4);
  g_assert_false(json_object_has_member(o, "name"));
  g_assert_true(json_object_get_boolean_member(o, "inconsistent"));
  g_assert_false(json_object_get_boolean_member(o, "recording"));
  g_assert_cmpint(json_object_get_int_member(o, "count"), ==, 0);
  g_assert_cmpuint(json_object_get_size(o), ==, 6); /* no identity without a name */

  /* Inconsistent breaks the record, with its reason. */
  cbt_dirty_bitmap_set_inconsistent(dbm);
  g_autoptr(JsonNode) n5 = NULL;
  o = info(dbm, &n5);
  g_assert_false(json_object_get_boolean_member(o, "unbroken"));
  g_assert_cmpstr(json_object_get_string_member(o, "broken-reason"), ==,
                  "inconsistent: its bits could not be read back");
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  fake_rpc_init();
  cbt_dirty_bitmaps_init();
  g_test_add_func("/bitmap-cmds/add", test_add);
  g_test_add_func("/bitmap-cmds/recording", test_recording);
  g_test_add_func("/bitmap-cmds/merge", test_merge);
  g_test_add_func("/bitmap-cmds/transaction", test_transaction);
  g_test_add_func("/bitmap-cmds/export", test_export);
  g_test_add_func("/bitmap-cmds/state-matrix", test_state_matrix);
  g_test_add_func("/bitmap-cmds/info", test_info);
  return g_test_run();
}
