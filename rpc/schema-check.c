/* Argument validation against the schema, worded exactly like QEMU's QObject input visitor.
 *
 * The walk copies what it checks, so the handler receives a tree holding only schema members,
 * and in keyval mode (command-line strings) each scalar converted to its schema type.
 *
 * Error paths follow QEMU: most texts carry the dotted path of the value ("file.filename",
 * "bitmaps[0].name"; keyval lists use "bitmaps.0"), but range errors of sized integers, enum
 * errors and alternate type errors carry only the member's own name, or 'null' for a list
 * element, because QEMU's generic visitors see just that.
 */
#include "rpc/rpc-private.h"

#include <errno.h>
#include <math.h>
#include <string.h>

typedef struct {
  const char *name; /* the container's name in its parent (NULL: root or list element) */
  gboolean is_list;
  guint index; /* lists: index of the element being checked */
} Frame;

typedef struct {
  gboolean keyval;
  GArray *stack; /* Frame, innermost last */
  GString *path;
  GError *error;
} Check;

static JsonNode *check_value(Check *c, CbtSchemaType *type, const char *name, JsonNode *node);

/* The full name of member @name of the innermost container. */
static const char *
full_name(Check *c, const char *name)
{
  GString *s = c->path;

  g_string_truncate(s, 0);
  for (guint i = c->stack->len; i-- > 0;) {
    Frame *f = &g_array_index(c->stack, Frame, i);
    if (f->is_list) {
      g_autofree char *idx = g_strdup_printf(c->keyval ? ".%u" : "[%u]", f->index);
      g_string_prepend(s, idx);
    } else {
      g_string_prepend(s, name ? name : "<anonymous>");
      g_string_prepend_c(s, '.');
    }
    name = f->name;
  }
  if (name)
    g_string_prepend(s, name);
  else if (s->str[0] == '.')
    g_string_erase(s, 0, 1);
  else if (!s->len)
    return "<anonymous>";
  return s->str;
}

static void G_GNUC_PRINTF(2, 3) fail(Check *c, const char *fmt, ...)
{
  va_list ap;

  if (c->error)
    return;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  c->error = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, msg);
}

static JsonNode *
wrong_type(Check *c, const char *name, const char *expected)
{
  fail(c, "Invalid parameter type for '%s', expected: %s", full_name(c, name), expected);
  return NULL;
}

static gboolean
is_string(JsonNode *node)
{
  return JSON_NODE_HOLDS_VALUE(node) && json_node_get_value_type(node) == G_TYPE_STRING &&
         !cbt_json_get_big_uint(node, NULL);
}

static gboolean
is_int(JsonNode *node)
{
  return JSON_NODE_HOLDS_VALUE(node) && json_node_get_value_type(node) == G_TYPE_INT64;
}

/* In keyval mode, the string value of a scalar; objects and arrays there are errors. A
 * non-string scalar (put there by a caller, not by the keyval parser) returns NULL without an
 * error: it is then checked as JSON. */
static const char *
keyval_string(Check *c, const char *name, JsonNode *node, gboolean *bad)
{
  *bad = FALSE;
  if (!c->keyval)
    return NULL;
  if (JSON_NODE_HOLDS_OBJECT(node) || JSON_NODE_HOLDS_ARRAY(node)) {
    fail(c, "Parameters '%s.*' are unexpected", full_name(c, name));
    *bad = TRUE;
    return NULL;
  }
  return is_string(node) ? json_node_get_string(node) : NULL;
}

/* ---- integers ----------------------------------------------------------------------------- */

static const struct {
  const char *c_name;
  gint64 min;
  guint64 max;
} int_ranges[] = {
  [CBT_BUILTIN_INT8] = { "int8_t", G_MININT8, G_MAXINT8 },
  [CBT_BUILTIN_INT16] = { "int16_t", G_MININT16, G_MAXINT16 },
  [CBT_BUILTIN_INT32] = { "int32_t", G_MININT32, G_MAXINT32 },
  [CBT_BUILTIN_UINT8] = { "uint8_t", 0, G_MAXUINT8 },
  [CBT_BUILTIN_UINT16] = { "uint16_t", 0, G_MAXUINT16 },
  [CBT_BUILTIN_UINT32] = { "uint32_t", 0, G_MAXUINT32 },
};

static gboolean
is_unsigned(CbtBuiltin b)
{
  return b == CBT_BUILTIN_UINT8 || b == CBT_BUILTIN_UINT16 || b == CBT_BUILTIN_UINT32 ||
         b == CBT_BUILTIN_UINT64 || b == CBT_BUILTIN_SIZE;
}

/* QEMU's size syntax: decimal (fraction allowed with a suffix) or 0x hex, then an optional
 * B/K/M/G/T/P/E suffix in powers of 1024. */
static gboolean
parse_size(const char *s, guint64 *out)
{
  static const char suffixes[] = "BKMGTPE";
  char *end;
  guint64 val;
  double frac = 0;

  if (strchr(s, '-') || !g_ascii_isdigit(*s))
    return FALSE;
  errno = 0;
  val = g_ascii_strtoull(s, &end, 10);
  if (errno)
    return FALSE;
  if (val == 0 && (*end == 'x' || *end == 'X')) {
    val = g_ascii_strtoull(s, &end, 16);
    return !errno && *end == '\0' && (*out = val, TRUE);
  }
  if (*end == '.') {
    char *fend;
    frac = g_ascii_strtod(end, &fend);
    if (fend == end + 1 || memchr(end, 'e', fend - end) || memchr(end, 'E', fend - end))
      return FALSE;
    end = fend;
  }
  const char *suf = *end ? strchr(suffixes, g_ascii_toupper(*end)) : NULL;
  guint shift = suf ? 10 * (guint)(suf - suffixes) : 0;
  if (*end && (!suf || end[1]))
    return FALSE;
  if (shift == 0)
    return frac == 0 && (*out = val, TRUE);
  if (shift < 64 && (val >> (64 - shift)) != 0)
    return FALSE;
  double extra = ldexp(frac, shift) + 0.5;
  guint64 res = val << shift;
  if (extra >= ldexp(1.0, 64) || res + (guint64)extra < res)
    return FALSE;
  *out = res + (guint64)extra;
  return TRUE;
}

/* The integer in @node per QEMU's JSON rules: signed wants int64; unsigned also takes a
 * negative int64 (its two's complement) for compatibility, as QEMU does. */
static gboolean
int_from_json(Check *c, CbtBuiltin b, const char *name, JsonNode *node, guint64 *bits)
{
  if (is_unsigned(b) && cbt_json_get_big_uint(node, bits))
    return TRUE;
  if (!is_int(node)) {
    if (is_unsigned(b))
      fail(c, "Parameter '%s' expects uint64", full_name(c, name));
    else
      wrong_type(c, name, "integer");
    return FALSE;
  }
  *bits = (guint64)json_node_get_int(node);
  return TRUE;
}

static gboolean
int_from_keyval(Check *c, CbtBuiltin b, const char *name, const char *s, guint64 *bits)
{
  char *end;
  gboolean ok;

  errno = 0;
  if (b == CBT_BUILTIN_SIZE) {
    if (!parse_size(s, bits)) {
      fail(c, "Parameter '%s' expects size", full_name(c, name));
      return FALSE;
    }
    return TRUE;
  }
  if (is_unsigned(b))
    *bits = g_ascii_strtoull(s, &end, 0);
  else
    *bits = (guint64)g_ascii_strtoll(s, &end, 0);
  ok = errno == 0 && end != s && *end == '\0';
  if (!ok)
    fail(c, "Parameter '%s' expects integer", full_name(c, name));
  return ok;
}

static JsonNode *
check_int(Check *c, CbtBuiltin b, const char *name, JsonNode *node)
{
  gboolean bad;
  const char *s = keyval_string(c, name, node, &bad);
  guint64 bits;

  if (bad)
    return NULL;
  if (!(s ? int_from_keyval(c, b, name, s, &bits) : int_from_json(c, b, name, node, &bits)))
    return NULL;
  if (b < G_N_ELEMENTS(int_ranges) && int_ranges[b].c_name) {
    gboolean in_range = is_unsigned(b) ? bits <= int_ranges[b].max
                                       : (gint64)bits >= int_ranges[b].min &&
                                           (gint64)bits <= (gint64)int_ranges[b].max;
    if (!in_range) {
      fail(c, "Parameter '%s' expects %s", name ? name : "null", int_ranges[b].c_name);
      return NULL;
    }
  }
  /* Unsigned values above G_MAXINT64 keep their bit pattern: handlers cast to guint64. */
  return json_node_init_int(json_node_alloc(), (gint64)bits);
}

/* ---- other scalars ------------------------------------------------------------------------ */

static JsonNode *
check_bool(Check *c, const char *name, JsonNode *node)
{
  gboolean bad;
  const char *s = keyval_string(c, name, node, &bad);

  if (bad)
    return NULL;
  if (s) {
    if (g_str_equal(s, "on") || g_str_equal(s, "off"))
      return json_node_init_boolean(json_node_alloc(), g_str_equal(s, "on"));
    fail(c, "Parameter '%s' expects 'on' or 'off'", full_name(c, name));
    return NULL;
  }
  if (!JSON_NODE_HOLDS_VALUE(node) || json_node_get_value_type(node) != G_TYPE_BOOLEAN)
    return wrong_type(c, name, "boolean");
  return json_node_copy(node);
}

static JsonNode *
check_number(Check *c, const char *name, JsonNode *node)
{
  gboolean bad;
  const char *s = keyval_string(c, name, node, &bad);

  if (bad)
    return NULL;
  if (s) {
    char *end;
    errno = 0;
    double v = g_ascii_strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
      return wrong_type(c, name, "number");
    return json_node_init_double(json_node_alloc(), v);
  }
  guint64 big;
  if (cbt_json_get_big_uint(node, &big))
    return json_node_init_double(json_node_alloc(), (double)big);
  if (is_int(node))
    return json_node_init_double(json_node_alloc(), (double)json_node_get_int(node));
  if (!JSON_NODE_HOLDS_VALUE(node) || json_node_get_value_type(node) != G_TYPE_DOUBLE)
    return wrong_type(c, name, "number");
  return json_node_copy(node);
}

static JsonNode *
check_str(Check *c, const char *name, JsonNode *node)
{
  gboolean bad;

  keyval_string(c, name, node, &bad);
  if (bad)
    return NULL;
  if (!is_string(node))
    return wrong_type(c, name, "string");
  return json_node_copy(node);
}

static JsonNode *
check_builtin(Check *c, CbtBuiltin b, const char *name, JsonNode *node)
{
  switch (b) {
  case CBT_BUILTIN_STR:
    return check_str(c, name, node);
  case CBT_BUILTIN_NUMBER:
    return check_number(c, name, node);
  case CBT_BUILTIN_BOOL:
    return check_bool(c, name, node);
  case CBT_BUILTIN_NULL:
    if (!JSON_NODE_HOLDS_NULL(node))
      return wrong_type(c, name, "null");
    return json_node_init_null(json_node_alloc());
  case CBT_BUILTIN_ANY:
    return json_node_copy(node);
  default:
    return check_int(c, b, name, node);
  }
}

static JsonNode *
check_enum(Check *c, CbtSchemaType *type, const char *name, JsonNode *node)
{
  g_autoptr(JsonNode) s = check_str(c, name, node);

  if (!s)
    return NULL;
  if (!g_strv_contains((const char *const *)type->values, json_node_get_string(s))) {
    fail(c, "Parameter '%s' does not accept value '%s'", name ? name : "null",
         json_node_get_string(s));
    return NULL;
  }
  return g_steal_pointer(&s);
}

/* ---- containers --------------------------------------------------------------------------- */

/* @pending holds the members not visited yet, built and consumed exactly as QEMU's visitor
 * does with the same GLib hash table, so that with several unexpected members the one reported
 * is QEMU's choice. */
static gboolean
check_members(Check *c, GPtrArray *members, JsonObject *in, JsonObject *out, GHashTable *pending)
{
  for (guint i = 0; i < members->len; i++) {
    CbtSchemaMember *m = members->pdata[i];
    JsonNode *v = json_object_get_member(in, m->name);

    if (!v) {
      if (m->optional)
        continue;
      fail(c, "Parameter '%s' is missing", full_name(c, m->name));
      return FALSE;
    }
    g_hash_table_remove(pending, m->name);
    JsonNode *checked = check_value(c, m->type, m->name, v);
    if (!checked)
      return FALSE;
    json_object_set_member(out, m->name, checked);
  }
  return TRUE;
}

/* The branch members of a flat union, chosen by the (already checked) discriminator. */
static gboolean
check_variant(Check *c, CbtSchemaType *type, JsonObject *in, JsonObject *out, GHashTable *pending)
{
  const char *tag = json_object_get_string_member(out, type->discriminator);

  for (guint i = 0; i < type->variants->len; i++) {
    CbtSchemaVariant *v = type->variants->pdata[i];
    if (g_str_equal(v->name, tag))
      return !v->type || check_members(c, v->type->members, in, out, pending);
  }
  return TRUE;
}

static gboolean
check_unexpected(Check *c, GHashTable *pending)
{
  GHashTableIter iter;
  gpointer key;

  g_hash_table_iter_init(&iter, pending);
  if (g_hash_table_iter_next(&iter, &key, NULL)) {
    fail(c, "Parameter '%s' is unexpected", full_name(c, key));
    return FALSE;
  }
  return TRUE;
}

static GHashTable *
pending_members(JsonObject *in)
{
  GHashTable *pending = g_hash_table_new(g_str_hash, g_str_equal);
  guint n;
  g_autofree const char **names = cbt_json_qdict_order(in, &n);

  for (guint i = 0; i < n; i++)
    g_hash_table_insert(pending, (gpointer)names[i], NULL);
  return pending;
}

static JsonNode *
check_object(Check *c, CbtSchemaType *type, const char *name, JsonNode *node)
{
  if (!JSON_NODE_HOLDS_OBJECT(node))
    return wrong_type(c, name, "object");

  JsonObject *in = json_node_get_object(node);
  g_autoptr(JsonObject) out = json_object_new();
  g_autoptr(GHashTable) pending = pending_members(in);
  Frame f = { name, FALSE, 0 };
  gboolean ok;

  g_array_append_val(c->stack, f);
  ok = check_members(c, type->members, in, out, pending) &&
       (type->kind != CBT_TYPE_UNION || check_variant(c, type, in, out, pending)) &&
       check_unexpected(c, pending);
  g_array_set_size(c->stack, c->stack->len - 1);
  return ok ? json_node_init_object(json_node_alloc(), out) : NULL;
}

static JsonNode *
check_array(Check *c, CbtSchemaType *type, const char *name, JsonNode *node)
{
  if (!JSON_NODE_HOLDS_ARRAY(node))
    return wrong_type(c, name, "array");

  JsonArray *in = json_node_get_array(node);
  g_autoptr(JsonArray) out = json_array_new();
  Frame f = { name, TRUE, 0 };
  guint n = json_array_get_length(in);

  g_array_append_val(c->stack, f);
  for (guint i = 0; i < n; i++) {
    g_array_index(c->stack, Frame, c->stack->len - 1).index = i;
    JsonNode *elem = check_value(c, type->element, NULL, json_array_get_element(in, i));
    if (!elem)
      break;
    json_array_add_element(out, elem);
  }
  g_array_set_size(c->stack, c->stack->len - 1);
  return c->error ? NULL : json_node_init_array(json_node_alloc(), out);
}

/* Does alternate branch @t take a value of @node's JSON type? */
static gboolean
branch_fits(CbtSchemaType *t, JsonNode *node)
{
  switch (JSON_NODE_TYPE(node)) {
  case JSON_NODE_OBJECT:
    return t->kind == CBT_TYPE_STRUCT || t->kind == CBT_TYPE_UNION;
  case JSON_NODE_ARRAY:
    return t->kind == CBT_TYPE_ARRAY;
  case JSON_NODE_NULL:
    return t->kind == CBT_TYPE_BUILTIN && t->builtin == CBT_BUILTIN_NULL;
  default:
    break;
  }
  GType vt = cbt_json_get_big_uint(node, NULL) ? G_TYPE_UINT64 : json_node_get_value_type(node);
  if (vt == G_TYPE_STRING)
    return t->kind == CBT_TYPE_ENUM ||
           (t->kind == CBT_TYPE_BUILTIN && t->builtin == CBT_BUILTIN_STR);
  if (t->kind != CBT_TYPE_BUILTIN)
    return FALSE;
  if (vt == G_TYPE_BOOLEAN)
    return t->builtin == CBT_BUILTIN_BOOL;
  /* Numbers go to the integer or number branch (a double then fails the integer check). */
  return t->builtin != CBT_BUILTIN_STR && t->builtin != CBT_BUILTIN_BOOL &&
         t->builtin != CBT_BUILTIN_NULL && t->builtin != CBT_BUILTIN_ANY;
}

static JsonNode *
check_alternate(Check *c, CbtSchemaType *type, const char *name, JsonNode *node)
{
  for (guint i = 0; i < type->variants->len; i++) {
    CbtSchemaVariant *v = type->variants->pdata[i];
    if (branch_fits(v->type, node))
      return check_value(c, v->type, name, node);
  }
  fail(c, "Invalid parameter type for '%s', expected: %s", name ? name : "null", type->name);
  return NULL;
}

static JsonNode *
check_value(Check *c, CbtSchemaType *type, const char *name, JsonNode *node)
{
  switch (type->kind) {
  case CBT_TYPE_BUILTIN:
    return check_builtin(c, type->builtin, name, node);
  case CBT_TYPE_ENUM:
    return check_enum(c, type, name, node);
  case CBT_TYPE_STRUCT:
  case CBT_TYPE_UNION:
    return check_object(c, type, name, node);
  case CBT_TYPE_ALTERNATE:
    return check_alternate(c, type, name, node);
  case CBT_TYPE_ARRAY:
    return check_array(c, type, name, node);
  }
  g_assert_not_reached();
}

JsonNode *
cbt_schema_check(CbtSchemaType *type, JsonNode *value, gboolean keyval, GError **error)
{
  Check c = { keyval, g_array_new(FALSE, FALSE, sizeof(Frame)), g_string_new(NULL), NULL };
  g_autoptr(JsonNode) empty = NULL;
  JsonNode *out;

  if (!value)
    value = empty = cbt_json_object_node(json_object_new());
  out = check_value(&c, type, NULL, value);
  g_array_unref(c.stack);
  g_string_free(c.path, TRUE);
  if (!out) {
    if (!c.error)
      c.error = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Invalid arguments");
    g_propagate_error(error, c.error);
    return NULL;
  }
  return out;
}
