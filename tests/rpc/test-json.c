/* The JSON reader and writer against tables of inputs and QEMU's outputs (as observed on
 * qemu-storage-daemon 7.2: error texts, resynchronisation, numbers, escapes). */
#include "rpc/rpc-private.h"

#include <string.h>

/* Everything a stream emits for some input, one line per value or error. */
static void
collect(JsonNode *value, GError *error, gpointer user_data)
{
  GString *out = user_data;

  if (out->len)
    g_string_append_c(out, '\n');
  if (error) {
    /* As the wire shows it (escaped), minus the quotes and their escapes, for readability. */
    g_autoptr(JsonNode) msg = json_node_init_string(json_node_alloc(), error->message);
    g_autofree char *text = cbt_json_to_string(msg, FALSE);
    g_auto(GStrv) parts = NULL;

    text[strlen(text) - 1] = '\0';
    parts = g_strsplit(text + 1, "\\\"", -1);
    g_autofree char *joined = g_strjoinv("\"", parts);
    g_string_append_printf(out, "ERR %s", joined);
    g_error_free(error);
  } else {
    cbt_json_write(out, value, FALSE);
    json_node_unref(value);
  }
}

static char *
run_stream(const char *input, gsize len, gboolean flush)
{
  GString *out = g_string_new(NULL);
  CbtJsonStream *js = cbt_json_stream_new(CBT_RPC_MAX_MESSAGE, collect, out);

  /* Byte by byte: framing must not depend on how the input is split. */
  for (gsize i = 0; i < len; i++)
    cbt_json_stream_feed(js, input + i, 1);
  if (flush)
    cbt_json_stream_flush(js);
  cbt_json_stream_free(js);
  return g_string_free(out, FALSE);
}

typedef struct {
  const char *in;
  const char *out;
} Case;

/* Input fed as one stream (then flushed), expected emitted lines. */
static const Case parse_cases[] = {
  { "", "" },
  { "  \r\n\t ", "" },
  { "{}", "{}" },
  { "{\"a\":1}{\"b\":2}", "{\"a\": 1}\n{\"b\": 2}" },
  { "[1,2,[3,{}]]", "[1, 2, [3, {}]]" },
  { "'single'", "\"single\"" },
  { "'it\\'s \"q\"'", "\"it's \\\"q\\\"\"" },
  { "true false null", "true\nfalse\nnull" },
  { "@", "ERR JSON parse error, stray '@'" },
  { "-x", "ERR JSON parse error, stray '-x'" },
  { "{\"execute\":065536}",
    "ERR JSON parse error, stray '06'\nERR JSON parse error, expecting value" },
  { "{\"execute\": 0x10000}", "ERR JSON parse error, expected separator in dict" },
  { "{\"a\":1,\"a\":2}", "ERR JSON parse error, duplicate key" },
  { "{1:2}", "ERR JSON parse error, key is not a string in object" },
  { "{\"a\" 2}", "ERR JSON parse error, missing : in object pair" },
  { "[1 2]", "ERR JSON parse error, expected separator in list" },
  { "nul", "ERR JSON parse error, invalid keyword 'nul'" },
  { "]", "ERR JSON parse error, expecting value" },
  { "}{", "ERR JSON parse error, expecting value\nERR JSON parse error, premature EOI" },
  { "[}", "ERR JSON parse error, expecting value" },
  { "{\"execute\": }", "ERR JSON parse error, expecting value" },
  { "{\"a\":1,}", "ERR JSON parse error, expecting value" },
  { "\"\\x\"", "ERR JSON parse error, invalid escape sequence in string" },
  { "\"x\\ud83d\"", "ERR JSON parse error, \\\\ud83d is not a valid Unicode character" },
  { "\"x\\ude00\"", "ERR JSON parse error, \\\\ude00 is not a valid Unicode character" },
  { "\"x\\ud83d\\u0041\"", "ERR JSON parse error, \\\\ud83d is not a valid Unicode character" },
  { "\"x\\u12\"", "ERR JSON parse error, \\\\u12\" is not a valid Unicode character" },
  { "\"x\\ufffe\"", "ERR JSON parse error, \\\\ufffe is not a valid Unicode character" },
  { "\"\\ud83d\\ude00\"", "\"\\uD83D\\uDE00\"" },
  { "\"\\u0000\"", "\"\\u0000\"" },
  { "\"a\xc3\"", "ERR JSON parse error, invalid UTF-8 sequence in string" },
  { "\"\xc0\xaf\"", "ERR JSON parse error, invalid UTF-8 sequence in string" },
  { "\"\xed\xa0\x80\"", "ERR JSON parse error, invalid UTF-8 sequence in string" },
  { "\"\xff\"", "ERR JSON parse error, stray '\"\\uFFFD'" },
  { "\xff\xff", "ERR JSON parse error, stray '\\uFFFD'\nERR JSON parse error, stray '\\uFFFD'" },
  { "\xc3\xa9", "ERR JSON parse error, stray '\\uFFFD'" },
  { "\"a\nb\"", "ERR JSON parse error, stray '\"a\\n'" },
  /* Resynchronisation: garbage is skipped up to a structural or control character. */
  { "@garbage{\"a\":1}", "ERR JSON parse error, stray '@'\n{\"a\": 1}" },
  { "@garbage\n7 ", "ERR JSON parse error, stray '@'\n7" },
  { "\"\\x\" {}", "ERR JSON parse error, invalid escape sequence in string\n{}" },
  /* Numbers. */
  { "[1.0, 0.1, -0, -0.0, 1e20, 1E+2, 2.5e-3]",
    "[1, 0.10000000000000001, 0, -0, 1e+20, 100, 0.0025000000000000001]" },
  { "[9223372036854775807, -9223372036854775808, 9223372036854775808, 18446744073709551615]",
    "[9223372036854775807, -9223372036854775808, 9223372036854775808, 18446744073709551615]" },
  { "[18446744073709551616, -9223372036854775809, 123456789012345678901234567890]",
    "[1.8446744073709552e+19, -9.2233720368547758e+18, 1.2345678901234568e+29]" },
  { "1e400", "null" },
  { "0e5", "0\nERR JSON parse error, invalid keyword 'e'\n5" },
  { "1.", "ERR JSON parse error, stray '1.'" },
  { "1.e5", "ERR JSON parse error, stray '1.e'" },
};

static void
test_parse_table(void)
{
  for (guint i = 0; i < G_N_ELEMENTS(parse_cases); i++) {
    g_autofree char *got = run_stream(parse_cases[i].in, strlen(parse_cases[i].in), TRUE);
    if (g_strcmp0(got, parse_cases[i].out) != 0)
      g_test_message("case %u: input %s", i, parse_cases[i].in);
    g_assert_cmpstr(got, ==, parse_cases[i].out);
  }
}

/* A number or keyword at the end of the input waits for its terminator (as QEMU). */
static void
test_pending_token(void)
{
  g_autofree char *a = run_stream("1", 1, FALSE);
  g_autofree char *b = run_stream("1\n", 2, FALSE);
  g_autofree char *c = run_stream("{\"a\": tru", 9, FALSE);

  g_assert_cmpstr(a, ==, "");
  g_assert_cmpstr(b, ==, "1");
  g_assert_cmpstr(c, ==, "");
}

static void
test_nesting(void)
{
  GString *ok = g_string_new(NULL), *deep = g_string_new(NULL);

  for (int i = 0; i < CBT_RPC_MAX_DEPTH; i++)
    g_string_append_c(ok, '[');
  for (int i = 0; i < CBT_RPC_MAX_DEPTH; i++)
    g_string_append_c(ok, ']');
  g_autofree char *got = run_stream(ok->str, ok->len, TRUE);
  g_assert_true(g_str_has_prefix(got, "[[[[") && !strchr(got, 'E'));

  for (int i = 0; i <= CBT_RPC_MAX_DEPTH; i++)
    g_string_append_c(deep, '{');
  g_string_append(deep, " {\"a\": 1}");
  g_autofree char *err = run_stream(deep->str, deep->len, TRUE);
  g_assert_cmpstr(err, ==, "ERR JSON nesting depth limit exceeded\n{\"a\": 1}");
  g_string_free(ok, TRUE);
  g_string_free(deep, TRUE);
}

static void
test_too_big(void)
{
  GString *out = g_string_new(NULL);
  CbtJsonStream *js = cbt_json_stream_new(100, collect, out);
  char chunk[64];

  memset(chunk, 'a', sizeof(chunk));
  cbt_json_stream_feed(js, "{\"x\": \"", 7);
  cbt_json_stream_feed(js, chunk, sizeof(chunk));
  g_assert_cmpstr(out->str, ==, "");
  cbt_json_stream_feed(js, chunk, sizeof(chunk));
  g_assert_cmpstr(out->str, ==, "ERR JSON message size limit exceeded");
  cbt_json_stream_free(js);
  g_string_free(out, TRUE);
}

/* QEMU's limit of 2^21 tokens per message; the connection is then closed (TOO_BIG). */
static void
test_token_limit(void)
{
  GString *in = g_string_new("[");
  g_autoptr(GError) error = NULL;

  for (int i = 0; i < (1 << 20); i++)
    g_string_append(in, "1,");
  g_assert_null(cbt_rpc_json_parse(in->str, in->len, &error));
  g_assert_cmpstr(error->message, ==, "JSON token count limit exceeded");
  g_string_free(in, TRUE);
}

/* ---- writer ------------------------------------------------------------------------------ */

static char *
write_str(const char *s)
{
  g_autoptr(JsonNode) n = json_node_init_string(json_node_alloc(), s);
  return cbt_json_to_string(n, FALSE);
}

static void
test_write_strings(void)
{
  static const Case cases[] = {
    { "plain", "\"plain\"" },
    { "q\"b\\/", "\"q\\\"b\\\\/\"" },
    { "\b\f\n\r\t", "\"\\b\\f\\n\\r\\t\"" },
    { "\x01\x1f\x7f", "\"\\u0001\\u001F\\u007F\"" },
    { "\xc3\xa9\xe2\x82\xac", "\"\\u00E9\\u20AC\"" },
    { "\xf0\x9f\x98\x80", "\"\\uD83D\\uDE00\"" },
    { "bad\xff!", "\"bad\\uFFFD!\"" },
    { "\xc0\x80", "\"\\u0000\"" },
  };

  for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
    g_autofree char *got = write_str(cases[i].in);
    g_assert_cmpstr(got, ==, cases[i].out);
  }
}

static JsonNode *
parse_one(const char *text)
{
  g_autoptr(GError) error = NULL;
  JsonNode *node = cbt_rpc_json_parse(text, -1, &error);

  g_assert_no_error(error);
  return node;
}

static void
test_write_pretty(void)
{
  g_autoptr(JsonNode) a = parse_one("{\"return\": {}}");
  g_autoptr(JsonNode) b = parse_one("{\"a\": [1, {\"b\": []}], \"c\": \"d\"}");
  g_autofree char *pa = cbt_json_to_string(a, TRUE);
  g_autofree char *pb = cbt_json_to_string(b, TRUE);
  g_autofree char *cb = cbt_json_to_string(b, FALSE);

  g_assert_cmpstr(pa, ==, "{\r\n    \"return\": {\r\n    }\r\n}");
  g_assert_cmpstr(pb, ==,
                  "{\r\n    \"a\": [\r\n        1,\r\n        {\r\n            \"b\": [\r\n"
                  "            ]\r\n        }\r\n    ],\r\n    \"c\": \"d\"\r\n}");
  g_assert_cmpstr(cb, ==, "{\"a\": [1, {\"b\": []}], \"c\": \"d\"}");
}

/* uint64 above INT64_MAX survives copies and keeps its exact value. */
static void
test_big_uint(void)
{
  g_autoptr(JsonNode) n = cbt_json_uint_new(G_MAXUINT64);
  g_autoptr(JsonNode) copy = json_node_copy(n);
  g_autoptr(JsonNode) small = cbt_json_uint_new(5);
  g_autoptr(JsonNode) str = json_node_init_string(json_node_alloc(), "18446744073709551615");
  g_autofree char *s = cbt_json_to_string(copy, FALSE);
  g_autofree char *s2 = cbt_json_to_string(str, FALSE);
  guint64 v = 0;

  g_assert_true(cbt_json_get_big_uint(copy, &v));
  g_assert_cmpuint(v, ==, G_MAXUINT64);
  g_assert_false(cbt_json_get_big_uint(small, NULL));
  g_assert_false(cbt_json_get_big_uint(str, NULL));
  g_assert_cmpint(json_node_get_int(small), ==, 5);
  g_assert_cmpstr(s, ==, "18446744073709551615");
  g_assert_cmpstr(s2, ==, "\"18446744073709551615\"");
}

static void
test_parse_one(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonNode) n = cbt_rpc_json_parse("{'a': [1, 2.5]} ", -1, &error);
  g_autofree char *s = NULL;

  g_assert_no_error(error);
  s = cbt_json_to_string(n, FALSE);
  g_assert_cmpstr(s, ==, "{\"a\": [1, 2.5]}");
  g_assert_null(cbt_rpc_json_parse("{} {}", -1, &error));
  g_assert_cmpstr(error->message, ==, "Expecting at most one JSON value");
  g_clear_error(&error);
  g_assert_null(cbt_rpc_json_parse("{\"a\": ", -1, &error));
  g_assert_nonnull(error);
  g_clear_error(&error);
  g_assert_null(cbt_rpc_json_parse("  ", -1, &error));
  g_assert_cmpstr(error->message, ==, "Expecting a JSON value");
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  g_test_add_func("/json/parse/table", test_parse_table);
  g_test_add_func("/json/parse/pending-token", test_pending_token);
  g_test_add_func("/json/parse/nesting", test_nesting);
  g_test_add_func("/json/parse/too-big", test_too_big);
  g_test_add_func("/json/parse/token-limit", test_token_limit);
  g_test_add_func("/json/parse/one", test_parse_one);
  g_test_add_func("/json/write/strings", test_write_strings);
  g_test_add_func("/json/write/pretty", test_write_pretty);
  g_test_add_func("/json/write/big-uint", test_big_uint);
  return g_test_run();
}
