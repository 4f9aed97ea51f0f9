/* Schema model, argument validation (QEMU's texts and paths, checked against
 * qemu-storage-daemon 7.2 for the equivalent QAPI shapes), keyval conversion and the
 * query-qmp-schema shape, against a small schema written here. */
#include "common/assert.h"
#include "rpc/rpc-private.h"

#include <string.h>

static const char test_schema[] =
  "[{\"enum\": \"Color\", \"data\": [\"red\", \"green\", \"blue\"]},"
  " {\"enum\": \"Kind\", \"data\": [\"file\", \"null\", \"raw\"]},"
  " {\"struct\": \"Inner\","
  "  \"data\": {\"name\": \"str\", \"*n8\": \"int8\", \"*u16\": \"uint16\"}},"
  " {\"struct\": \"Base\", \"data\": {\"kind\": \"Kind\", \"*node-name\": \"str\"}},"
  " {\"struct\": \"FileOpts\", \"data\": {\"filename\": \"str\", \"*size\": \"size\","
  "  \"*ro\": \"bool\", \"*aio\": \"Color\"}},"
  " {\"struct\": \"RawOpts\", \"data\": {\"file\": \"Ref\", \"*offset\": \"uint64\"}},"
  " {\"union\": \"Opts\", \"base\": \"Base\", \"discriminator\": \"kind\","
  "  \"data\": {\"file\": \"FileOpts\", \"raw\": \"RawOpts\"}},"
  " {\"alternate\": \"Ref\", \"data\": {\"definition\": \"Opts\", \"reference\": \"str\"}},"
  " {\"alternate\": \"RefOrNull\", \"data\": {\"definition\": \"Opts\", \"reference\": \"str\","
  "  \"null\": \"null\"}},"
  " {\"alternate\": \"NumOrBool\", \"data\": {\"n\": \"int\", \"b\": \"bool\"}},"
  " {\"struct\": \"Sub\", \"base\": \"Inner\", \"data\": {\"extra\": \"number\"},"
  "  \"features\": [\"unstable\"]},"
  " {\"struct\": \"All\", \"data\": {\"s\": \"str\", \"*i\": \"int\", \"*i8\": \"int8\","
  "  \"*i16\": \"int16\", \"*i32\": \"int32\", \"*i64\": \"int64\", \"*u8\": \"uint8\","
  "  \"*u16\": \"uint16\", \"*u32\": \"uint32\", \"*u64\": \"uint64\", \"*sz\": \"size\","
  "  \"*num\": \"number\", \"*b\": \"bool\", \"*nul\": \"null\", \"*any\": \"any\","
  "  \"*color\": \"Color\", \"*colors\": [\"Color\"], \"*inners\": [\"Inner\"],"
  "  \"*inner\": \"Inner\", \"*ref\": \"Ref\", \"*refn\": \"RefOrNull\", \"*nb\": \"NumOrBool\","
  "  \"*strs\": [\"str\"], \"*sub\": \"Sub\","
  "  \"*old\": {\"type\": \"str\", \"features\": [\"deprecated\"]}}},"
  " {\"command\": \"cmd\","
  "  \"data\": {\"a\": \"int\", \"*b\": {\"type\": \"str\", \"default\": \"x\"}},"
  "  \"returns\": \"All\", \"features\": [\"deprecated\"]},"
  " {\"command\": \"boxed\", \"data\": \"Opts\", \"boxed\": true},"
  " {\"command\": \"noargs\"},"
  " {\"event\": \"EV\", \"data\": {\"id\": \"str\"}},"
  " {\"event\": \"EV0\"}]";

static CbtSchema *schema;

typedef struct {
  const char *type;
  const char *in;
  const char *out; /* compact JSON of the checked copy, or "ERR <message>" */
} Case;

/* JSON mode: texts as qemu-storage-daemon 7.2 prints them for the same shapes. */
static const Case json_cases[] = {
  { "All", "{\"s\": \"x\"}", "{\"s\": \"x\"}" },
  { "All", "{}", "ERR Parameter 's' is missing" },
  { "All", "[]", "ERR Invalid parameter type for '<anonymous>', expected: object" },
  { "All", "{\"s\": 1}", "ERR Invalid parameter type for 's', expected: string" },
  { "All", "{\"s\": \"x\", \"zz\": 1}", "ERR Parameter 'zz' is unexpected" },
  /* Several unexpected members: the one QEMU's hash table yields first (as qsd 7.2 does). */
  { "All", "{\"s\": \"x\", \"foo\": 1, \"bar\": 2}", "ERR Parameter 'bar' is unexpected" },
  { "All", "{\"bar\": 2, \"s\": \"x\", \"foo\": 1}", "ERR Parameter 'bar' is unexpected" },
  { "All", "{\"s\": \"x\", \"i\": 1.5}", "ERR Invalid parameter type for 'i', expected: integer" },
  { "All", "{\"s\": \"x\", \"i\": \"1\"}",
    "ERR Invalid parameter type for 'i', expected: integer" },
  { "All", "{\"s\": \"x\", \"i\": 18446744073709551615}",
    "ERR Invalid parameter type for 'i', expected: integer" },
  { "All", "{\"s\": \"x\", \"i64\": -9223372036854775808}",
    "{\"s\": \"x\", \"i64\": -9223372036854775808}" },
  { "All", "{\"s\": \"x\", \"i8\": 127, \"i16\": -32768, \"i32\": 2147483647}",
    "{\"s\": \"x\", \"i8\": 127, \"i16\": -32768, \"i32\": 2147483647}" },
  { "All", "{\"s\": \"x\", \"i8\": 128}", "ERR Parameter 'i8' expects int8_t" },
  { "All", "{\"s\": \"x\", \"i16\": -32769}", "ERR Parameter 'i16' expects int16_t" },
  { "All", "{\"s\": \"x\", \"i32\": 2147483648}", "ERR Parameter 'i32' expects int32_t" },
  { "All", "{\"s\": \"x\", \"u8\": 256}", "ERR Parameter 'u8' expects uint8_t" },
  { "All", "{\"s\": \"x\", \"u32\": 4294967296}", "ERR Parameter 'u32' expects uint32_t" },
  { "All", "{\"s\": \"x\", \"u32\": -1}", "ERR Parameter 'u32' expects uint32_t" },
  { "All", "{\"s\": \"x\", \"u32\": \"x\"}", "ERR Parameter 'u32' expects uint64" },
  { "All", "{\"s\": \"x\", \"u16\": 1.0}", "ERR Parameter 'u16' expects uint64" },
  { "All", "{\"s\": \"x\", \"u64\": null}", "ERR Parameter 'u64' expects uint64" },
  { "All", "{\"s\": \"x\", \"u64\": -1, \"sz\": 18446744073709551615}",
    /* Checked uint64 values hold the bit pattern; handlers cast to guint64. */
    "{\"s\": \"x\", \"u64\": -1, \"sz\": -1}" },
  { "All", "{\"s\": \"x\", \"sz\": true}", "ERR Parameter 'sz' expects uint64" },
  { "All", "{\"s\": 18446744073709551615}",
    "ERR Invalid parameter type for 's', expected: string" },
  { "All", "{\"s\": \"x\", \"any\": [18446744073709551615], \"num\": 18446744073709551615}",
    "{\"s\": \"x\", \"num\": 1.8446744073709552e+19, \"any\": [18446744073709551615]}" },
  { "All", "{\"s\": \"x\", \"nb\": 18446744073709551615}",
    "ERR Invalid parameter type for 'nb', expected: integer" },
  { "All", "{\"s\": \"x\", \"num\": 1, \"b\": false, \"nul\": null, \"any\": [{\"k\": 1.5}]}",
    "{\"s\": \"x\", \"num\": 1, \"b\": false, \"nul\": null, \"any\": [{\"k\": 1.5}]}" },
  { "All", "{\"s\": \"x\", \"num\": \"1\"}",
    "ERR Invalid parameter type for 'num', expected: number" },
  { "All", "{\"s\": \"x\", \"b\": \"on\"}",
    "ERR Invalid parameter type for 'b', expected: boolean" },
  { "All", "{\"s\": \"x\", \"nul\": 0}", "ERR Invalid parameter type for 'nul', expected: null" },
  { "All", "{\"s\": \"x\", \"color\": \"pink\"}",
    "ERR Parameter 'color' does not accept value 'pink'" },
  { "All", "{\"s\": \"x\", \"color\": 1}",
    "ERR Invalid parameter type for 'color', expected: string" },
  { "All", "{\"s\": \"x\", \"colors\": [\"red\", \"pink\"]}",
    "ERR Parameter 'null' does not accept value 'pink'" },
  { "All", "{\"s\": \"x\", \"colors\": [\"red\", 2]}",
    "ERR Invalid parameter type for 'colors[1]', expected: string" },
  { "All", "{\"s\": \"x\", \"colors\": \"red\"}",
    "ERR Invalid parameter type for 'colors', expected: array" },
  { "All", "{\"s\": \"x\", \"inners\": [{\"name\": \"a\"}, {}]}",
    "ERR Parameter 'inners[1].name' is missing" },
  { "All", "{\"s\": \"x\", \"inners\": [{\"name\": \"a\", \"q\": 1}]}",
    "ERR Parameter 'inners[0].q' is unexpected" },
  { "All", "{\"s\": \"x\", \"inners\": [{\"name\": \"a\", \"n8\": 300}]}",
    "ERR Parameter 'n8' expects int8_t" },
  { "All", "{\"s\": \"x\", \"inner\": {\"name\": 5}}",
    "ERR Invalid parameter type for 'inner.name', expected: string" },
  { "All", "{\"s\": \"x\", \"inners\": [1]}",
    "ERR Invalid parameter type for 'inners[0]', expected: object" },
  { "All", "{\"s\": \"x\", \"strs\": [\"a\", null]}",
    "ERR Invalid parameter type for 'strs[1]', expected: string" },
  { "All", "{\"s\": \"x\", \"sub\": {\"name\": \"n\", \"extra\": 2}}",
    "{\"s\": \"x\", \"sub\": {\"name\": \"n\", \"extra\": 2}}" },
  { "All", "{\"s\": \"x\", \"sub\": {\"name\": \"n\"}}", "ERR Parameter 'sub.extra' is missing" },
  /* Alternates: chosen by JSON type; a wrong type names the alternate. */
  { "All", "{\"s\": \"x\", \"ref\": \"node0\"}", "{\"s\": \"x\", \"ref\": \"node0\"}" },
  { "All", "{\"s\": \"x\", \"ref\": 1}", "ERR Invalid parameter type for 'ref', expected: Ref" },
  { "All", "{\"s\": \"x\", \"ref\": null}", "ERR Invalid parameter type for 'ref', expected: Ref" },
  { "All", "{\"s\": \"x\", \"refn\": null}", "{\"s\": \"x\", \"refn\": null}" },
  { "All", "{\"s\": \"x\", \"refn\": 1.5}",
    "ERR Invalid parameter type for 'refn', expected: RefOrNull" },
  { "All", "{\"s\": \"x\", \"ref\": {\"kind\": \"file\"}}",
    "ERR Parameter 'ref.filename' is missing" },
  { "All", "{\"s\": \"x\", \"nb\": 3}", "{\"s\": \"x\", \"nb\": 3}" },
  { "All", "{\"s\": \"x\", \"nb\": true}", "{\"s\": \"x\", \"nb\": true}" },
  { "All", "{\"s\": \"x\", \"nb\": 2.5}",
    "ERR Invalid parameter type for 'nb', expected: integer" },
  { "All", "{\"s\": \"x\", \"nb\": \"3\"}",
    "ERR Invalid parameter type for 'nb', expected: NumOrBool" },
  /* Flat unions: the discriminator picks the branch members. */
  { "Opts", "{\"kind\": \"file\", \"filename\": \"f\"}",
    "{\"kind\": \"file\", \"filename\": \"f\"}" },
  { "Opts", "{}", "ERR Parameter 'kind' is missing" },
  { "Opts", "{\"kind\": \"nope\"}", "ERR Parameter 'kind' does not accept value 'nope'" },
  { "Opts", "{\"kind\": \"null\"}", "{\"kind\": \"null\"}" },
  { "Opts", "{\"kind\": \"null\", \"filename\": \"f\"}", "ERR Parameter 'filename' is unexpected" },
  { "Opts", "{\"kind\": \"file\", \"filename\": \"f\", \"aio\": \"bogus\"}",
    "ERR Parameter 'aio' does not accept value 'bogus'" },
  { "Opts", "{\"kind\": \"raw\", \"file\": {\"kind\": \"file\"}}",
    "ERR Parameter 'file.filename' is missing" },
  { "Opts",
    "{\"kind\": \"raw\", \"file\": {\"kind\": \"raw\", \"file\": {\"kind\": \"file\", "
    "\"filename\": 1}}}",
    "ERR Invalid parameter type for 'file.file.filename', expected: string" },
  { "Opts", "{\"kind\": \"raw\", \"file\": {\"kind\": \"null\", \"x\": 1}}",
    "ERR Parameter 'file.x' is unexpected" },
  { "Opts", "{\"kind\": \"raw\", \"file\": \"f0\", \"offset\": 512}",
    "{\"kind\": \"raw\", \"file\": \"f0\", \"offset\": 512}" },
};

/* Keyval mode: every leaf is a string as the command-line parser made it. Texts as
 * qemu-storage-daemon 7.2 prints them for --blockdev/--nbd-server/--export. */
static const Case keyval_cases[] = {
  { "All", "{\"s\": \"x\", \"b\": \"on\", \"i\": \"0x10\", \"i8\": \"-5\", \"num\": \"2.5\"}",
    "{\"s\": \"x\", \"i\": 16, \"i8\": -5, \"num\": 2.5, \"b\": true}" },
  { "All", "{\"s\": \"x\", \"b\": \"maybe\"}", "ERR Parameter 'b' expects 'on' or 'off'" },
  { "All", "{\"s\": \"x\", \"b\": \"true\"}", "ERR Parameter 'b' expects 'on' or 'off'" },
  { "All", "{\"s\": \"x\", \"i\": \"abc\"}", "ERR Parameter 'i' expects integer" },
  { "All", "{\"s\": \"x\", \"i\": \"\"}", "ERR Parameter 'i' expects integer" },
  { "All", "{\"s\": \"x\", \"u32\": \"-1\"}", "ERR Parameter 'u32' expects uint32_t" },
  { "All", "{\"s\": \"x\", \"u32\": \"5000000000\"}", "ERR Parameter 'u32' expects uint32_t" },
  { "All", "{\"s\": \"x\", \"u64\": \"18446744073709551615\"}", "{\"s\": \"x\", \"u64\": -1}" },
  { "All", "{\"s\": \"x\", \"num\": \"x\"}",
    "ERR Invalid parameter type for 'num', expected: number" },
  { "All", "{\"s\": \"x\", \"sz\": \"1.5k\"}", "{\"s\": \"x\", \"sz\": 1536}" },
  { "All", "{\"s\": \"x\", \"sz\": \"4M\"}", "{\"s\": \"x\", \"sz\": 4194304}" },
  { "All", "{\"s\": \"x\", \"sz\": \"1g\"}", "{\"s\": \"x\", \"sz\": 1073741824}" },
  { "All", "{\"s\": \"x\", \"sz\": \"2T\"}", "{\"s\": \"x\", \"sz\": 2199023255552}" },
  { "All", "{\"s\": \"x\", \"sz\": \"512\"}", "{\"s\": \"x\", \"sz\": 512}" },
  { "All", "{\"s\": \"x\", \"sz\": \"0x200\"}", "{\"s\": \"x\", \"sz\": 512}" },
  { "All", "{\"s\": \"x\", \"sz\": \"16E\"}", "ERR Parameter 'sz' expects size" },
  { "All", "{\"s\": \"x\", \"sz\": \"abc\"}", "ERR Parameter 'sz' expects size" },
  { "All", "{\"s\": \"x\", \"sz\": \"-1\"}", "ERR Parameter 'sz' expects size" },
  { "All", "{\"s\": \"x\", \"sz\": \"1.5\"}", "ERR Parameter 'sz' expects size" },
  { "All", "{\"s\": \"x\", \"sz\": \"1kb\"}", "ERR Parameter 'sz' expects size" },
  { "All", "{\"s\": \"x\", \"inner\": \"x\"}",
    "ERR Invalid parameter type for 'inner', expected: object" },
  { "All", "{\"s\": {\"a\": \"b\"}}", "ERR Parameters 's.*' are unexpected" },
  { "All", "{\"s\": \"x\", \"colors\": [\"red\", \"pink\"]}",
    "ERR Parameter 'null' does not accept value 'pink'" },
  { "All", "{\"s\": \"x\", \"inners\": [{\"name\": \"a\"}, {\"n8\": \"1\"}]}",
    "ERR Parameter 'inners.1.name' is missing" },
  { "All", "{\"s\": \"x\", \"inners\": [{\"name\": \"a\", \"u16\": \"70000\"}]}",
    "ERR Parameter 'u16' expects uint16_t" },
  { "Opts",
    "{\"kind\": \"raw\", \"file\": {\"kind\": \"file\", \"filename\": \"f\", "
    "\"ro\": \"off\", \"size\": \"1k\"}}",
    "{\"kind\": \"raw\", \"file\": {\"kind\": \"file\", \"filename\": \"f\", \"size\": 1024, "
    "\"ro\": false}}" },
  { "Opts",
    "{\"kind\": \"raw\", \"file\": {\"kind\": \"file\", \"filename\": \"f\", "
    "\"ro\": \"1\"}}",
    "ERR Parameter 'file.ro' expects 'on' or 'off'" },
  { "Opts", "{\"kind\": \"raw\", \"file\": {\"kind\": \"nope\"}}",
    "ERR Parameter 'kind' does not accept value 'nope'" },
};

static char *
check(const Case *c, gboolean keyval)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) in = cbt_rpc_json_parse(c->in, -1, &error);
  CbtSchemaType *type = cbt_schema_lookup_type(schema, c->type);

  g_assert_no_error(error);
  g_assert_nonnull(type);
  g_autoptr(JsonNode) out = cbt_schema_check(type, in, keyval, &error);
  if (!out) {
    g_assert_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC);
    return g_strdup_printf("ERR %s", error->message);
  }
  g_assert_no_error(error);
  return cbt_json_to_string(out, FALSE);
}

/* Equal as JSON values (member order is the writer's business, tested in test-json). */
static gboolean
same_json(const char *a, const char *b)
{
  if (g_str_has_prefix(a, "ERR ") || g_str_has_prefix(b, "ERR "))
    return g_str_equal(a, b);
  g_autoptr(JsonNode) x = cbt_rpc_json_parse(a, -1, NULL);
  g_autoptr(JsonNode) y = cbt_rpc_json_parse(b, -1, NULL);
  return x && y && json_node_equal(x, y);
}

static void
run_cases(const Case *cases, gsize n, gboolean keyval)
{
  for (gsize i = 0; i < n; i++) {
    g_autofree char *got = check(&cases[i], keyval);
    if (!same_json(got, cases[i].out)) {
      g_test_message("case %" G_GSIZE_FORMAT ": %s %s", i, cases[i].type, cases[i].in);
      g_assert_cmpstr(got, ==, cases[i].out);
    }
  }
}

static void
test_json_mode(void)
{
  run_cases(json_cases, G_N_ELEMENTS(json_cases), FALSE);
}

static void
test_keyval_mode(void)
{
  run_cases(keyval_cases, G_N_ELEMENTS(keyval_cases), TRUE);
}

/* Absent arguments are an empty object; the checked copy is independent of the input. */
static void
test_absent_and_copy(void)
{
  g_autoptr(GError) error = NULL;
  CbtSchemaCommand *noargs = g_hash_table_lookup(schema->commands, "noargs");
  CbtSchemaCommand *cmd = g_hash_table_lookup(schema->commands, "cmd");
  g_autoptr(JsonNode) empty = cbt_schema_check(schema->empty, NULL, FALSE, &error);

  g_assert_nonnull(noargs);
  g_assert_null(noargs->args);
  g_assert_nonnull(empty);
  g_assert_cmpuint(json_object_get_size(json_node_get_object(empty)), ==, 0);
  g_assert_null(cbt_schema_check(cmd->args, NULL, FALSE, &error));
  g_assert_cmpstr(error->message, ==, "Parameter 'a' is missing");
  g_clear_error(&error);

  g_autoptr(JsonNode) in = cbt_rpc_json_parse("{\"a\": 1}", -1, NULL);
  g_autoptr(JsonNode) out = cbt_schema_check(cmd->args, in, FALSE, &error);
  g_assert_no_error(error);
  json_object_set_int_member(json_node_get_object(in), "a", 2);
  g_assert_cmpint(json_object_get_int_member(json_node_get_object(out), "a"), ==, 1);
}

static void
test_load_errors(void)
{
  g_autoptr(GError) error = NULL;

  g_assert_null(cbt_schema_load("[{\"struct\": \"A\", \"data\": {\"x\": \"Nope\"}}]", &error));
  g_assert_nonnull(strstr(error->message, "Nope"));
  g_clear_error(&error);
  g_assert_null(cbt_schema_load("{}", &error));
  g_assert_nonnull(error);
  g_clear_error(&error);
  g_assert_null(cbt_schema_load("[{\"bogus\": 1}]", &error));
  g_assert_nonnull(error);
}

/* ---- introspection --------------------------------------------------------------------------- */

static JsonObject *
find_entry(JsonArray *list, const char *name)
{
  for (guint i = 0; i < json_array_get_length(list); i++) {
    JsonObject *o = json_array_get_object_element(list, i);
    if (g_str_equal(json_object_get_string_member(o, "name"), name))
      return o;
  }
  g_assert_not_reached();
}

static char *
entry_text(JsonArray *list, const char *name)
{
  g_autoptr(JsonNode) n = json_node_init_object(json_node_alloc(), find_entry(list, name));
  return cbt_json_to_string(n, FALSE);
}

#define ASSERT_ENTRY(list, name, text)                                                             \
  do {                                                                                             \
    g_autofree char *got_ = entry_text(list, name);                                                \
    if (!same_json(got_, text))                                                                    \
      g_assert_cmpstr(got_, ==, text);                                                             \
  } while (0)

static void
test_introspection(void)
{
  g_autoptr(JsonNode) root = cbt_introspect_build(schema);
  JsonArray *list = json_node_get_array(root);

  /* Commands and events first, in schema order; QEMU's SchemaInfo shapes; "0" = {}. */
  g_assert_cmpstr(json_object_get_string_member(json_array_get_object_element(list, 0), "name"), ==,
                  "cmd");
  ASSERT_ENTRY(list, "cmd",
               "{\"name\": \"cmd\", \"arg-type\": \"1\", \"ret-type\": \"2\", "
               "\"meta-type\": \"command\", \"features\": [\"deprecated\"]}");
  ASSERT_ENTRY(list, "boxed",
               "{\"name\": \"boxed\", \"arg-type\": \"3\", \"ret-type\": \"0\", "
               "\"meta-type\": \"command\"}");
  ASSERT_ENTRY(list, "noargs",
               "{\"name\": \"noargs\", \"arg-type\": \"0\", \"ret-type\": \"0\", "
               "\"meta-type\": \"command\"}");
  ASSERT_ENTRY(list, "EV", "{\"name\": \"EV\", \"arg-type\": \"4\", \"meta-type\": \"event\"}");
  ASSERT_ENTRY(list, "EV0", "{\"name\": \"EV0\", \"arg-type\": \"0\", \"meta-type\": \"event\"}");
  g_assert_cmpstr(json_object_get_string_member(json_array_get_object_element(list, 5), "name"), ==,
                  "0");
  ASSERT_ENTRY(list, "0", "{\"name\": \"0\", \"members\": [], \"meta-type\": \"object\"}");
  ASSERT_ENTRY(list, "1",
               "{\"name\": \"1\", \"members\": [{\"name\": \"a\", \"type\": \"int\"}, "
               "{\"name\": \"b\", \"type\": \"str\", \"default\": null}], "
               "\"meta-type\": \"object\"}");
  /* A flat union: base members, tag, listed branches, then the value without one as "0". */
  ASSERT_ENTRY(list, "3",
               "{\"name\": \"3\", \"members\": [{\"name\": \"kind\", \"type\": \"11\"}, "
               "{\"name\": \"node-name\", \"type\": \"str\", \"default\": null}], "
               "\"meta-type\": \"object\", \"tag\": \"kind\", \"variants\": "
               "[{\"case\": \"file\", \"type\": \"12\"}, {\"case\": \"raw\", "
               "\"type\": \"13\"}, {\"case\": \"null\", \"type\": \"0\"}]}");
  ASSERT_ENTRY(list, "11",
               "{\"name\": \"11\", \"members\": [{\"name\": \"file\"}, {\"name\": "
               "\"null\"}, {\"name\": \"raw\"}], \"meta-type\": \"enum\", "
               "\"values\": [\"file\", \"null\", \"raw\"]}");
  ASSERT_ENTRY(list, "int",
               "{\"name\": \"int\", \"json-type\": \"int\", \"meta-type\": \"builtin\"}");
  ASSERT_ENTRY(list, "any",
               "{\"name\": \"any\", \"json-type\": \"value\", \"meta-type\": \"builtin\"}");
  ASSERT_ENTRY(list, "[str]",
               "{\"name\": \"[str]\", \"element-type\": \"str\", "
               "\"meta-type\": \"array\"}");

  /* Every integer type shows as int; no name twice; every referenced name is defined. */
  JsonObject *all = find_entry(list, "2");
  JsonArray *members = json_object_get_array_member(all, "members");
  g_autoptr(GHashTable) names = g_hash_table_new(g_str_hash, g_str_equal);
  for (guint i = 0; i < json_array_get_length(list); i++) {
    const char *n = json_object_get_string_member(json_array_get_object_element(list, i), "name");
    g_assert_true(g_hash_table_add(names, (gpointer)n));
  }
  for (guint i = 0; i < json_array_get_length(members); i++) {
    JsonObject *m = json_array_get_object_element(members, i);
    const char *mn = json_object_get_string_member(m, "name");
    const char *t = json_object_get_string_member(m, "type");
    g_assert_true(g_hash_table_contains(names, t));
    if (g_str_has_prefix(mn, "i") || g_str_has_prefix(mn, "u") || g_str_equal(mn, "sz"))
      g_assert_cmpstr(t, ==, g_str_equal(mn, "inner") || g_str_equal(mn, "inners") ? t : "int");
    if (g_str_equal(mn, "old"))
      g_assert_cmpstr(json_array_get_string_element(json_object_get_array_member(m, "features"), 0),
                      ==, "deprecated");
  }
  JsonObject *alt = find_entry(
    list, json_object_get_string_member(json_array_get_object_element(members, 20), "type"));
  g_assert_cmpstr(json_object_get_string_member(alt, "meta-type"), ==, "alternate");
}

/* The compiled-in schema: command-line conversions give the texts qemu-storage-daemon 7.2
 * prints for the same options (observed: `qemu-storage-daemon --blockdev ...`). Inputs are what
 * the keyval parser makes of them: objects whose leaves are strings. */
static const Case compiled_keyval_cases[] = {
  { "BlockdevOptions", "{\"driver\": \"null-co\", \"node-name\": \"x\", \"size\": \"abc\"}",
    "ERR Parameter 'size' expects integer" },
  { "BlockdevOptions", "{\"driver\": \"null-co\", \"node-name\": \"x\", \"size\": \"1G\"}",
    "ERR Parameter 'size' expects integer" },
  { "BlockdevOptions",
    "{\"driver\": \"file\", \"node-name\": \"x\", \"filename\": \"/n\", "
    "\"read-only\": \"maybe\"}",
    "ERR Parameter 'read-only' expects 'on' or 'off'" },
  { "BlockdevOptions",
    "{\"driver\": \"raw\", \"node-name\": \"x\", \"file\": {\"driver\": "
    "\"null-co\", \"size\": \"abc\"}}",
    "ERR Parameter 'file.size' expects integer" },
  { "BlockdevOptions",
    "{\"driver\": \"raw\", \"node-name\": \"x\", \"file\": {\"driver\": "
    "\"nope\"}}",
    "ERR Parameter 'driver' does not accept value 'nope'" },
  { "BlockdevOptions",
    "{\"driver\": \"raw\", \"node-name\": \"x\", \"file\": {\"driver\": "
    "\"null-co\", \"read-zeroes\": \"1\"}}",
    "ERR Parameter 'file.read-zeroes' expects 'on' or 'off'" },
  { "BlockdevOptions",
    "{\"driver\": \"null-co\", \"node-name\": \"x\", \"file\": {\"foo\": "
    "\"1\"}}",
    "ERR Parameter 'file' is unexpected" },
  { "BlockdevOptions",
    "{\"driver\": \"null-co\", \"node-name\": \"x\", \"foo\": \"1\", "
    "\"bar\": \"2\"}",
    "ERR Parameter 'bar' is unexpected" },
  { "BlockdevOptions",
    "{\"driver\": \"raw\", \"node-name\": \"d0\", \"read-only\": \"on\", "
    "\"file\": {\"driver\": \"null-co\", \"size\": \"0x100000\", \"read-zeroes\": \"off\"}}",
    "{\"driver\": \"raw\", \"node-name\": \"d0\", \"read-only\": true, \"file\": "
    "{\"driver\": \"null-co\", \"size\": 1048576, \"read-zeroes\": false}}" },
  { "BlockdevOptions", "{\"driver\": \"raw\", \"node-name\": \"d0\", \"file\": \"f0\"}",
    "{\"driver\": \"raw\", \"node-name\": \"d0\", \"file\": \"f0\"}" },
  { "NbdServerOptions",
    "{\"addr\": {\"type\": \"unix\", \"path\": \"/n\"}, "
    "\"max-connections\": \"-1\"}",
    "ERR Parameter 'max-connections' expects uint32_t" },
  { "NbdServerOptions",
    "{\"addr\": {\"type\": \"unix\", \"path\": \"/n\"}, "
    "\"max-connections\": \"abc\"}",
    "ERR Parameter 'max-connections' expects integer" },
  { "NbdServerOptions",
    "{\"addr\": {\"type\": \"unix\", \"path\": \"/n\"}, "
    "\"max-connections\": \"5000000000\"}",
    "ERR Parameter 'max-connections' expects uint32_t" },
  { "NbdServerOptions", "{\"addr\": {\"type\": \"nope\"}}",
    "ERR Parameter 'type' does not accept value 'nope'" },
};

/* The JSON form of the same options (`--blockdev '{...}'`) is validated like QMP. */
static const Case compiled_json_cases[] = {
  { "BlockdevOptions", "{\"driver\": \"null-co\", \"node-name\": \"x\", \"size\": \"1\"}",
    "ERR Invalid parameter type for 'size', expected: integer" },
  { "BlockdevOptions", "{\"driver\": \"null-co\", \"node-name\": 1}",
    "ERR Invalid parameter type for 'node-name', expected: string" },
  { "BlockdevOptions",
    "{\"driver\": \"raw\", \"node-name\": \"x\", \"file\": {\"driver\": "
    "\"file\"}}",
    "ERR Parameter 'file.filename' is missing" },
};

static void
run_compiled(const Case *cases, gsize n, gboolean keyval)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtRpc) rpc = cbt_rpc_new(&error);

  g_assert_no_error(error);
  for (gsize i = 0; i < n; i++) {
    g_autoptr(JsonNode) in = cbt_rpc_json_parse(cases[i].in, -1, &error);
    g_assert_no_error(error);
    g_autoptr(JsonNode) out = cbt_rpc_check_type(rpc, cases[i].type, in, keyval, &error);
    g_autofree char *got =
      out ? cbt_json_to_string(out, FALSE) : g_strdup_printf("ERR %s", error->message);
    g_clear_error(&error);
    if (!same_json(got, cases[i].out)) {
      g_test_message("case %" G_GSIZE_FORMAT ": %s %s", i, cases[i].type, cases[i].in);
      g_assert_cmpstr(got, ==, cases[i].out);
    }
  }
}

static void
test_compiled_keyval(void)
{
  run_compiled(compiled_keyval_cases, G_N_ELEMENTS(compiled_keyval_cases), TRUE);
}

static void
test_compiled_json(void)
{
  run_compiled(compiled_json_cases, G_N_ELEMENTS(compiled_json_cases), FALSE);
}

/* The compiled-in schema loads, every command the daemon must provide is known, and its
 * introspection is self-consistent (every referenced name is defined exactly once). */
static void
test_compiled_introspection(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtRpc) rpc = cbt_rpc_new(&error);
  g_autoptr(GHashTable) names = g_hash_table_new(g_str_hash, g_str_equal);

  g_assert_no_error(error);
  g_assert_null(cbt_rpc_execute(rpc, "frobnicate", NULL, FALSE, &error));
  g_assert_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_COMMAND_NOT_FOUND);
  g_clear_error(&error);
  g_autoptr(JsonNode) list = cbt_rpc_execute(rpc, "query-qmp-schema", NULL, FALSE, &error);
  g_assert_no_error(error);
  JsonArray *arr = json_node_get_array(list);
  for (guint i = 0; i < json_array_get_length(arr); i++) {
    const char *n = json_object_get_string_member(json_array_get_object_element(arr, i), "name");
    g_assert_true(g_hash_table_add(names, (gpointer)n));
  }
  for (guint i = 0; i < json_array_get_length(arr); i++) {
    JsonObject *o = json_array_get_object_element(arr, i);
    static const char *const refs[] = { "arg-type", "ret-type", "element-type" };
    for (guint k = 0; k < G_N_ELEMENTS(refs); k++) {
      if (json_object_has_member(o, refs[k]))
        g_assert_true(g_hash_table_contains(names, json_object_get_string_member(o, refs[k])));
    }
  }
  g_assert_true(g_hash_table_contains(names, "blockdev-add"));
  g_assert_true(g_hash_table_contains(names, "BLOCK_EXPORT_DELETED"));
  /* Without the daemon's and modules' handlers the table is incomplete. */
  g_assert_false(cbt_rpc_check_complete(rpc, &error));
  g_assert_nonnull(strstr(error->message, "has no handler"));
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  schema = cbt_schema_load(test_schema, &error);
  g_assert_no_error(error);
  g_test_add_func("/schema/check/json", test_json_mode);
  g_test_add_func("/schema/check/keyval", test_keyval_mode);
  g_test_add_func("/schema/check/absent-and-copy", test_absent_and_copy);
  g_test_add_func("/schema/load-errors", test_load_errors);
  g_test_add_func("/schema/introspection", test_introspection);
  g_test_add_func("/schema/compiled/keyval", test_compiled_keyval);
  g_test_add_func("/schema/compiled/json", test_compiled_json);
  g_test_add_func("/schema/compiled/introspection", test_compiled_introspection);
  int ret = g_test_run();
  cbt_schema_free(schema);
  return ret;
}
