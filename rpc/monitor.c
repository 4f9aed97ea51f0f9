/* QMP monitors on unix sockets: accept clients, read and frame their input, queue their output.
 *
 * Every socket operation is asynchronous on the rpc's main context and every client has its
 * own input parser and output queue, so a slow, silent or garbage-sending client never holds up
 * another. A client that stops reading gets backpressure: once HIGH_WATER bytes of replies wait
 * for it, its input is not read until they drain; a client that lets events pile up beyond
 * OUTPUT_LIMIT is dropped.
 */
#include "rpc/rpc-private.h"
#include "common/sockets.h"

#include <glib/gstdio.h>
#include <unistd.h>

#define READ_CHUNK (16 * 1024) /* per client, allocated with it */
#define HIGH_WATER (1024 * 1024)
#define OUTPUT_LIMIT (64 * 1024 * 1024)

struct CbtRpcMonitors {
  CbtRpc *rpc;
  GMainContext *context;
  GPtrArray *listeners;
  GList *clients;
};

typedef struct {
  CbtRpcMonitors *mons;
  GSocketService *service;
  char *path;
  gboolean pretty;
} Listener;

typedef struct {
  int ref;
  CbtRpcMonitors *mons;
  GSocketConnection *conn;
  GCancellable *cancel;
  CbtJsonStream *parser;
  CbtRpcSession session;
  gboolean pretty;
  guint8 buf[READ_CHUNK];
  GQueue out;       /* GBytes* waiting to be written; the head may be partly written */
  gsize out_offset; /* bytes of the head already written */
  gsize out_bytes;  /* bytes queued, not yet written */
  gboolean reading;
  gboolean writing;
  gboolean closing; /* close once the output queue is empty */
  gboolean dead;
} Client;

static Client *
client_ref(Client *c)
{
  c->ref++;
  return c;
}

static void
client_unref(Client *c)
{
  if (--c->ref > 0)
    return;
  g_queue_clear_full(&c->out, (GDestroyNotify)g_bytes_unref);
  cbt_json_stream_free(c->parser);
  g_object_unref(c->cancel);
  g_object_unref(c->conn);
  g_free(c);
}

static void
client_drop(Client *c)
{
  if (c->dead)
    return;
  c->dead = TRUE;
  g_cancellable_cancel(c->cancel);
  g_io_stream_close(G_IO_STREAM(c->conn), NULL, NULL);
  if (c->mons)
    c->mons->clients = g_list_remove(c->mons->clients, c);
  c->mons = NULL;
  client_unref(c);
}

static void start_read(Client *c);

static void on_write(GObject *src, GAsyncResult *res, gpointer user_data);

static void
start_write(Client *c)
{
  if (c->writing || c->dead)
    return;
  GBytes *head = g_queue_peek_head(&c->out);
  if (!head) {
    if (c->closing)
      client_drop(c);
    return;
  }
  gsize len;
  const guint8 *data = g_bytes_get_data(head, &len);
  c->writing = TRUE;
  g_output_stream_write_async(g_io_stream_get_output_stream(G_IO_STREAM(c->conn)),
                              data + c->out_offset, len - c->out_offset, G_PRIORITY_DEFAULT,
                              c->cancel, on_write, client_ref(c));
}

static void
on_write(GObject *src, GAsyncResult *res, gpointer user_data)
{
  Client *c = user_data;
  gssize n = g_output_stream_write_finish(G_OUTPUT_STREAM(src), res, NULL);

  c->writing = FALSE;
  if (c->dead) {
    client_unref(c);
    return;
  }
  if (n <= 0) {
    client_drop(c); /* the peer went away; nothing to report to anyone */
    client_unref(c);
    return;
  }
  GBytes *head = g_queue_peek_head(&c->out);
  c->out_offset += n;
  c->out_bytes -= n;
  if (c->out_offset == g_bytes_get_size(head)) {
    g_bytes_unref(g_queue_pop_head(&c->out));
    c->out_offset = 0;
  }
  start_write(c);
  start_read(c);
  client_unref(c);
}

static void
client_send(Client *c, JsonNode *msg)
{
  GString *s;

  if (c->dead)
    return;
  s = g_string_new(NULL);
  cbt_json_write(s, msg, c->pretty);
  g_string_append(s, "\r\n");
  c->out_bytes += s->len;
  g_queue_push_tail(&c->out, g_string_free_to_bytes(s));
  start_write(c);
}

/* One complete input message (or a framing/parse error) from the client's parser. */
static void
on_message(JsonNode *value, GError *error, gpointer user_data)
{
  Client *c = user_data;
  g_autoptr(JsonNode) reply = NULL;

  if (c->dead || c->closing || !c->mons) {
    g_clear_pointer(&value, json_node_unref);
    g_clear_error(&error);
    return;
  }
  if (error) {
    /* Parse errors are reported with QEMU's texts, without an id. An oversized message gets its
     * error, then the connection closes: the rest of it cannot be framed reliably. */
    GError *e = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, error->message);
    c->closing = g_error_matches(error, CBT_JSON_ERROR, CBT_JSON_ERROR_TOO_BIG);
    reply = cbt_rpc_error_reply(e, NULL);
    g_error_free(e);
    g_error_free(error);
  } else {
    reply = cbt_rpc_dispatch(c->mons->rpc, &c->session, value);
    json_node_unref(value);
  }
  client_send(c, reply);
}

static void
on_read(GObject *src, GAsyncResult *res, gpointer user_data)
{
  Client *c = user_data;
  gssize n = g_input_stream_read_finish(G_INPUT_STREAM(src), res, NULL);

  c->reading = FALSE;
  if (c->dead) {
    client_unref(c);
    return;
  }
  if (n <= 0) {
    client_drop(c); /* EOF or error, possibly in the middle of a message: drop quietly */
  } else {
    cbt_json_stream_feed(c->parser, (const char *)c->buf, n);
    start_read(c);
  }
  client_unref(c);
}

static void
start_read(Client *c)
{
  if (c->reading || c->dead || c->closing || c->out_bytes >= HIGH_WATER)
    return;
  c->reading = TRUE;
  g_input_stream_read_async(g_io_stream_get_input_stream(G_IO_STREAM(c->conn)), c->buf,
                            sizeof(c->buf), G_PRIORITY_DEFAULT, c->cancel, on_read, client_ref(c));
}

static gboolean
on_incoming(GSocketService *service, GSocketConnection *conn, GObject *source, gpointer user_data)
{
  Listener *l = user_data;
  Client *c = g_new0(Client, 1);
  g_autoptr(JsonNode) greeting = cbt_rpc_greeting();

  c->ref = 1;
  c->mons = l->mons;
  c->conn = g_object_ref(conn);
  c->cancel = g_cancellable_new();
  c->pretty = l->pretty;
  c->parser = cbt_json_stream_new(CBT_RPC_MAX_MESSAGE, on_message, c);
  g_queue_init(&c->out);
  l->mons->clients = g_list_prepend(l->mons->clients, c);
  client_send(c, greeting);
  start_read(c);
  return TRUE;
}

static void
listener_free(gpointer p)
{
  Listener *l = p;

  g_socket_service_stop(l->service);
  g_socket_listener_close(G_SOCKET_LISTENER(l->service));
  g_signal_handlers_disconnect_by_data(l->service, l);
  g_object_unref(l->service);
  if (l->path)
    g_unlink(l->path); /* a unix socket's file (NULL for other kinds) */
  g_free(l->path);
  g_free(l);
}

CbtRpcMonitors *
cbt_rpc_monitors_new(CbtRpc *rpc, GMainContext *context)
{
  CbtRpcMonitors *mons = g_new0(CbtRpcMonitors, 1);

  mons->rpc = rpc;
  mons->context = context;
  mons->listeners = g_ptr_array_new_with_free_func(listener_free);
  return mons;
}

void
cbt_rpc_monitors_close_all(CbtRpcMonitors *mons)
{
  g_ptr_array_set_size(mons->listeners, 0);
  while (mons->clients)
    client_drop(mons->clients->data);
}

void
cbt_rpc_monitors_free(CbtRpcMonitors *mons)
{
  if (!mons)
    return;
  cbt_rpc_monitors_close_all(mons);
  g_ptr_array_unref(mons->listeners);
  g_free(mons);
}

gboolean
cbt_rpc_monitors_listen(CbtRpcMonitors *mons, const CbtQmpSocketAddress *addr, gboolean pretty,
                        GError **error)
{
  int fd = cbt_socket_listen(addr, 0, error);
  const char *path = cbt_socket_address_path(addr);
  Listener *l;
  gboolean ok;

  if (fd < 0)
    return FALSE;
  g_autoptr(GSocket) sock = g_socket_new_from_fd(fd, error);
  if (!sock) {
    close(fd);
    if (path)
      g_unlink(path);
    return FALSE;
  }
  l = g_new0(Listener, 1);
  l->mons = mons;
  l->path = g_strdup(path);
  l->pretty = pretty;
  /* The accept source must run on the rpc's context whatever thread calls us. */
  g_main_context_push_thread_default(mons->context);
  l->service = g_socket_service_new();
  ok = g_socket_listener_add_socket(G_SOCKET_LISTENER(l->service), sock, NULL, error);
  if (ok) {
    g_signal_connect(l->service, "incoming", G_CALLBACK(on_incoming), l);
    g_socket_service_start(l->service);
  }
  g_main_context_pop_thread_default(mons->context);
  if (!ok) {
    g_object_unref(l->service);
    if (l->path)
      g_unlink(l->path);
    g_free(l->path);
    g_free(l);
    return FALSE;
  }
  g_ptr_array_add(mons->listeners, l);
  return TRUE;
}

void
cbt_rpc_monitors_broadcast(CbtRpcMonitors *mons, JsonNode *event)
{
  GList *next;

  for (GList *it = mons->clients; it; it = next) {
    Client *c = it->data;

    next = it->next;
    if (!c->session.negotiated || c->closing)
      continue;
    if (c->out_bytes > OUTPUT_LIMIT) {
      g_warning("rpc: dropping a monitor client that does not read its events");
      client_drop(c);
      continue;
    }
    client_send(c, event);
  }
}

gboolean
cbt_rpc_monitors_busy(CbtRpcMonitors *mons)
{
  for (GList *it = mons->clients; it; it = it->next) {
    Client *c = it->data;
    if (c->writing || !g_queue_is_empty(&c->out))
      return TRUE;
  }
  return FALSE;
}
