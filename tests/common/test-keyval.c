/* The command-line option syntax: QEMU's keyval rules and error texts (checked against
 * qemu-storage-daemon 7.2's answers to the same options). */
#include <json-glib/json-glib.h>

#include "common/keyval.h"
#include "rpc/rpc.h"

static char *
parse_to_json(const char *text, const char *implied, char **error_text)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) o = cbt_keyval_parse(text, implied, &error);
  if (!o) {
    *error_text = g_strdup(error->message);
    return NULL;
  }
  g_autoptr(JsonNode) n = json_node_init_object(json_node_alloc(), o);
  g_autoptr(JsonGenerator) gen = json_generator_new();
  json_generator_set_root(gen, n);
  return json_generator_to_data(gen, NULL);
}

static void
check_ok(const char *text, const char *implied, const char *expected)
{
  g_autofree char *err = NULL;
  g_autofree char *json = parse_to_json(text, implied, &err);
  g_assert_null(err);
  g_assert_cmpstr(json, ==, expected);
}

static void
check_error(const char *text, const char *implied, const char *expected)
{
  g_autofree char *err = NULL;
  g_autofree char *json = parse_to_json(text, implied, &err);
  g_assert_null(json);
  g_assert_cmpstr(err, ==, expected);
}

static void
test_keyval_basic(void)
{
  check_ok("driver=file,node-name=f0", NULL, "{\"driver\":\"file\",\"node-name\":\"f0\"}");
  check_ok("null-co,node-name=n", "driver", "{\"driver\":\"null-co\",\"node-name\":\"n\"}");
  check_ok("a=1,a=2", NULL, "{\"a\":\"2\"}");
  check_ok("x=a,,b", NULL, "{\"x\":\"a,b\"}");
  check_ok("x=", NULL, "{\"x\":\"\"}");
  check_ok("", NULL, "{}");
}

static void
test_keyval_nesting(void)
{
  check_ok("addr.type=unix,addr.path=/tmp/s", NULL,
           "{\"addr\":{\"type\":\"unix\",\"path\":\"/tmp/s\"}}");
  check_ok("bitmaps.0=a,bitmaps.1=b", NULL, "{\"bitmaps\":[\"a\",\"b\"]}");
  check_ok("bitmaps.1=b,bitmaps.0=a", NULL, "{\"bitmaps\":[\"a\",\"b\"]}");
  check_ok("l.0.node=n,l.0.name=b", NULL, "{\"l\":[{\"node\":\"n\",\"name\":\"b\"}]}");
}

static void
test_keyval_errors(void)
{
  check_error("driver=null-co,a..b=1", NULL, "Invalid parameter 'a..b'");
  check_error("null-co,node-name=n,size", "driver", "Expected '=' after parameter 'size'");
  check_error("null-co,node-name=n,=3", "driver", "Invalid parameter ''");
  check_error("null-co,null-co", "driver", "Expected '=' after parameter 'null-co'");
  check_error("node-name=n,null-co", "driver", "Expected '=' after parameter 'null-co'");
  check_error("size=1k,size.x=1", NULL, "Parameters 'size.*' used inconsistently");
  check_error("size.x=1,size=1k", NULL, "Parameters 'size.*' used inconsistently");
  check_error("bitmaps.1=x", NULL, "Parameter 'bitmaps.0' missing");
}

static void
test_option_json(void)
{
  gboolean is_json = FALSE;
  g_autoptr(GError) error = NULL;
  g_autoptr(JsonObject) o =
    cbt_rpc_option_parse(" {\"driver\": \"null-co\", \"size\": 4096}", "driver", &is_json, &error);
  g_assert_no_error(error);
  g_assert_true(is_json);
  g_assert_cmpint(json_object_get_int_member(o, "size"), ==, 4096);

  g_autoptr(JsonObject) bad = cbt_rpc_option_parse("{\"driver\":\"file\"", NULL, &is_json, &error);
  g_assert_null(bad);
  g_assert_true(g_str_has_prefix(error->message, "JSON parse error"));
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  g_test_add_func("/keyval/basic", test_keyval_basic);
  g_test_add_func("/keyval/nesting", test_keyval_nesting);
  g_test_add_func("/keyval/errors", test_keyval_errors);
  g_test_add_func("/keyval/json", test_option_json);
  return g_test_run();
}
