/* query-qmp-schema: the schema as QEMU's SchemaInfo list.
 *
 * As QEMU does: commands and events come first in schema order; then every type they reach, in
 * the order first referenced. Type names other than builtins are replaced by decimal numbers
 * (the empty object, used by commands without arguments or return value, is always "0"); all
 * integer types show as "int"; optional members carry "default": null; a flat union lists its
 * enum values without a branch last, with the empty object as their type.
 */
#include "rpc/rpc-private.h"

typedef struct {
  CbtSchema *schema;
  GPtrArray *used; /* CbtSchemaType*, in order of first reference */
  GHashTable *used_set;
  GHashTable *emitted; /* names already emitted (several int arrays share "[int]") */
  int next_id;
  JsonArray *out;
} Intro;

static const char *
json_type_of(CbtBuiltin b)
{
  switch (b) {
  case CBT_BUILTIN_STR:
    return "string";
  case CBT_BUILTIN_NUMBER:
    return "number";
  case CBT_BUILTIN_BOOL:
    return "boolean";
  case CBT_BUILTIN_NULL:
    return "null";
  case CBT_BUILTIN_ANY:
    return "value";
  default:
    return "int";
  }
}

static gboolean
is_int_type(CbtSchemaType *t)
{
  return t->kind == CBT_TYPE_BUILTIN && g_str_equal(json_type_of(t->builtin), "int");
}

/* Record a use of @t and return the name clients see (transfer full). */
static char *
use_type(Intro *in, CbtSchemaType *t)
{
  if (is_int_type(t))
    t = cbt_schema_lookup_type(in->schema, "int");
  if (!g_hash_table_contains(in->used_set, t)) {
    g_hash_table_add(in->used_set, t);
    g_ptr_array_add(in->used, t);
  }
  if (t->kind == CBT_TYPE_BUILTIN)
    return g_strdup(t->name);
  if (t->kind == CBT_TYPE_ARRAY) {
    g_autofree char *elem = use_type(in, t->element);
    return g_strdup_printf("[%s]", elem);
  }
  if (t->intro_id < 0)
    t->intro_id = in->next_id++;
  return g_strdup_printf("%d", t->intro_id);
}

static void
add_features(JsonObject *o, char **features)
{
  if (!features || !features[0])
    return;
  JsonArray *arr = json_array_new();
  for (char **f = features; *f; f++)
    json_array_add_string_element(arr, *f);
  json_object_set_array_member(o, "features", arr);
}

static void
set_type(Intro *in, JsonObject *o, const char *key, CbtSchemaType *t)
{
  g_autofree char *name = use_type(in, t ? t : in->schema->empty);
  json_object_set_string_member(o, key, name);
}

static JsonArray *
object_members(Intro *in, CbtSchemaType *t)
{
  JsonArray *arr = json_array_new();

  for (guint i = 0; i < t->members->len; i++) {
    CbtSchemaMember *m = t->members->pdata[i];
    JsonObject *mo = json_object_new();

    json_object_set_string_member(mo, "name", m->name);
    set_type(in, mo, "type", m->type);
    if (m->optional)
      json_object_set_null_member(mo, "default");
    add_features(mo, m->features);
    json_array_add_object_element(arr, mo);
  }
  return arr;
}

static void
fill_union(Intro *in, JsonObject *o, CbtSchemaType *t)
{
  JsonArray *arr = json_array_new();

  json_object_set_string_member(o, "tag", t->discriminator);
  for (guint i = 0; i < t->variants->len; i++) {
    CbtSchemaVariant *v = t->variants->pdata[i];
    JsonObject *vo = json_object_new();

    json_object_set_string_member(vo, "case", v->name);
    set_type(in, vo, "type", v->type);
    json_array_add_object_element(arr, vo);
  }
  json_object_set_array_member(o, "variants", arr);
}

static void
fill_type(Intro *in, JsonObject *o, CbtSchemaType *t)
{
  switch (t->kind) {
  case CBT_TYPE_BUILTIN:
    json_object_set_string_member(o, "json-type", json_type_of(t->builtin));
    json_object_set_string_member(o, "meta-type", "builtin");
    return;
  case CBT_TYPE_ENUM: {
    JsonArray *values = json_array_new(), *members = json_array_new();
    for (char **v = t->values; *v; v++) {
      JsonObject *mo = json_object_new();
      json_object_set_string_member(mo, "name", *v);
      json_array_add_object_element(members, mo);
      json_array_add_string_element(values, *v);
    }
    json_object_set_array_member(o, "members", members);
    json_object_set_string_member(o, "meta-type", "enum");
    json_object_set_array_member(o, "values", values);
    return;
  }
  case CBT_TYPE_ARRAY:
    set_type(in, o, "element-type", t->element);
    json_object_set_string_member(o, "meta-type", "array");
    return;
  case CBT_TYPE_ALTERNATE: {
    JsonArray *members = json_array_new();
    for (guint i = 0; i < t->variants->len; i++) {
      JsonObject *mo = json_object_new();
      set_type(in, mo, "type", ((CbtSchemaVariant *)t->variants->pdata[i])->type);
      json_array_add_object_element(members, mo);
    }
    json_object_set_array_member(o, "members", members);
    json_object_set_string_member(o, "meta-type", "alternate");
    return;
  }
  case CBT_TYPE_STRUCT:
  case CBT_TYPE_UNION:
    json_object_set_array_member(o, "members", object_members(in, t));
    json_object_set_string_member(o, "meta-type", "object");
    if (t->kind == CBT_TYPE_UNION)
      fill_union(in, o, t);
    return;
  }
}

static void
emit_type(Intro *in, CbtSchemaType *t)
{
  g_autofree char *name = use_type(in, t);

  if (!g_hash_table_add(in->emitted, g_strdup(name)))
    return;
  JsonObject *o = json_object_new();
  json_object_set_string_member(o, "name", name);
  fill_type(in, o, t);
  add_features(o, t->features);
  json_array_add_object_element(in->out, o);
}

static void
emit_entity(Intro *in, CbtSchemaCommand *c)
{
  JsonObject *o = json_object_new();

  json_object_set_string_member(o, "name", c->name);
  set_type(in, o, "arg-type", c->args);
  if (!c->is_event)
    set_type(in, o, "ret-type", c->ret);
  json_object_set_string_member(o, "meta-type", c->is_event ? "event" : "command");
  add_features(o, c->features);
  json_array_add_object_element(in->out, o);
}

static void
clear_id(gpointer key, gpointer value, gpointer user_data)
{
  ((CbtSchemaType *)value)->intro_id = -1;
}

JsonNode *
cbt_introspect_build(CbtSchema *schema)
{
  Intro in = { schema,
               g_ptr_array_new(),
               g_hash_table_new(NULL, NULL),
               g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL),
               0,
               json_array_new() };
  JsonNode *result;

  g_hash_table_foreach(schema->types, clear_id, NULL);
  g_free(use_type(&in, schema->empty)); /* the empty object is "0" */
  for (guint i = 0; i < schema->entities->len; i++)
    emit_entity(&in, schema->entities->pdata[i]);
  for (guint i = 0; i < in.used->len; i++) /* grows while types reference others */
    emit_type(&in, in.used->pdata[i]);

  result = json_node_init_array(json_node_alloc(), in.out);
  json_array_unref(in.out);
  g_ptr_array_unref(in.used);
  g_hash_table_unref(in.used_set);
  g_hash_table_unref(in.emitted);
  return result;
}
