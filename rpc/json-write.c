/* JSON writer producing QEMU's byte-exact output: pure ASCII, upper-case \uXXXX escapes
 * (surrogate pairs beyond the BMP), "%.17g" doubles, ", " and ": " separators, and a pretty
 * form indented by 4 spaces with "\r\n" line ends.
 *
 * Object members come out in QEMU's QDict order (see cbt_json_qdict_order()), so replies are
 * byte-identical to qemu-storage-daemon's.
 *
 * Differences from QEMU, on purpose: a non-finite double (from input such as 1e400) prints as
 * null, because QEMU's "inf" is not JSON.
 */
#include "rpc/rpc-private.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void
write_string(GString *out, const char *s)
{
  g_string_append_c(out, '"');
  while (*s) {
    const char *end;
    int cp = cbt_json_utf8_decode(s, &end);

    s = end;
    switch (cp) {
    case '"':
      g_string_append(out, "\\\"");
      continue;
    case '\\':
      g_string_append(out, "\\\\");
      continue;
    case '\b':
      g_string_append(out, "\\b");
      continue;
    case '\f':
      g_string_append(out, "\\f");
      continue;
    case '\n':
      g_string_append(out, "\\n");
      continue;
    case '\r':
      g_string_append(out, "\\r");
      continue;
    case '\t':
      g_string_append(out, "\\t");
      continue;
    default:
      break;
    }
    if (cp < 0)
      cp = 0xFFFD; /* invalid UTF-8 from a handler or an error text */
    if (cp > 0xFFFF)
      g_string_append_printf(out, "\\u%04X\\u%04X", 0xD800 + ((cp - 0x10000) >> 10),
                             0xDC00 + ((cp - 0x10000) & 0x3FF));
    else if (cp < 0x20 || cp >= 0x7F)
      g_string_append_printf(out, "\\u%04X", cp);
    else
      g_string_append_c(out, cp);
  }
  g_string_append_c(out, '"');
}

static void
write_double(GString *out, double v)
{
  char buf[G_ASCII_DTOSTR_BUF_SIZE];

  if (!isfinite(v)) {
    g_string_append(out, "null");
    return;
  }
  g_string_append(out, g_ascii_formatd(buf, sizeof(buf), "%.17g", v));
}

static void
write_scalar(GString *out, JsonNode *node)
{
  guint64 big;

  if (cbt_json_get_big_uint(node, &big)) {
    g_string_append_printf(out, "%" G_GUINT64_FORMAT, big);
    return;
  }
  switch (json_node_get_value_type(node)) {
  case G_TYPE_INT64:
    g_string_append_printf(out, "%" G_GINT64_FORMAT, json_node_get_int(node));
    break;
  case G_TYPE_DOUBLE:
    write_double(out, json_node_get_double(node));
    break;
  case G_TYPE_BOOLEAN:
    g_string_append(out, json_node_get_boolean(node) ? "true" : "false");
    break;
  case G_TYPE_STRING:
    write_string(out, json_node_get_string(node));
    break;
  default:
    g_string_append(out, "null");
    break;
  }
}

/* QDict's hash (the gdbm/tdb string hash) and bucket count. */
#define QDICT_BUCKETS 512

static guint
qdict_bucket(const char *key)
{
  guint32 v = 0x238F13AFu * (guint32)strlen(key);

  for (guint i = 0; key[i]; i++)
    v += (guint32)(guchar)key[i] << (i * 5 % 24);
  return (1103515243u * v + 12345u) % QDICT_BUCKETS;
}

typedef struct {
  const char *name;
  guint bucket;
  guint index;
} OrderKey;

static int
order_cmp(const void *a, const void *b)
{
  const OrderKey *x = a, *y = b;

  if (x->bucket != y->bucket)
    return x->bucket < y->bucket ? -1 : 1;
  return x->index > y->index ? -1 : x->index < y->index; /* newest first */
}

const char **
cbt_json_qdict_order(JsonObject *obj, guint *n)
{
  GList *names = json_object_get_members(obj); /* insertion order */
  guint len = g_list_length(names), i = 0;
  g_autofree OrderKey *keys = g_new(OrderKey, len + 1);
  const char **out = g_new(const char *, len + 1);

  for (GList *l = names; l; l = l->next, i++)
    keys[i] = (OrderKey){ l->data, qdict_bucket(l->data), i };
  g_list_free(names);
  qsort(keys, len, sizeof(OrderKey), order_cmp);
  for (i = 0; i < len; i++)
    out[i] = keys[i].name;
  out[len] = NULL;
  *n = len;
  return out;
}

static void
newline(GString *out, gboolean pretty, guint depth)
{
  if (!pretty)
    return;
  g_string_append(out, "\r\n");
  for (guint i = 0; i < depth * 4; i++)
    g_string_append_c(out, ' ');
}

/* Between members: "," then a newline (pretty) or a space. */
static void
separator(GString *out, gboolean pretty, guint depth)
{
  g_string_append_c(out, ',');
  if (pretty)
    newline(out, pretty, depth);
  else
    g_string_append_c(out, ' ');
}

static void write_node(GString *out, JsonNode *node, gboolean pretty, guint depth);

static void
write_object(GString *out, JsonObject *obj, gboolean pretty, guint depth)
{
  guint n;
  g_autofree const char **names = cbt_json_qdict_order(obj, &n);

  g_string_append_c(out, '{');
  for (guint i = 0; i < n; i++) {
    if (i == 0)
      newline(out, pretty, depth + 1);
    else
      separator(out, pretty, depth + 1);
    write_string(out, names[i]);
    g_string_append(out, ": ");
    write_node(out, json_object_get_member(obj, names[i]), pretty, depth + 1);
  }
  /* QEMU breaks the line before the closer even for an empty container. */
  newline(out, pretty, depth);
  g_string_append_c(out, '}');
}

static void
write_array(GString *out, JsonArray *arr, gboolean pretty, guint depth)
{
  guint n = json_array_get_length(arr);

  g_string_append_c(out, '[');
  for (guint i = 0; i < n; i++) {
    if (i == 0)
      newline(out, pretty, depth + 1);
    else
      separator(out, pretty, depth + 1);
    write_node(out, json_array_get_element(arr, i), pretty, depth + 1);
  }
  newline(out, pretty, depth);
  g_string_append_c(out, ']');
}

static void
write_node(GString *out, JsonNode *node, gboolean pretty, guint depth)
{
  if (!node) {
    g_string_append(out, "null");
    return;
  }
  switch (JSON_NODE_TYPE(node)) {
  case JSON_NODE_OBJECT:
    write_object(out, json_node_get_object(node), pretty, depth);
    break;
  case JSON_NODE_ARRAY:
    write_array(out, json_node_get_array(node), pretty, depth);
    break;
  case JSON_NODE_VALUE:
    write_scalar(out, node);
    break;
  case JSON_NODE_NULL:
  default:
    g_string_append(out, "null");
    break;
  }
}

void
cbt_json_write(GString *out, JsonNode *node, gboolean pretty)
{
  write_node(out, node, pretty, 0);
}

char *
cbt_json_to_string(JsonNode *node, gboolean pretty)
{
  GString *out = g_string_new(NULL);

  cbt_json_write(out, node, pretty);
  return g_string_free(out, FALSE);
}

char *
cbt_rpc_json_to_string(JsonNode *node, gboolean pretty)
{
  return cbt_json_to_string(node, pretty);
}
