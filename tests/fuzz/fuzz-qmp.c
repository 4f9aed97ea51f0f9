/* tests/fuzz/fuzz-qmp.c — QMP requests on arbitrary bytes, through the monitor's own path: the
 * JSON stream parser, the dispatcher, the schema check and every command's handler, in an
 * in-process daemon with two file nodes and a running NBD server.
 *
 * Oracles beyond not crashing: every request gets one reply that is an object holding either
 * "return" or an "error" with a known class and a non-empty "desc", and the request's "id"
 * when it had one; and after each input, deleting what it made (exports, nodes, bitmaps,
 * objects, cancelling jobs) brings the daemon back to its first state, so no command leaves a
 * node pinned.
 * Requests that would reach outside the private directory (a file name, a directory, a
 * socket path, the NBD server's start and stop) are skipped.
 */
#include "fuzz-daemon.h"
#include "job/job.h"
#include "rpc/rpc-private.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_MESSAGE (64u << 10)

typedef struct {
  CbtRpcSession session;
  GPtrArray *object_ids; /* ids object-add was asked for: deleted afterwards */
} Input;

static const char *const outside_keys[] = { "filename", "dir", "path", "scratch-dir" };
static const char *const outside_commands[] = { "nbd-server-start", "nbd-server-stop" };

/* json-glib 1.6 has no _with_default for these. */
static JsonObject *
member_object(JsonObject *o, const char *name)
{
  JsonNode *n = json_object_get_member(o, name);
  return n && JSON_NODE_HOLDS_OBJECT(n) ? json_node_get_object(n) : NULL;
}

static JsonArray *
member_array(JsonObject *o, const char *name)
{
  JsonNode *n = json_object_get_member(o, name);
  return n && JSON_NODE_HOLDS_ARRAY(n) ? json_node_get_array(n) : NULL;
}

static const char *
member_string(JsonObject *o, const char *name)
{
  JsonNode *n = json_object_get_member(o, name);
  return n && JSON_NODE_HOLDS_VALUE(n) && json_node_get_value_type(n) == G_TYPE_STRING
           ? json_node_get_string(n)
           : NULL;
}

static gboolean
reaches_outside(JsonNode *node)
{
  if (JSON_NODE_HOLDS_ARRAY(node)) {
    for (guint i = 0; i < json_array_get_length(json_node_get_array(node)); i++)
      if (reaches_outside(json_array_get_element(json_node_get_array(node), i)))
        return TRUE;
  } else if (JSON_NODE_HOLDS_OBJECT(node)) {
    g_autoptr(GList) members = json_object_get_members(json_node_get_object(node));
    for (GList *l = members; l; l = l->next) {
      for (gsize k = 0; k < G_N_ELEMENTS(outside_keys); k++)
        if (strcmp(l->data, outside_keys[k]) == 0)
          return TRUE;
      if (reaches_outside(json_object_get_member(json_node_get_object(node), l->data)))
        return TRUE;
    }
  }
  return FALSE;
}

static gboolean
skipped(JsonNode *request, Input *in)
{
  if (!JSON_NODE_HOLDS_OBJECT(request))
    return FALSE;
  JsonObject *o = json_node_get_object(request);
  const char *cmd = member_string(o, "execute");
  if (!cmd)
    cmd = member_string(o, "exec-oob");
  if (!cmd)
    cmd = "";
  for (gsize k = 0; k < G_N_ELEMENTS(outside_commands); k++)
    if (strcmp(cmd, outside_commands[k]) == 0)
      return TRUE;
  if (reaches_outside(request))
    return TRUE;
  JsonObject *args = member_object(o, "arguments");
  const char *id = args ? member_string(args, "id") : NULL;
  if (strcmp(cmd, "object-add") == 0 && args && json_object_has_member(args, "file"))
    return TRUE; /* a secret read from a file */
  if (strcmp(cmd, "object-add") == 0 && id)
    g_ptr_array_add(in->object_ids, g_strdup(id));
  return FALSE;
}

static const char *const classes[] = { "GenericError", "CommandNotFound", "DeviceNotActive",
                                       "DeviceNotFound" };

static void
check_reply(JsonNode *request, JsonNode *reply)
{
  JsonObject *r = JSON_NODE_HOLDS_OBJECT(reply) ? json_node_get_object(reply) : NULL;
  gboolean ok = r && (json_object_has_member(r, "return") != json_object_has_member(r, "error"));

  if (ok && json_object_has_member(r, "error")) {
    JsonObject *e = member_object(r, "error");
    const char *cls = e ? member_string(e, "class") : NULL;
    const char *desc = e ? member_string(e, "desc") : NULL;
    gboolean known = FALSE;
    for (gsize k = 0; k < G_N_ELEMENTS(classes); k++)
      known |= cls && strcmp(cls, classes[k]) == 0;
    ok = known && desc && desc[0];
  }
  if (ok && request && JSON_NODE_HOLDS_OBJECT(request)) {
    JsonNode *id = json_object_get_member(json_node_get_object(request), "id");
    JsonNode *back = json_object_get_member(r, "id");
    ok = id ? back && json_node_equal(id, back) : !back;
  }
  if (!ok) {
    g_autofree char *text = cbt_rpc_json_to_string(reply, FALSE);
    fprintf(stderr, "malformed reply: %s\n", text);
    abort();
  }
}

static void
on_message(JsonNode *value, GError *error, gpointer user_data)
{
  Input *in = user_data;
  g_autoptr(JsonNode) reply = NULL;

  if (error) {
    reply = cbt_rpc_error_reply(error, NULL);
    g_error_free(error);
  } else if (skipped(value, in)) {
    json_node_unref(value);
    return;
  } else {
    reply = cbt_rpc_dispatch(fuzz_daemon.rpc, &in->session, value);
  }
  check_reply(value, reply);
  g_clear_pointer(&value, json_node_unref);
  fuzz_daemon_spin();
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_daemon_init_standard();
  return 0;
}

/* A command of the cleanup, with string arguments (key, value, ..., NULL), whose failure is not
 * the input's business. */
static JsonNode *
run_v(const char *command, va_list ap)
{
  g_autoptr(JsonObject) args = json_object_new();

  for (const char *key; (key = va_arg(ap, const char *));)
    json_object_set_string_member(args, key, va_arg(ap, const char *));
  JsonNode *ret = cbt_rpc_execute(fuzz_daemon.rpc, command, args, FALSE, NULL);
  fuzz_daemon_spin();
  return ret;
}

static JsonNode *
run(const char *command, ...)
{
  va_list ap;
  va_start(ap, command);
  JsonNode *ret = run_v(command, ap);
  va_end(ap);
  return ret;
}

static void
run_quietly(const char *command, ...)
{
  va_list ap;
  va_start(ap, command);
  JsonNode *ret = run_v(command, ap);
  va_end(ap);
  if (ret)
    json_node_unref(ret);
}

static gboolean
is_first_node(const char *name)
{
  return strcmp(name, "n0") == 0 || strcmp(name, "n1") == 0;
}

/* Delete what the input made; abort when the daemon cannot get back to its first state. */
static void
reset(Input *in)
{
  /* A job pins its nodes (its target and filter are blocked, its source held). */
  cbt_job_cancel_all();
  g_autoptr(JsonNode) exports = run("query-block-exports", NULL);
  for (guint i = 0; exports && i < json_array_get_length(json_node_get_array(exports)); i++) {
    JsonObject *e = json_array_get_object_element(json_node_get_array(exports), i);
    run_quietly("block-export-del", "id", json_object_get_string_member(e, "id"), "mode", "hard",
                NULL);
  }
  for (guint pass = 0; pass < 8; pass++) {
    g_autoptr(JsonNode) nodes = run("query-named-block-nodes", NULL);
    JsonArray *a = json_node_get_array(nodes);
    guint left = 0;
    for (guint i = 0; i < json_array_get_length(a); i++) {
      JsonObject *n = json_array_get_object_element(a, i);
      const char *name = json_object_get_string_member(n, "node-name");
      JsonArray *bitmaps = member_array(n, "dirty-bitmaps");
      for (guint j = 0; bitmaps && j < json_array_get_length(bitmaps); j++) {
        JsonObject *b = json_array_get_object_element(bitmaps, j);
        const char *bitmap = member_string(b, "name");
        if (bitmap) /* else an internal one (a filter's), which goes with its node */
          run_quietly("block-dirty-bitmap-remove", "node", name, "name", bitmap, NULL);
      }
      if (is_first_node(name))
        continue;
      left++;
      run_quietly("blockdev-del", "node-name", name, NULL);
    }
    if (!left)
      break;
  }
  for (guint i = 0; i < in->object_ids->len; i++) {
    run_quietly("object-del", "id", in->object_ids->pdata[i], NULL);
  }
  g_autoptr(JsonNode) nodes = run("query-named-block-nodes", NULL);
  if (json_array_get_length(json_node_get_array(nodes)) != 2) {
    g_autofree char *text = cbt_rpc_json_to_string(nodes, FALSE);
    fprintf(stderr, "nodes left behind: %s\n", text);
    abort();
  }
}

/* The first byte: bit 0 starts the session negotiated (as after qmp_capabilities), bits 1-3
 * cut the rest into feeds of 1 << n bytes (the monitor feeds whatever recv returned). */
int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  Input in = { .object_ids = g_ptr_array_new_with_free_func(g_free) };
  in.session.negotiated = data[0] & 1;
  gsize feed = (gsize)1 << ((data[0] >> 1) & 7);
  CbtJsonStream *js = cbt_json_stream_new(MAX_MESSAGE, on_message, &in);
  for (gsize at = 1; at < size; at += feed)
    cbt_json_stream_feed(js, (const char *)data + at, MIN(feed, size - at));
  cbt_json_stream_flush(js);
  cbt_json_stream_free(js);
  reset(&in);
  g_ptr_array_unref(in.object_ids);
  return 0;
}
