/* common/qmp-client.c — the blocking QMP client (see qmp-client.h). */
#include "common/qmp-client.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/sockets.h"

G_DEFINE_QUARK(cbt - qmp - client - error - quark, cbt_qmp_client_error)

#define READ_CHUNK 65536

struct CbtQmpClient {
  int fd;
  guint timeout_ms;
  GString *in;   /* received, not yet framed */
  GQueue events; /* JsonObject *, oldest first */
  JsonObject *greeting;
  char *error_class;  /* of the last error reply */
  JsonParser *parser; /* kept: one per message would cost more than the round trip's I/O */
};

static const char *const classes[] = {
  [CBT_QMP_CLIENT_ERROR_GENERIC] = "GenericError",
  [CBT_QMP_CLIENT_ERROR_COMMAND_NOT_FOUND] = "CommandNotFound",
  [CBT_QMP_CLIENT_ERROR_DEVICE_NOT_ACTIVE] = "DeviceNotActive",
  [CBT_QMP_CLIENT_ERROR_DEVICE_NOT_FOUND] = "DeviceNotFound",
};

/* ---- framing ------------------------------------------------------------------------------- */

/* The length of the first complete JSON value in @s (an object or array at the top), or 0
 * when it has not all arrived. Leading white space counts towards it. */
static gsize
frame(const char *s, gsize len)
{
  int depth = 0;
  gboolean in_string = FALSE, escape = FALSE, started = FALSE;

  for (gsize i = 0; i < len; i++) {
    char ch = s[i];
    if (in_string) {
      if (escape)
        escape = FALSE;
      else if (ch == '\\')
        escape = TRUE;
      else if (ch == '"')
        in_string = FALSE;
      continue;
    }
    if (ch == '"') {
      in_string = TRUE;
    } else if (ch == '{' || ch == '[') {
      depth++;
      started = TRUE;
    } else if ((ch == '}' || ch == ']') && --depth == 0 && started) {
      return i + 1;
    }
  }
  return 0;
}

/* Wait until @fd is readable or the timeout (0: for ever). */
static gboolean
wait_input(CbtQmpClient *c, guint timeout_ms, GError **error)
{
  struct pollfd pfd = { .fd = c->fd, .events = POLLIN };

  for (;;) {
    int r = poll(&pfd, 1, timeout_ms ? (int)timeout_ms : -1);
    if (r > 0)
      return TRUE;
    if (r == 0) {
      g_set_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO,
                  "no answer from the server within %u ms", timeout_ms);
      return FALSE;
    }
    if (errno != EINTR) {
      g_set_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO, "poll: %s",
                  g_strerror(errno));
      return FALSE;
    }
  }
}

/* The next message from the server, an object (transfer full). */
static JsonObject *
read_message(CbtQmpClient *c, guint timeout_ms, GError **error)
{
  for (;;) {
    gsize n = frame(c->in->str, c->in->len);
    if (n) {
      gboolean ok = json_parser_load_from_data(c->parser, c->in->str, (gssize)n, error);
      g_string_erase(c->in, 0, (gssize)n);
      if (!ok)
        return NULL;
      JsonNode *root = json_parser_get_root(c->parser);
      if (!JSON_NODE_HOLDS_OBJECT(root)) {
        g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_PROTOCOL,
                            "the server sent a message that is not an object");
        return NULL;
      }
      return json_object_ref(json_node_get_object(root));
    }
    /* Without a timeout the read itself waits: one system call per message, not two. */
    if (timeout_ms && !wait_input(c, timeout_ms, error))
      return NULL;
    char buf[READ_CHUNK];
    ssize_t r = read(c->fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO,
                          "connection closed by the server");
      return NULL;
    }
    g_string_append_len(c->in, buf, r);
  }
}

static gboolean
send_object(CbtQmpClient *c, JsonObject *o, GError **error)
{
  g_autoptr(JsonNode) node = json_node_init_object(json_node_alloc(), o);
  g_autofree char *text = json_to_string(node, FALSE);
  g_autofree char *line = g_strconcat(text, "\n", NULL);
  gsize len = strlen(line), done = 0;

  while (done < len) {
    ssize_t r = send(c->fd, line + done, len - done, MSG_NOSIGNAL); /* never SIGPIPE the caller */
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      g_set_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO, "write: %s",
                  g_strerror(errno));
      return FALSE;
    }
    done += (gsize)r;
  }
  return TRUE;
}

/* ---- the API ------------------------------------------------------------------------------- */

JsonObject *
cbt_qmp_client_request(CbtQmpClient *c, JsonObject *request, GError **error)
{
  if (!send_object(c, request, error))
    return NULL;
  for (;;) {
    JsonObject *msg = read_message(c, c->timeout_ms, error);
    if (!msg || !json_object_has_member(msg, "event"))
      return msg;
    g_queue_push_tail(&c->events, msg);
  }
}

static CbtQmpClientError
class_code(const char *cls)
{
  for (gsize i = 0; i < G_N_ELEMENTS(classes); i++)
    if (g_strcmp0(classes[i], cls) == 0)
      return (CbtQmpClientError)i;
  return CBT_QMP_CLIENT_ERROR_OTHER_CLASS;
}

JsonNode *
cbt_qmp_client_call(CbtQmpClient *c, const char *command, JsonObject *args, GError **error)
{
  g_autoptr(JsonObject) req = json_object_new();

  json_object_set_string_member(req, "execute", command);
  if (args)
    json_object_set_object_member(req, "arguments", json_object_ref(args));
  g_autoptr(JsonObject) reply = cbt_qmp_client_request(c, req, error);
  if (!reply)
    return NULL;
  if (json_object_has_member(reply, "return"))
    return json_node_copy(json_object_get_member(reply, "return"));
  JsonNode *e = json_object_get_member(reply, "error");
  JsonObject *err = e && JSON_NODE_HOLDS_OBJECT(e) ? json_node_get_object(e) : NULL;
  if (!err) {
    g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_PROTOCOL,
                        "a reply with neither \"return\" nor \"error\"");
    return NULL;
  }
  g_free(c->error_class);
  c->error_class =
    g_strdup(json_object_get_string_member_with_default(err, "class", "GenericError"));
  g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, class_code(c->error_class),
                      json_object_get_string_member_with_default(err, "desc", ""));
  return NULL;
}

JsonObject *
cbt_qmp_client_next_event(CbtQmpClient *c, guint timeout_ms, GError **error)
{
  gint64 end = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

  while (g_queue_is_empty(&c->events)) {
    gint64 left = (end - g_get_monotonic_time()) / 1000;
    if (left <= 0 && timeout_ms) {
      g_set_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO, "no event within %u ms",
                  timeout_ms);
      return NULL;
    }
    if (!timeout_ms && !wait_input(c, 1, NULL)) {
      g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO, "no event queued");
      return NULL;
    }
    JsonObject *msg = read_message(c, timeout_ms ? (guint)MAX(left, 1) : 1, error);
    if (!msg)
      return NULL;
    if (json_object_has_member(msg, "event"))
      g_queue_push_tail(&c->events, msg);
    else
      json_object_unref(msg); /* a reply nobody waits for: not ours to keep */
  }
  return g_queue_pop_head(&c->events);
}

const char *
cbt_qmp_client_error_class(CbtQmpClient *c)
{
  return c->error_class;
}

JsonObject *
cbt_qmp_client_greeting(CbtQmpClient *c)
{
  return c->greeting;
}

static CbtQmpClient *
client_start(int fd, gboolean negotiate, guint timeout_ms, GError **error)
{
  g_autoptr(CbtQmpClient) c = g_new0(CbtQmpClient, 1);

  c->fd = fd;
  c->timeout_ms = timeout_ms;
  c->in = g_string_new(NULL);
  c->parser = json_parser_new();
  g_queue_init(&c->events);
  c->greeting = read_message(c, timeout_ms, error);
  if (!c->greeting)
    return NULL;
  if (!json_object_has_member(c->greeting, "QMP")) {
    g_set_error_literal(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_PROTOCOL,
                        "the server's first message is not a QMP greeting");
    return NULL;
  }
  if (negotiate) {
    g_autoptr(JsonNode) ret = cbt_qmp_client_call(c, "qmp_capabilities", NULL, error);
    if (!ret)
      return NULL;
  }
  return g_steal_pointer(&c);
}

CbtQmpClient *
cbt_qmp_client_connect(const CbtQmpSocketAddress *addr, gboolean negotiate, guint timeout_ms,
                       GError **error)
{
  int fd = cbt_socket_connect(addr, error);

  return fd < 0 ? NULL : client_start(fd, negotiate, timeout_ms, error);
}

CbtQmpClient *
cbt_qmp_client_connect_unix(const char *path, gboolean negotiate, guint timeout_ms, GError **error)
{
  int fd = cbt_socket_connect_unix(path, error);

  return fd < 0 ? NULL : client_start(fd, negotiate, timeout_ms, error);
}

void
cbt_qmp_client_free(CbtQmpClient *c)
{
  if (!c)
    return;
  close(c->fd);
  g_string_free(c->in, TRUE);
  g_queue_clear_full(&c->events, (GDestroyNotify)json_object_unref);
  g_clear_pointer(&c->greeting, json_object_unref);
  g_free(c->error_class);
  g_clear_object(&c->parser);
  g_free(c);
}
