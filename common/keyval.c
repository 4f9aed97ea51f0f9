/* common/keyval.c — QEMU's key=value option syntax, parsed into a JSON object of strings.
 *
 * The typing (strings to integers, booleans, sizes) is not done here: the schema knows the
 * types, so rpc/ converts the strings when it validates (cbt_rpc_execute with keyval = TRUE).
 */
#include "common/keyval.h"

#include <string.h>

#define KEYVAL_ERROR (g_quark_from_static_string("cbtd-keyval"))

/* A key fragment is a name (a letter, then letters, digits, '-' and '_') or, below the top
 * level, a list index (digits only), as QEMU's keyval syntax has it. */
static gboolean
fragment_valid(const char *s, gsize len, gboolean top)
{
  if (len == 0)
    return FALSE;
  gsize digits = 0;
  while (digits < len && g_ascii_isdigit(s[digits]))
    digits++;
  if (digits == len)
    return !top;
  if (!g_ascii_isalpha(s[0]))
    return FALSE;
  for (gsize i = 0; i < len; i++) {
    if (!g_ascii_isalnum(s[i]) && s[i] != '-' && s[i] != '_')
      return FALSE;
  }
  return TRUE;
}

/* Store @value at dotted @key inside @root. */
static gboolean
keyval_store(JsonObject *root, const char *key, const char *value, GError **error)
{
  g_auto(GStrv) parts = g_strsplit(key, ".", -1);
  guint n = g_strv_length(parts);
  JsonObject *obj = root;
  g_autoptr(GString) prefix = g_string_new(NULL);

  for (guint i = 0; i < MAX(n, 1); i++) {
    if (n == 0 || !fragment_valid(parts[i], strlen(parts[i]), i == 0)) {
      g_set_error(error, KEYVAL_ERROR, 0, "Invalid parameter '%s'", key);
      return FALSE;
    }
  }
  for (guint i = 0; i + 1 < n; i++) {
    if (i)
      g_string_append_c(prefix, '.');
    g_string_append(prefix, parts[i]);
    JsonNode *child = json_object_get_member(obj, parts[i]);
    if (child && !JSON_NODE_HOLDS_OBJECT(child)) {
      g_set_error(error, KEYVAL_ERROR, 0, "Parameters '%s.*' used inconsistently", prefix->str);
      return FALSE;
    }
    if (!child) {
      json_object_set_object_member(obj, parts[i], json_object_new());
      child = json_object_get_member(obj, parts[i]);
    }
    obj = json_node_get_object(child);
  }
  JsonNode *old = json_object_get_member(obj, parts[n - 1]);
  if (old && JSON_NODE_HOLDS_OBJECT(old)) {
    g_set_error(error, KEYVAL_ERROR, 0, "Parameters '%s.*' used inconsistently", key);
    return FALSE;
  }
  json_object_set_string_member(obj, parts[n - 1], value);
  return TRUE;
}

static gboolean
is_index(const char *s, guint64 *idx)
{
  if (!*s || (s[0] == '0' && s[1]))
    return FALSE;
  for (const char *p = s; *p; p++)
    if (!g_ascii_isdigit(*p))
      return FALSE;
  *idx = g_ascii_strtoull(s, NULL, 10);
  return TRUE;
}

/* Turn objects whose members are all indices into arrays, recursively. */
static JsonNode *
keyval_listify(JsonNode *node, const char *path, GError **error)
{
  if (!JSON_NODE_HOLDS_OBJECT(node))
    return json_node_copy(node);

  JsonObject *obj = json_node_get_object(node);
  g_autoptr(GList) members = json_object_get_members(obj);
  gboolean all_index = members != NULL;
  guint64 idx;
  for (GList *l = members; l; l = l->next)
    all_index = all_index && is_index(l->data, &idx);

  if (!all_index) {
    g_autoptr(JsonObject) out = json_object_new();
    for (GList *l = members; l; l = l->next) {
      g_autofree char *sub =
        *path ? g_strdup_printf("%s.%s", path, (char *)l->data) : g_strdup(l->data);
      JsonNode *child = keyval_listify(json_object_get_member(obj, l->data), sub, error);
      if (!child)
        return NULL;
      json_object_set_member(out, l->data, child);
    }
    return json_node_init_object(json_node_alloc(), out);
  }

  g_autoptr(JsonArray) arr = json_array_new();
  guint n = g_list_length(members);
  for (guint i = 0; i < n; i++) {
    g_autofree char *name = g_strdup_printf("%u", i);
    g_autofree char *sub = g_strdup_printf("%s.%u", path, i);
    JsonNode *elem = json_object_get_member(obj, name);
    if (!elem) {
      g_set_error(error, KEYVAL_ERROR, 0, "Parameter '%s' missing", sub);
      return NULL;
    }
    JsonNode *child = keyval_listify(elem, sub, error);
    if (!child)
      return NULL;
    json_array_add_element(arr, child);
  }
  return json_node_init_array(json_node_alloc(), arr);
}

/* Read one value up to an unescaped ',' (",," is a literal comma); advance *pos. */
static char *
keyval_value(const char **pos)
{
  GString *v = g_string_new(NULL);
  const char *p = *pos;
  while (*p) {
    if (*p == ',') {
      if (p[1] != ',')
        break;
      p++;
    }
    g_string_append_c(v, *p++);
  }
  *pos = *p == ',' ? p + 1 : p;
  return g_string_free(v, FALSE);
}

JsonObject *
cbt_keyval_parse(const char *text, const char *implied_key, GError **error)
{
  g_autoptr(JsonObject) root = json_object_new();
  const char *p = text;
  gboolean first = TRUE;

  while (*p) {
    gsize klen = strcspn(p, "=,");
    if (p[klen] != '=') {
      if (first && implied_key) {
        g_autofree char *value = keyval_value(&p);
        if (!keyval_store(root, implied_key, value, error))
          return NULL;
        first = FALSE;
        continue;
      }
      g_autofree char *key = g_strndup(p, klen);
      if (klen == 0 || !fragment_valid(key, klen, TRUE))
        g_set_error(error, KEYVAL_ERROR, 0, "Invalid parameter '%s'", key);
      else
        g_set_error(error, KEYVAL_ERROR, 0, "Expected '=' after parameter '%s'", key);
      return NULL;
    }
    g_autofree char *key = g_strndup(p, klen);
    p += klen + 1;
    g_autofree char *value = keyval_value(&p);
    if (!keyval_store(root, key, value, error))
      return NULL;
    first = FALSE;
  }

  g_autoptr(JsonNode) tmp = json_node_init_object(json_node_alloc(), root);
  g_autoptr(JsonNode) out = keyval_listify(tmp, "", error);
  if (!out)
    return NULL;
  return json_object_ref(json_node_get_object(out));
}
