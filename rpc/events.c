/* Events: built with their timestamp by whichever thread emits them, queued, and broadcast to
 * the negotiated monitor clients from the rpc's main context.
 *
 * The typed emitters generated from the schema (schemas/qmp-events.h) reach every live CbtRpc,
 * as QEMU's events reach every monitor: the modules that raise events need no handle on the
 * server.
 */
#include "rpc/rpc-private.h"

static GMutex live_lock;
static GList *live; /* every CbtRpc between cbt_rpc_new() and cbt_rpc_free(); under live_lock */

void
cbt_rpc_events_attach(CbtRpc *rpc)
{
  g_mutex_lock(&live_lock);
  live = g_list_prepend(live, rpc);
  g_mutex_unlock(&live_lock);
}

void
cbt_rpc_events_detach(CbtRpc *rpc)
{
  g_mutex_lock(&live_lock);
  live = g_list_remove(live, rpc);
  g_mutex_unlock(&live_lock);
}

gboolean
cbt_rpc_events_pending(CbtRpc *rpc)
{
  g_mutex_lock(&rpc->event_lock);
  gboolean pending = !g_queue_is_empty(&rpc->event_queue);
  g_mutex_unlock(&rpc->event_lock);
  return pending;
}

static gboolean
deliver_events(gpointer user_data)
{
  CbtRpc *rpc = user_data;
  GQueue events = G_QUEUE_INIT;
  JsonNode *ev;

  g_mutex_lock(&rpc->event_lock);
  events = rpc->event_queue;
  g_queue_init(&rpc->event_queue);
  g_clear_pointer(&rpc->event_source, g_source_unref);
  g_mutex_unlock(&rpc->event_lock);

  while ((ev = g_queue_pop_head(&events))) {
    cbt_rpc_monitors_broadcast(rpc->monitors, ev);
    json_node_unref(ev);
  }
  return G_SOURCE_REMOVE;
}

void
cbt_rpc_emit_event(CbtRpc *rpc, const char *name, JsonObject *data)
{
  JsonObject *ev = json_object_new();
  JsonObject *ts = json_object_new();
  gint64 now = g_get_real_time();

  if (!g_hash_table_contains(rpc->schema->events, name))
    g_warning("rpc: event %s is not in the schema", name);
  json_object_set_int_member(ts, "seconds", now / G_USEC_PER_SEC);
  json_object_set_int_member(ts, "microseconds", now % G_USEC_PER_SEC);
  json_object_set_object_member(ev, "timestamp", ts);
  json_object_set_string_member(ev, "event", name);
  if (data)
    json_object_set_object_member(ev, "data", data);

  g_mutex_lock(&rpc->event_lock);
  g_queue_push_tail(&rpc->event_queue, cbt_json_object_node(ev));
  if (!rpc->event_source) {
    rpc->event_source = g_idle_source_new();
    g_source_set_priority(rpc->event_source, G_PRIORITY_DEFAULT);
    g_source_set_callback(rpc->event_source, deliver_events, rpc, NULL);
    g_source_attach(rpc->event_source, rpc->context);
  }
  g_mutex_unlock(&rpc->event_lock);
}

void
cbt_rpc_broadcast_event(const char *name, JsonObject *data)
{
  g_mutex_lock(&live_lock);
  for (GList *l = live; l; l = l->next)
    cbt_rpc_emit_event(l->data, name, data ? json_object_ref(data) : NULL);
  g_mutex_unlock(&live_lock);
  if (data)
    json_object_unref(data);
}
