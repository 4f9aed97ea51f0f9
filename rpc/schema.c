/* The schema model: the files of schemas/ (merged by gen-schema.py and compiled in) turned into
 * types and commands that the validator (schema-check.c) and introspection walk.
 *
 * gen-schema.py has already checked the structure (names defined once, references resolve),
 * so a failure here is a build defect and reported as such.
 */
#include "rpc/rpc-private.h"

#include <string.h>

static const struct {
  const char *name;
  CbtBuiltin code;
} builtins[] = {
  { "str", CBT_BUILTIN_STR },       { "int", CBT_BUILTIN_INT },
  { "int8", CBT_BUILTIN_INT8 },     { "int16", CBT_BUILTIN_INT16 },
  { "int32", CBT_BUILTIN_INT32 },   { "int64", CBT_BUILTIN_INT64 },
  { "uint8", CBT_BUILTIN_UINT8 },   { "uint16", CBT_BUILTIN_UINT16 },
  { "uint32", CBT_BUILTIN_UINT32 }, { "uint64", CBT_BUILTIN_UINT64 },
  { "size", CBT_BUILTIN_SIZE },     { "number", CBT_BUILTIN_NUMBER },
  { "bool", CBT_BUILTIN_BOOL },     { "null", CBT_BUILTIN_NULL },
  { "any", CBT_BUILTIN_ANY },
};

static void
member_free(gpointer p)
{
  CbtSchemaMember *m = p;

  g_free(m->name);
  g_strfreev(m->features);
  g_free(m);
}

static void
variant_free(gpointer p)
{
  CbtSchemaVariant *v = p;

  g_free(v->name);
  g_free(v);
}

static void
type_free(gpointer p)
{
  CbtSchemaType *t = p;

  g_free(t->name);
  g_strfreev(t->features);
  g_strfreev(t->values);
  g_clear_pointer(&t->members, g_ptr_array_unref);
  g_free(t->discriminator);
  g_clear_pointer(&t->variants, g_ptr_array_unref);
  g_free(t);
}

static void
command_free(gpointer p)
{
  CbtSchemaCommand *c = p;

  g_free(c->name);
  g_strfreev(c->features);
  g_free(c);
}

void
cbt_schema_free(CbtSchema *schema)
{
  if (!schema)
    return;
  g_hash_table_unref(schema->types);
  g_hash_table_unref(schema->commands);
  g_hash_table_unref(schema->events);
  g_ptr_array_unref(schema->entities);
  g_free(schema);
}

CbtSchemaType *
cbt_schema_lookup_type(CbtSchema *schema, const char *name)
{
  return g_hash_table_lookup(schema->types, name);
}

static CbtSchemaType *
type_new(CbtSchema *schema, CbtTypeKind kind, const char *name)
{
  CbtSchemaType *t = g_new0(CbtSchemaType, 1);

  t->kind = kind;
  t->name = g_strdup(name);
  t->intro_id = -1;
  if (kind == CBT_TYPE_STRUCT || kind == CBT_TYPE_UNION)
    t->members = g_ptr_array_new_with_free_func(member_free);
  if (kind == CBT_TYPE_UNION || kind == CBT_TYPE_ALTERNATE)
    t->variants = g_ptr_array_new_with_free_func(variant_free);
  g_hash_table_insert(schema->types, t->name, t);
  return t;
}

static char **
string_list(JsonObject *ent, const char *member)
{
  JsonArray *arr =
    json_object_has_member(ent, member) ? json_object_get_array_member(ent, member) : NULL;
  guint n = arr ? json_array_get_length(arr) : 0;
  char **out = g_new0(char *, n + 1);

  for (guint i = 0; i < n; i++)
    out[i] = g_strdup(json_array_get_string_element(arr, i));
  return out;
}

typedef struct {
  CbtSchema *schema;
  GError **error;
  GHashTable *entity_index; /* type name -> its entity, to fill bases on demand */
} Loader;

/* A type reference: a name, or a one-element array for a list. */
static CbtSchemaType *
resolve(Loader *ld, JsonNode *ref)
{
  if (JSON_NODE_HOLDS_ARRAY(ref)) {
    JsonArray *arr = json_node_get_array(ref);
    CbtSchemaType *elem =
      json_array_get_length(arr) == 1 ? resolve(ld, json_array_get_element(arr, 0)) : NULL;
    if (!elem)
      return NULL;
    g_autofree char *name = g_strdup_printf("[%s]", elem->name);
    CbtSchemaType *t = cbt_schema_lookup_type(ld->schema, name);
    if (!t) {
      t = type_new(ld->schema, CBT_TYPE_ARRAY, name);
      t->element = elem;
    }
    return t;
  }
  const char *name = JSON_NODE_HOLDS_VALUE(ref) ? json_node_get_string(ref) : NULL;
  CbtSchemaType *t = name ? cbt_schema_lookup_type(ld->schema, name) : NULL;
  if (!t)
    g_set_error(ld->error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "schema: unknown type %s",
                name ? name : "(not a name)");
  return t;
}

static gboolean
add_member(Loader *ld, CbtSchemaType *t, const char *key, JsonNode *spec)
{
  CbtSchemaMember *m = g_new0(CbtSchemaMember, 1);
  JsonNode *ref = spec;

  m->optional = key[0] == '*';
  m->name = g_strdup(key + m->optional);
  if (JSON_NODE_HOLDS_OBJECT(spec)) {
    JsonObject *o = json_node_get_object(spec);
    ref = json_object_get_member(o, "type");
    m->features = string_list(o, "features");
  } else {
    m->features = g_new0(char *, 1);
  }
  g_ptr_array_add(t->members, m);
  m->type = ref ? resolve(ld, ref) : NULL;
  return m->type != NULL;
}

static gboolean fill_type(Loader *ld, CbtSchemaType *t, JsonObject *ent);

/* Members from an inline object or the name of a struct (whose members are copied). */
static gboolean
add_members(Loader *ld, CbtSchemaType *t, JsonNode *data)
{
  if (JSON_NODE_HOLDS_OBJECT(data)) {
    JsonObjectIter iter;
    const char *key;
    JsonNode *spec;

    json_object_iter_init_ordered(&iter, json_node_get_object(data));
    while (json_object_iter_next_ordered(&iter, &key, &spec)) {
      if (!add_member(ld, t, key, spec))
        return FALSE;
    }
    return TRUE;
  }
  CbtSchemaType *base = resolve(ld, data);
  if (!base)
    return FALSE;
  if (base->kind != CBT_TYPE_STRUCT) {
    g_set_error(ld->error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "schema: %s is not a struct",
                base->name);
    return FALSE;
  }
  for (guint i = 0; i < base->members->len; i++) {
    CbtSchemaMember *bm = base->members->pdata[i];
    CbtSchemaMember *m = g_new0(CbtSchemaMember, 1);

    m->name = g_strdup(bm->name);
    m->optional = bm->optional;
    m->type = bm->type;
    m->features = g_strdupv(bm->features);
    g_ptr_array_add(t->members, m);
  }
  return TRUE;
}

static CbtSchemaMember *
find_member(CbtSchemaType *t, const char *name)
{
  for (guint i = 0; i < t->members->len; i++) {
    CbtSchemaMember *m = t->members->pdata[i];
    if (g_str_equal(m->name, name))
      return m;
  }
  return NULL;
}

static gboolean
fill_union(Loader *ld, CbtSchemaType *t, JsonObject *ent)
{
  t->discriminator = g_strdup(json_object_get_string_member(ent, "discriminator"));
  CbtSchemaMember *tag = find_member(t, t->discriminator);
  if (!tag || tag->type->kind != CBT_TYPE_ENUM) {
    g_set_error(ld->error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "schema: union %s: discriminator is not an enum member", t->name);
    return FALSE;
  }
  JsonObject *data = json_object_get_object_member(ent, "data");
  /* Branches listed first, then the enum values without one, as QEMU introspects them. */
  for (char **v = tag->type->values; *v; v++) {
    if (!json_object_has_member(data, *v))
      continue;
    CbtSchemaVariant *var = g_new0(CbtSchemaVariant, 1);
    var->name = g_strdup(*v);
    g_ptr_array_add(t->variants, var);
    var->type = resolve(ld, json_object_get_member(data, *v));
    if (!var->type)
      return FALSE;
  }
  for (char **v = tag->type->values; *v; v++) {
    if (json_object_has_member(data, *v))
      continue;
    CbtSchemaVariant *var = g_new0(CbtSchemaVariant, 1);
    var->name = g_strdup(*v);
    g_ptr_array_add(t->variants, var);
  }
  return TRUE;
}

static gboolean
fill_alternate(Loader *ld, CbtSchemaType *t, JsonObject *ent)
{
  JsonObjectIter iter;
  const char *key;
  JsonNode *ref;

  json_object_iter_init_ordered(&iter, json_object_get_object_member(ent, "data"));
  while (json_object_iter_next_ordered(&iter, &key, &ref)) {
    CbtSchemaVariant *var = g_new0(CbtSchemaVariant, 1);
    var->name = g_strdup(key);
    g_ptr_array_add(t->variants, var);
    var->type = resolve(ld, ref);
    if (!var->type)
      return FALSE;
  }
  return TRUE;
}

static gboolean
fill_base_first(Loader *ld, JsonNode *base)
{
  if (!JSON_NODE_HOLDS_VALUE(base))
    return TRUE;
  CbtSchemaType *bt = cbt_schema_lookup_type(ld->schema, json_node_get_string(base));
  JsonObject *bent = bt ? g_hash_table_lookup(ld->entity_index, bt->name) : NULL;
  return !bent || fill_type(ld, bt, bent);
}

static gboolean
fill_type(Loader *ld, CbtSchemaType *t, JsonObject *ent)
{
  if (t->intro_id != -1)
    return TRUE; /* already filled (bases are filled on demand) */
  t->intro_id = -2;
  t->features = string_list(ent, "features");
  switch (t->kind) {
  case CBT_TYPE_ENUM:
    t->values = string_list(ent, "data");
    return TRUE;
  case CBT_TYPE_STRUCT:
    if (json_object_has_member(ent, "base") &&
        (!fill_base_first(ld, json_object_get_member(ent, "base")) ||
         !add_members(ld, t, json_object_get_member(ent, "base"))))
      return FALSE;
    return add_members(ld, t, json_object_get_member(ent, "data"));
  case CBT_TYPE_UNION:
    if (!fill_base_first(ld, json_object_get_member(ent, "base")) ||
        !add_members(ld, t, json_object_get_member(ent, "base")))
      return FALSE;
    return fill_union(ld, t, ent);
  case CBT_TYPE_ALTERNATE:
    return fill_alternate(ld, t, ent);
  default:
    return TRUE;
  }
}

/* Arguments of a command or event: none, inline members, or a named struct/union. */
static gboolean
load_entity(Loader *ld, JsonObject *ent, const char *kind)
{
  CbtSchemaCommand *c = g_new0(CbtSchemaCommand, 1);
  JsonNode *data = json_object_get_member(ent, "data");

  c->name = g_strdup(json_object_get_string_member(ent, kind));
  c->is_event = g_str_equal(kind, "event");
  c->features = string_list(ent, "features");
  g_ptr_array_add(ld->schema->entities, c);
  g_hash_table_insert(c->is_event ? ld->schema->events : ld->schema->commands, c->name, c);
  if (data && JSON_NODE_HOLDS_OBJECT(data)) {
    g_autofree char *name = g_strdup_printf("q_obj_%s-arg", c->name);
    c->args = type_new(ld->schema, CBT_TYPE_STRUCT, name);
    c->args->intro_id = -2;
    c->args->features = g_new0(char *, 1);
    if (!add_members(ld, c->args, data))
      return FALSE;
  } else if (data) {
    c->args = resolve(ld, data);
    if (!c->args)
      return FALSE;
  }
  if (json_object_has_member(ent, "returns")) {
    c->ret = resolve(ld, json_object_get_member(ent, "returns"));
    if (!c->ret)
      return FALSE;
  }
  return TRUE;
}

static const char *const kinds[] = { "enum", "struct", "union", "alternate", "command", "event" };

static const char *
entity_kind(JsonObject *ent)
{
  for (guint i = 0; i < G_N_ELEMENTS(kinds); i++) {
    if (json_object_has_member(ent, kinds[i]))
      return kinds[i];
  }
  return NULL;
}

static gboolean
load_all(Loader *ld, JsonArray *arr)
{
  guint n = json_array_get_length(arr);
  static const CbtTypeKind type_kinds[] = { CBT_TYPE_ENUM, CBT_TYPE_STRUCT, CBT_TYPE_UNION,
                                            CBT_TYPE_ALTERNATE };

  for (guint i = 0; i < n; i++) { /* declare every named type first */
    JsonObject *ent = json_array_get_object_element(arr, i);
    const char *kind = entity_kind(ent);
    for (guint k = 0; kind && k < G_N_ELEMENTS(type_kinds); k++) {
      if (g_str_equal(kind, kinds[k])) {
        const char *name = json_object_get_string_member(ent, kind);
        type_new(ld->schema, type_kinds[k], name);
        g_hash_table_insert(ld->entity_index, (gpointer)name, ent);
      }
    }
  }
  for (guint i = 0; i < n; i++) {
    JsonObject *ent = json_array_get_object_element(arr, i);
    const char *kind = entity_kind(ent);
    gboolean ok;

    if (!kind) {
      g_set_error(ld->error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "schema: entity %u has no kind",
                  i);
      return FALSE;
    }
    if (g_str_equal(kind, "command") || g_str_equal(kind, "event"))
      ok = load_entity(ld, ent, kind);
    else
      ok = fill_type(
        ld, cbt_schema_lookup_type(ld->schema, json_object_get_string_member(ent, kind)), ent);
    if (!ok)
      return FALSE;
  }
  return TRUE;
}

static void
reset_ids(gpointer key, gpointer value, gpointer user_data)
{
  ((CbtSchemaType *)value)->intro_id = -1;
}

CbtSchema *
cbt_schema_load(const char *json_text, GError **error)
{
  g_autoptr(JsonParser) parser = json_parser_new();
  CbtSchema *schema = g_new0(CbtSchema, 1);
  Loader ld = { schema, error, NULL };
  gboolean ok;

  schema->types = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, type_free);
  schema->entities = g_ptr_array_new_with_free_func(command_free);
  schema->commands = g_hash_table_new(g_str_hash, g_str_equal);
  schema->events = g_hash_table_new(g_str_hash, g_str_equal);
  for (guint i = 0; i < G_N_ELEMENTS(builtins); i++)
    type_new(schema, CBT_TYPE_BUILTIN, builtins[i].name)->builtin = builtins[i].code;
  schema->empty = type_new(schema, CBT_TYPE_STRUCT, "q_empty");

  if (!json_parser_load_from_data(parser, json_text, -1, error)) {
    cbt_schema_free(schema);
    return NULL;
  }
  JsonNode *root = json_parser_get_root(parser);
  ld.entity_index = g_hash_table_new(g_str_hash, g_str_equal);
  ok = root && JSON_NODE_HOLDS_ARRAY(root) && load_all(&ld, json_node_get_array(root));
  g_clear_pointer(&ld.entity_index, g_hash_table_unref);
  if (!ok) {
    if (error && !*error)
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "schema: not an entity list");
    cbt_schema_free(schema);
    return NULL;
  }
  g_hash_table_foreach(schema->types, reset_ids, NULL);
  for (guint i = 0; i < G_N_ELEMENTS(builtins); i++)
    cbt_schema_lookup_type(schema, builtins[i].name)->features = g_new0(char *, 1);
  schema->empty->features = g_new0(char *, 1);
  return schema;
}
