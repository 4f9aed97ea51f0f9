/* The QMP monitor over a real unix socket, in-process: the rpc serves on the main thread's
 * GMainLoop; each test body runs in a client thread with blocking sockets (GSocketClient), so
 * a monitor that blocked the main loop would make the test time out. */
#include "common/assert.h"
#include "rpc/rpc-private.h"
#include "cbt-config.h"

#include <gio/gunixsocketaddress.h>
#include <glib/gstdio.h>
#include <string.h>

static const char test_schema[] =
  "[{\"enum\": \"QMPCapability\", \"data\": [\"oob\"]},"
  " {\"command\": \"qmp_capabilities\", \"data\": {\"*enable\": [\"QMPCapability\"]}},"
  " {\"struct\": \"VersionTriple\", \"data\": {\"major\": \"int\", \"minor\": \"int\","
  "  \"micro\": \"int\"}},"
  " {\"struct\": \"VersionInfo\", \"data\": {\"qemu\": \"VersionTriple\", \"package\": \"str\"}},"
  " {\"command\": \"query-version\", \"returns\": \"VersionInfo\"},"
  " {\"struct\": \"CommandInfo\", \"data\": {\"name\": \"str\"}},"
  " {\"command\": \"query-commands\", \"returns\": [\"CommandInfo\"]},"
  " {\"command\": \"query-qmp-schema\", \"returns\": [\"any\"]},"
  " {\"command\": \"echo\", \"data\": {\"value\": \"any\", \"*count\": \"uint32\"},"
  "  \"returns\": \"any\"},"
  " {\"command\": \"fail\", \"data\": {\"*class\": \"int\"}},"
  " {\"command\": \"emit\", \"data\": {\"id\": \"str\"}},"
  " {\"event\": \"TEST_EVENT\", \"data\": {\"id\": \"str\"}}]";

typedef struct {
  CbtRpc *rpc;
  char *dir;
  char *path;
  char *pretty_path;
  GMainLoop *loop;
  void (*body)(gpointer fixture);
  int handler_calls;
} Fixture;

static JsonNode *
cmd_echo(JsonObject *args, gpointer user_data, GError **error)
{
  Fixture *f = user_data;

  g_atomic_int_inc(&f->handler_calls);
  return json_node_copy(json_object_get_member(args, "value"));
}

static JsonNode *
cmd_fail(JsonObject *args, gpointer user_data, GError **error)
{
  int cls = json_object_has_member(args, "class") ? json_object_get_int_member(args, "class") : 0;

  if (cls >= 0)
    g_set_error(error, CBT_RPC_ERROR, cls, "Failure of class %d", cls);
  else
    g_set_error_literal(error, G_IO_ERROR, G_IO_ERROR_FAILED, "Some other domain");
  return NULL;
}

static JsonNode *
cmd_emit(JsonObject *args, gpointer user_data, GError **error)
{
  Fixture *f = user_data;
  JsonObject *data = json_object_new();

  json_object_set_string_member(data, "id", json_object_get_string_member(args, "id"));
  cbt_rpc_emit_event(f->rpc, "TEST_EVENT", data);
  return cbt_rpc_empty_return();
}

static void
fixture_setup(Fixture *f, gconstpointer data)
{
  static const CbtRpcCommand cmds[] = {
    { "echo", cmd_echo },
    { "fail", cmd_fail },
    { "emit", cmd_emit },
  };
  g_autoptr(GError) error = NULL;

  f->dir = g_dir_make_tmp("cbt-rpc-test-XXXXXX", &error);
  g_assert_no_error(error);
  f->path = g_build_filename(f->dir, "qmp.sock", NULL);
  f->pretty_path = g_build_filename(f->dir, "qmp-pretty.sock", NULL);
  f->rpc = cbt_rpc_new_with_schema(test_schema, &error);
  g_assert_no_error(error);
  cbt_rpc_register(f->rpc, cmds, G_N_ELEMENTS(cmds), f);
  g_assert_true(cbt_rpc_check_complete(f->rpc, &error));
  g_assert_true(cbt_rpc_listen_unix(f->rpc, f->path, FALSE, &error));
  g_assert_true(cbt_rpc_listen_unix(f->rpc, f->pretty_path, TRUE, &error));
  g_assert_no_error(error);
  f->loop = g_main_loop_new(NULL, FALSE);
}

static void
fixture_teardown(Fixture *f, gconstpointer data)
{
  cbt_rpc_free(f->rpc);
  /* Closing removes the socket files, so the directory must be empty now. */
  g_assert_cmpint(g_rmdir(f->dir), ==, 0);
  g_main_loop_unref(f->loop);
  g_free(f->path);
  g_free(f->pretty_path);
  g_free(f->dir);
}

/* ---- a blocking test client ----------------------------------------------------------------- */

typedef struct {
  GSocketConnection *conn;
  GString *buf;
} Client;

static Client *
client_connect(const char *path)
{
  g_autoptr(GSocketClient) sc = g_socket_client_new();
  g_autoptr(GSocketAddress) addr = g_unix_socket_address_new(path);
  g_autoptr(GError) error = NULL;
  Client *c = g_new0(Client, 1);

  c->conn = g_socket_client_connect(sc, G_SOCKET_CONNECTABLE(addr), NULL, &error);
  g_assert_no_error(error);
  g_socket_set_timeout(g_socket_connection_get_socket(c->conn), 20);
  c->buf = g_string_new(NULL);
  return c;
}

static void
client_close(Client *c)
{
  g_io_stream_close(G_IO_STREAM(c->conn), NULL, NULL);
  g_object_unref(c->conn);
  g_string_free(c->buf, TRUE);
  g_free(c);
}

static void
client_send(Client *c, const char *data, gssize len)
{
  g_autoptr(GError) error = NULL;
  GOutputStream *out = g_io_stream_get_output_stream(G_IO_STREAM(c->conn));

  g_output_stream_write_all(out, data, len < 0 ? strlen(data) : (gsize)len, NULL, NULL, &error);
  g_assert_no_error(error);
}

/* The next "\r\n"-terminated message without its line end, or NULL at EOF. */
static char *
client_recv(Client *c)
{
  GInputStream *in = g_io_stream_get_input_stream(G_IO_STREAM(c->conn));
  char chunk[65536];

  for (;;) {
    char *nl = strstr(c->buf->str, "\r\n");
    if (nl) {
      char *line = g_strndup(c->buf->str, nl - c->buf->str);
      g_string_erase(c->buf, 0, nl - c->buf->str + 2);
      return line;
    }
    g_autoptr(GError) error = NULL;
    gssize n = g_input_stream_read(in, chunk, sizeof(chunk), NULL, &error);
    if (n <= 0)
      return NULL;
    g_string_append_len(c->buf, chunk, n);
  }
}

static void
expect(Client *c, const char *want)
{
  g_autofree char *got = client_recv(c);
  g_assert_cmpstr(got, ==, want);
}

static char *
greeting_text(void)
{
  return g_strdup_printf("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, "
                         "\"major\": 7}, \"package\": \"%s\"}, \"capabilities\": [\"oob\"]}}",
                         CBT_PACKAGE);
}

static Client *
client_open(Fixture *f, gboolean negotiate)
{
  Client *c = client_connect(f->path);
  g_autofree char *greeting = greeting_text();

  expect(c, greeting);
  if (negotiate) {
    client_send(c, "{\"execute\": \"qmp_capabilities\"}", -1);
    expect(c, "{\"return\": {}}");
  }
  return c;
}

/* ---- running a body in a client thread while the main loop serves -------------------------- */

static gboolean
quit_loop(gpointer data)
{
  g_main_loop_quit(data);
  return G_SOURCE_REMOVE;
}

static gpointer
body_thread(gpointer data)
{
  Fixture *f = data;

  f->body(f);
  g_idle_add(quit_loop, f->loop);
  return NULL;
}

static void
run(Fixture *f, gconstpointer body)
{
  f->body = body;
  GThread *t = g_thread_new("client", body_thread, f);
  g_main_loop_run(f->loop);
  g_thread_join(t);
}

/* ---- tests ------------------------------------------------------------------------------------
 */

static void
body_greeting_negotiation(gpointer data)
{
  Fixture *f = data;
  Client *c = client_open(f, FALSE);

  client_send(c, "{\"execute\": \"query-version\", \"id\": 1}", -1);
  expect(c, "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": "
            "\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}");
  client_send(c, "{\"execute\": \"frobnicate\"}", -1);
  expect(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
            "\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}");
  client_send(c, "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}}", -1);
  expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
            "\"Parameter 'null' does not accept value 'foo'\"}}");
  client_send(c, "{\"exec-oob\": \"query-version\"}", -1);
  expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
            "\"QMP input member 'exec-oob' is unexpected\"}}");
  client_send(c, "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}", -1);
  expect(c, "{\"return\": {}}");
  client_send(c, "{\"execute\": \"qmp_capabilities\"}", -1);
  expect(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
            "\"Capabilities negotiation is already complete, command ignored\"}}");
  client_send(c, "{\"exec-oob\": \"query-version\"}", -1);
  expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
            "\"The command query-version does not support OOB\"}}");
  client_send(c, "{\"execute\": \"query-version\", \"exec-oob\": \"query-version\"}", -1);
  expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
            "\"QMP input member 'execute' clashes with 'exec-oob'\"}}");
  client_send(c, "{\"execute\": \"query-version\"}", -1);
  g_autofree char *want = g_strdup_printf("{\"return\": {\"qemu\": {\"micro\": 0, \"minor\": 2, "
                                          "\"major\": 7}, \"package\": \"%s\"}}",
                                          CBT_PACKAGE);
  expect(c, want);
  client_close(c);
}

static const struct {
  const char *in;
  const char *out;
} request_cases[] = {
  { "{\"execute\": \"frobnicate\", \"id\": \"x\"}",
    "{\"id\": \"x\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": "
    "\"The command frobnicate has not been found\"}}" },
  { "{\"id\": 5}", "{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": "
                   "\"QMP input lacks member 'execute'\"}}" },
  { "{\"execute\": 1}", "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                        "\"QMP input member 'execute' must be a string\"}}" },
  { "{\"execute\": \"echo\", \"arguments\": []}",
    "{\"error\": {\"class\": \"GenericError\", "
    "\"desc\": \"QMP input member 'arguments' must be an object\"}}" },
  { "{\"execute\": \"echo\", \"arguments\": null}",
    "{\"error\": {\"class\": \"GenericError\", "
    "\"desc\": \"QMP input member 'arguments' must be an object\"}}" },
  { "{\"execute\": \"echo\", \"foo\": 1}", "{\"error\": {\"class\": \"GenericError\", "
                                           "\"desc\": \"QMP input member 'foo' is unexpected\"}}" },
  { "[1, 2]", "{\"error\": {\"class\": \"GenericError\", \"desc\": "
              "\"QMP input must be a JSON object\"}}" },
  { "\"hello\"", "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                 "\"QMP input must be a JSON object\"}}" },
  { "@", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '@'\"}}" },
  { "{\"execute\": \"echo\"}", "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                               "\"Parameter 'value' is missing\"}}" },
  { "{\"execute\": \"echo\", \"arguments\": {\"value\": 1, \"count\": -1}}",
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'count' expects "
    "uint32_t\"}}" },
  { "{\"execute\": \"echo\", \"arguments\": {\"value\": 1, \"count\": 1.5}}",
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'count' expects uint64\"}}" },
  { "{\"execute\": \"query-version\", \"arguments\": {\"x\": 1}}",
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'x' is unexpected\"}}" },
  /* ids of every JSON type come back verbatim; success puts it last, errors first. */
  { "{\"execute\": \"echo\", \"arguments\": {\"value\": \"\\u00e9\"},"
    " \"id\": {\"a\": [null, true]}}",
    "{\"return\": \"\\u00E9\", \"id\": {\"a\": [null, true]}}" },
  { "{'execute': 'echo', 'arguments': {'value': 1}, 'id': 18446744073709551615}",
    "{\"return\": 1, \"id\": 18446744073709551615}" },
  { "{\"execute\": \"echo\", \"arguments\": {\"value\": [0.1, -0.0]}, \"id\": 1e400}",
    "{\"return\": [0.10000000000000001, -0], \"id\": null}" },
  { "{\"execute\": \"fail\", \"id\": [1]}",
    "{\"id\": [1], \"error\": {\"class\": "
    "\"GenericError\", \"desc\": \"Failure of class 0\"}}" },
  { "{\"execute\": \"fail\", \"arguments\": {\"class\": 3}}",
    "{\"error\": {\"class\": "
    "\"DeviceNotFound\", \"desc\": \"Failure of class 3\"}}" },
  { "{\"execute\": \"fail\", \"arguments\": {\"class\": 2}}",
    "{\"error\": {\"class\": "
    "\"DeviceNotActive\", \"desc\": \"Failure of class 2\"}}" },
  { "{\"execute\": \"fail\", \"arguments\": {\"class\": -1}}",
    "{\"error\": {\"class\": "
    "\"GenericError\", \"desc\": \"Some other domain\"}}" },
};

static void
body_requests(gpointer data)
{
  Fixture *f = data;
  Client *c = client_open(f, TRUE);

  for (guint i = 0; i < G_N_ELEMENTS(request_cases); i++) {
    client_send(c, request_cases[i].in, -1);
    expect(c, request_cases[i].out);
  }
  /* Two requests in one write, no newline between them. */
  client_send(c,
              "{\"execute\": \"echo\", \"arguments\": {\"value\": 1}}"
              "{\"execute\": \"echo\", \"arguments\": {\"value\": 2}}",
              -1);
  expect(c, "{\"return\": 1}");
  expect(c, "{\"return\": 2}");
  /* Whitespace only: nothing comes back, the next request still works. */
  client_send(c, "  \r\n\t\n", -1);
  client_send(c, "{\"execute\": \"echo\", \"arguments\": {\"value\": 3}}", -1);
  expect(c, "{\"return\": 3}");
  client_close(c);
}

static void
body_pretty(gpointer data)
{
  Fixture *f = data;
  Client *c = client_connect(f->pretty_path);
  g_autofree char *greeting = client_recv(c);

  g_assert_cmpstr(greeting, ==, "{");
  g_free(client_recv(c)); /* "    \"QMP\": {" */
  for (;;) {
    g_autofree char *line = client_recv(c);
    g_assert_nonnull(line);
    if (g_str_equal(line, "}"))
      break;
  }
  client_send(c, "{\"execute\": \"qmp_capabilities\"}", -1);
  expect(c, "{");
  expect(c, "    \"return\": {");
  expect(c, "    }");
  expect(c, "}");
  client_close(c);
}

static gboolean
wait_quiet(Client *c)
{
  /* TRUE when nothing arrives for a short while. */
  GSocket *s = g_socket_connection_get_socket(c->conn);
  return c->buf->len == 0 && g_socket_condition_timed_wait(s, G_IO_IN, 200000, NULL, NULL) == FALSE;
}

static void
body_events(gpointer data)
{
  Fixture *f = data;
  Client *a = client_open(f, TRUE);
  Client *b = client_open(f, FALSE); /* not negotiated: gets no events */

  client_send(a, "{\"execute\": \"emit\", \"arguments\": {\"id\": \"e1\"}}", -1);
  expect(a, "{\"return\": {}}");
  g_autofree char *ev = client_recv(a);
  g_autoptr(JsonNode) node = cbt_rpc_json_parse(ev, -1, NULL);
  JsonObject *o = json_node_get_object(node);
  g_assert_cmpstr(json_object_get_string_member(o, "event"), ==, "TEST_EVENT");
  g_assert_cmpstr(json_object_get_string_member(json_object_get_object_member(o, "data"), "id"), ==,
                  "e1");
  JsonObject *ts = json_object_get_object_member(o, "timestamp");
  gint64 secs = json_object_get_int_member(ts, "seconds");
  gint64 usecs = json_object_get_int_member(ts, "microseconds");
  g_assert_cmpint(ABS(secs - g_get_real_time() / G_USEC_PER_SEC), <=, 5);
  g_assert_cmpint(usecs, >=, 0);
  g_assert_cmpint(usecs, <, 1000000);
  g_assert_true(g_str_has_prefix(ev, "{\"timestamp\": {\"seconds\": "));

  /* From this (non-main) thread: delivery happens on the main context. */
  JsonObject *d = json_object_new();
  json_object_set_string_member(d, "id", "thread");
  cbt_rpc_emit_event(f->rpc, "TEST_EVENT", d);
  g_autofree char *ev2 = client_recv(a);
  g_assert_nonnull(strstr(ev2, "\"data\": {\"id\": \"thread\"}"));
  g_assert_true(wait_quiet(b));
  client_close(a);
  client_close(b);
}

/* Two clients, each with half a message pending at times: each parser is independent. */
static void
body_interleaved(gpointer data)
{
  Fixture *f = data;
  Client *a = client_open(f, TRUE);
  Client *b = client_open(f, TRUE);

  for (int i = 0; i < 20; i++) {
    client_send(a, "{\"execute\": \"echo\", \"arguments\": {\"value\": ", -1);
    client_send(b, "{\"execute\": \"echo\", \"arguments\": {\"value\": \"b\"", -1);
    client_send(a, "\"a\"}}", -1);
    expect(a, "{\"return\": \"a\"}");
    client_send(b, "}}", -1);
    expect(b, "{\"return\": \"b\"}");
  }
  client_close(a);
  client_close(b);
}

typedef struct {
  Fixture *f;
  int n;
} FloodArgs;

static gpointer
flood_thread(gpointer data)
{
  FloodArgs *fa = data;
  Client *c = client_open(fa->f, TRUE);
  GString *junk = g_string_new(NULL);

  for (int i = 0; i < fa->n; i++)
    g_string_append(junk, i % 2 ? "{\"execute\": 1}\n" : "@\n");
  client_send(c, junk->str, junk->len);
  for (int i = 0; i < fa->n; i++) {
    g_autofree char *line = client_recv(c);
    g_assert_nonnull(line);
    g_assert_nonnull(strstr(line, "GenericError"));
  }
  g_string_free(junk, TRUE);
  client_close(c);
  return NULL;
}

/* One client floods malformed input while another's commands all succeed, interleaved. */
static void
body_flood(gpointer data)
{
  Fixture *f = data;
  FloodArgs fa = { f, 1000 };
  Client *good = client_open(f, TRUE);
  GThread *t = g_thread_new("flood", flood_thread, &fa);

  for (int i = 0; i < 200; i++) {
    g_autofree char *req =
      g_strdup_printf("{\"execute\": \"echo\", \"arguments\": {\"value\": %d}, \"id\": %d}", i, i);
    g_autofree char *want = g_strdup_printf("{\"return\": %d, \"id\": %d}", i, i);
    client_send(good, req, -1);
    expect(good, want);
  }
  g_thread_join(t);
  client_close(good);
}

/* A message over CBT_RPC_MAX_MESSAGE gets an error, then only that client is closed. */
static void
body_oversize(gpointer data)
{
  Fixture *f = data;
  Client *big = client_open(f, TRUE);
  Client *other = client_open(f, TRUE);
  gsize n = CBT_RPC_MAX_MESSAGE + 1024;
  char *payload = g_malloc(n);

  memset(payload, 'a', n);
  client_send(big, "{\"execute\": \"echo\", \"arguments\": {\"value\": \"", -1);
  /* The server may close while we are still writing: ignore write errors here. */
  g_output_stream_write_all(g_io_stream_get_output_stream(G_IO_STREAM(big->conn)), payload, n, NULL,
                            NULL, NULL);
  g_free(payload);
  expect(big, "{\"error\": {\"class\": \"GenericError\", \"desc\": "
              "\"JSON message size limit exceeded\"}}");
  g_assert_null(client_recv(big));
  client_send(other, "{\"execute\": \"echo\", \"arguments\": {\"value\": \"ok\"}}", -1);
  expect(other, "{\"return\": \"ok\"}");
  client_close(big);
  client_close(other);
}

/* A client vanishing in the middle of a message is dropped quietly; nothing runs. */
static void
body_vanish(gpointer data)
{
  Fixture *f = data;
  int before = g_atomic_int_get(&f->handler_calls);

  for (int i = 0; i < 20; i++) {
    Client *c = client_open(f, i % 2);
    client_send(c, "{\"execute\": \"echo\", \"arguments\": {\"value\": \"unfinis", -1);
    client_close(c);
  }
  Client *c = client_open(f, TRUE);
  client_send(c, "{\"execute\": \"echo\", \"arguments\": {\"value\": 7}}", -1);
  expect(c, "{\"return\": 7}");
  g_assert_cmpint(g_atomic_int_get(&f->handler_calls), ==, before + 1);
  client_close(c);
}

/* A client that never reads its replies does not hold up another one. */
static void
body_slow_reader(gpointer data)
{
  Fixture *f = data;
  Client *slow = client_open(f, TRUE);
  Client *fast = client_open(f, TRUE);
  GString *reqs = g_string_new(NULL);

  /* Large replies, never read: the server's output queue for @slow fills up. */
  for (int i = 0; i < 1000; i++)
    g_string_append_printf(reqs, "{\"execute\": \"query-qmp-schema\", \"id\": %d}", i);
  client_send(slow, reqs->str, reqs->len);
  for (int i = 0; i < 50; i++) {
    client_send(fast, "{\"execute\": \"echo\", \"arguments\": {\"value\": true}}", -1);
    expect(fast, "{\"return\": true}");
  }
  g_string_free(reqs, TRUE);
  client_close(slow);
  client_close(fast);
}

static void
body_introspection(gpointer data)
{
  Fixture *f = data;
  Client *c = client_open(f, TRUE);

  client_send(c, "{\"execute\": \"query-commands\"}", -1);
  expect(c, "{\"return\": [{\"name\": \"qmp_capabilities\"}, {\"name\": \"query-version\"}, "
            "{\"name\": \"query-commands\"}, {\"name\": \"query-qmp-schema\"}, "
            "{\"name\": \"echo\"}, {\"name\": \"fail\"}, {\"name\": \"emit\"}]}");
  client_send(c, "{\"execute\": \"query-qmp-schema\"}", -1);
  g_autofree char *schema = client_recv(c);
  /* Byte for byte in QEMU's member order. */
  g_assert_true(g_str_has_prefix(schema, "{\"return\": [{\"name\": \"qmp_capabilities\", "
                                         "\"ret-type\": \"0\", \"meta-type\": \"command\", "
                                         "\"arg-type\": \"1\"}, "));
  client_close(c);
}

typedef struct {
  Client *c;
  int events;
  gboolean eof;
} Reader;

static gpointer
reader_thread(gpointer data)
{
  Reader *r = data;
  char *line;

  while ((line = client_recv(r->c))) {
    r->events += strstr(line, "\"event\": \"TEST_EVENT\"") != NULL;
    g_free(line);
  }
  r->eof = TRUE;
  return NULL;
}

/* Queued events reach a client before the monitors close when the daemon flushes first
 * (its exit path after quit). Runs on the main thread: flush drives the main context. */
static void
test_flush(Fixture *f, gconstpointer data)
{
  Client *c = client_connect(f->path);
  Reader r = { c, 0, FALSE };
  g_autofree char *blob = g_strnfill(2000, 'x');

  while (!g_socket_condition_check(g_socket_connection_get_socket(c->conn), G_IO_IN))
    g_main_context_iteration(NULL, TRUE);
  g_free(client_recv(c)); /* greeting */
  client_send(c, "{\"execute\": \"qmp_capabilities\"}", -1);
  while (!g_socket_condition_check(g_socket_connection_get_socket(c->conn), G_IO_IN))
    g_main_context_iteration(NULL, TRUE);
  g_autofree char *reply = client_recv(c);
  g_assert_cmpstr(reply, ==, "{\"return\": {}}");

  GThread *t = g_thread_new("reader", reader_thread, &r);
  for (int i = 0; i < 1000; i++) { /* ~2 MB: far more than a socket buffer holds */
    JsonObject *d = json_object_new();
    json_object_set_string_member(d, "id", blob);
    cbt_rpc_emit_event(f->rpc, "TEST_EVENT", d);
  }
  cbt_rpc_flush(f->rpc, 20000);
  cbt_rpc_close_all(f->rpc);
  g_thread_join(t);
  g_assert_true(r.eof);
  g_assert_cmpint(r.events, ==, 1000);
  client_close(c);
}

/* Listening: QEMU's error texts; a stale socket file is replaced, any other file kept. */
static void
test_listen(Fixture *f, gconstpointer data)
{
  g_autoptr(GError) error = NULL;
  g_autofree char *regular = g_build_filename(f->dir, "regular", NULL);
  g_autofree char *stale = g_build_filename(f->dir, "stale.sock", NULL);
  g_autofree char *missing = g_build_filename(f->dir, "nodir", "q.sock", NULL);
  g_autofree char *want =
    g_strdup_printf("Failed to bind socket to %s: No such file or directory", missing);

  g_assert_false(cbt_rpc_listen_unix(f->rpc, missing, FALSE, &error));
  g_assert_cmpstr(error->message, ==, want);
  g_clear_error(&error);

  g_assert_true(g_file_set_contents(regular, "keep", -1, NULL));
  g_assert_false(cbt_rpc_listen_unix(f->rpc, regular, FALSE, &error));
  g_assert_nonnull(strstr(error->message, "Address already in use"));
  g_clear_error(&error);
  g_autofree char *kept = NULL;
  g_assert_true(g_file_get_contents(regular, &kept, NULL, NULL));
  g_assert_cmpstr(kept, ==, "keep");
  g_assert_cmpint(g_unlink(regular), ==, 0);

  /* A socket file left by a dead process. */
  g_autoptr(GSocket) old = g_socket_new(G_SOCKET_FAMILY_UNIX, G_SOCKET_TYPE_STREAM, 0, NULL);
  g_autoptr(GSocketAddress) addr = g_unix_socket_address_new(stale);
  g_assert_true(g_socket_bind(old, addr, FALSE, NULL));
  g_socket_close(old, NULL);
  g_assert_true(g_file_test(stale, G_FILE_TEST_EXISTS));
  g_assert_true(cbt_rpc_listen_unix(f->rpc, stale, FALSE, &error));
  g_assert_no_error(error);

  GString *longpath = g_string_new(f->dir);
  while (longpath->len < 120)
    g_string_append(longpath, "/x");
  g_assert_false(cbt_rpc_listen_unix(f->rpc, longpath->str, FALSE, &error));
  g_assert_true(g_str_has_prefix(error->message, "UNIX socket path '"));
  g_string_free(longpath, TRUE);
}

int
main(int argc, char **argv)
{
  static const struct {
    const char *path;
    void (*body)(gpointer);
  } tests[] = {
    { "/monitor/greeting-negotiation", body_greeting_negotiation },
    { "/monitor/requests", body_requests },
    { "/monitor/pretty", body_pretty },
    { "/monitor/events", body_events },
    { "/monitor/interleaved", body_interleaved },
    { "/monitor/flood", body_flood },
    { "/monitor/oversize", body_oversize },
    { "/monitor/vanish", body_vanish },
    { "/monitor/slow-reader", body_slow_reader },
    { "/monitor/introspection", body_introspection },
  };

  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  for (guint i = 0; i < G_N_ELEMENTS(tests); i++)
    g_test_add(tests[i].path, Fixture, tests[i].body, fixture_setup, run, fixture_teardown);
  g_test_add("/monitor/flush", Fixture, NULL, fixture_setup, test_flush, fixture_teardown);
  g_test_add("/monitor/listen", Fixture, NULL, fixture_setup, test_listen, fixture_teardown);
  return g_test_run();
}
