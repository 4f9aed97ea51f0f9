/* open.c — from validated BlockdevOptions to an opened node, in QEMU's order: inline children
 * first, then the node name (generated as "#blockNNN" for unnamed children), then the driver.
 * Inline children inherit read-only, auto-read-only, force-share and the cache mode from their
 * parent, and default to discard=unmap (the parent's policy is checked first), as in QEMU.
 */
#include <string.h>
#include "blockdev/blockdev-internal.h"

#define NODE_NAME_MAX 31 /* QEMU keeps node names in char[32] */

static const CbtBlockdevDriver *const drivers[] = {
  &cbt_blockdev_file_driver,
  &cbt_blockdev_host_device_driver,
  &cbt_blockdev_raw_driver,
  &cbt_blockdev_null_driver,
  &cbt_blockdev_null_aio_driver,
};

static guint64 generated_names;

static const CbtBlockdevDriver *
find_driver(const char *name, GError **error)
{
  for (gsize i = 0; i < G_N_ELEMENTS(drivers); i++)
    if (strcmp(drivers[i]->name, name) == 0)
      return drivers[i];
  g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Driver '%s' is not supported by cbtd", name);
  return NULL;
}

/* QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
static gboolean
name_wellformed(const char *name)
{
  if (!g_ascii_isalpha(name[0]))
    return FALSE;
  for (const char *p = name + 1; *p; p++)
    if (!g_ascii_isalnum(*p) && !strchr("-._", *p))
      return FALSE;
  return TRUE;
}

static gboolean
assign_name(CbtBlockdev *bd, const char *name, GError **error)
{
  if (!name) {
    /* QEMU: a counter, then two random digits. */
    bd->node_name = g_strdup_printf("#block%" G_GUINT64_FORMAT "%02d", generated_names++,
                                    g_random_int_range(0, 100));
    return TRUE;
  }
  if (!name_wellformed(name)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Invalid node-name: '%s'", name);
    return FALSE;
  }
  if (cbt_blockdev_find(name)) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Duplicate nodes with node-name='%s'", name);
    return FALSE;
  }
  if (strlen(name) > NODE_NAME_MAX) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Node name too long");
    return FALSE;
  }
  bd->node_name = g_strdup(name);
  return TRUE;
}

static gboolean
get_bool(JsonObject *o, const char *member, gboolean dflt)
{
  return json_object_has_member(o, member) ? json_object_get_boolean_member(o, member) : dflt;
}

static void
copy_default(JsonObject *child, JsonObject *parent, const char *member)
{
  if (!json_object_has_member(child, member) && json_object_has_member(parent, member))
    json_object_set_member(child, member,
                           json_node_copy(json_object_get_member(parent, member)));
}

/* The options an inline child is opened with: its own, completed by inheritance. */
static JsonObject *
child_options(JsonObject *parent, JsonObject *own)
{
  JsonObject *child = json_object_new();
  JsonObjectIter it;
  const char *name;
  JsonNode *node;

  json_object_iter_init(&it, own);
  while (json_object_iter_next(&it, &name, &node))
    json_object_set_member(child, name, json_node_copy(node));
  if (json_object_has_member(parent, "cache")) {
    JsonObject *pc = json_object_get_object_member(parent, "cache");
    if (!json_object_has_member(child, "cache"))
      json_object_set_object_member(child, "cache", json_object_new());
    JsonObject *cc = json_object_get_object_member(child, "cache");
    copy_default(cc, pc, "direct");
    copy_default(cc, pc, "no-flush");
  }
  copy_default(child, parent, "force-share");
  copy_default(child, parent, "read-only");
  copy_default(child, parent, "auto-read-only");
  if (!json_object_has_member(child, "discard"))
    json_object_set_string_member(child, "discard", "unmap");
  return child;
}

static CbtBlockdev *open_node(JsonObject *opts, gboolean root, GError **error);

/* The "file" member: an existing node by name, or an inline definition. */
static CbtBlockdev *
open_child(JsonObject *opts, GError **error)
{
  JsonNode *ref = json_object_get_member(opts, "file");

  if (JSON_NODE_HOLDS_VALUE(ref)) {
    const char *name = json_node_get_string(ref);
    CbtBlockdev *bd = cbt_blockdev_find(name);
    if (!bd) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot find device='%s' nor node-name='%s'",
                  name, name);
      return NULL;
    }
    return cbt_blockdev_ref(bd);
  }
  JsonObject *copts = child_options(opts, json_node_get_object(ref));
  CbtBlockdev *bd = open_node(copts, FALSE, error);
  json_object_unref(copts);
  return bd;
}

static void
parse_common(CbtBlockdev *bd, JsonObject *opts)
{
  const char *dz = json_object_get_string_member_with_default(opts, "detect-zeroes", "off");

  bd->read_only = get_bool(opts, "read-only", FALSE);
  bd->auto_read_only = get_bool(opts, "auto-read-only", FALSE);
  bd->force_share = get_bool(opts, "force-share", FALSE);
  bd->discard_unmap =
    g_strcmp0(json_object_get_string_member_with_default(opts, "discard", "ignore"),
              "unmap") == 0;
  if (json_object_has_member(opts, "cache")) {
    JsonObject *c = json_object_get_object_member(opts, "cache");
    bd->cache_direct = get_bool(c, "direct", FALSE);
    bd->cache_no_flush = get_bool(c, "no-flush", FALSE);
  }
  bd->detect_zeroes = strcmp(dz, "unmap") == 0 ? CBT_DETECT_ZEROES_UNMAP :
                      strcmp(dz, "on") == 0 ? CBT_DETECT_ZEROES_ON : CBT_DETECT_ZEROES_OFF;
}

/* The generic checks QEMU makes after opening the children and before naming the node, in its
 * order. */
static gboolean
check_common(CbtBlockdev *bd, JsonObject *opts, GError **error)
{
  const char *filename = json_object_get_string_member_with_default(opts, "filename", NULL);

  if (bd->force_share && !bd->read_only) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "force-share=on can only be used with read-only images");
    return FALSE;
  }
  if (filename && !filename[0]) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "The '%s' block driver requires a file name",
                bd->drv->name);
    return FALSE;
  }
  if (bd->detect_zeroes == CBT_DETECT_ZEROES_UNMAP && !bd->discard_unmap) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "setting detect-zeroes to unmap is not allowed "
                "without setting discard operation to unmap");
    return FALSE;
  }
  return TRUE;
}

static CbtBlockdev *
open_node(JsonObject *opts, gboolean root, GError **error)
{
  const char *name = json_object_get_string_member_with_default(opts, "node-name", NULL);
  const CbtBlockdevDriver *drv;
  g_autoptr(CbtBlockdev) child = NULL;

  if (root && !name) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "'node-name' must be specified for the root node");
    return NULL;
  }
  /* QEMU opens (or looks up) the children first. */
  if (json_object_has_member(opts, "file") && !(child = open_child(opts, error)))
    return NULL;
  drv = find_driver(json_object_get_string_member(opts, "driver"), error);
  if (!drv)
    return NULL;

  CbtBlockdev *bd = cbt_blockdev_new(drv);
  bd->full_opts = json_object_new();
  json_object_set_string_member(bd->full_opts, "driver", drv->name);
  parse_common(bd, opts);
  if (!check_common(bd, opts, error) || !assign_name(bd, name, error))
    goto fail;
  if (child) {
    bd->child = g_steal_pointer(&child);
    bd->child->parents++;
    json_object_set_object_member(bd->full_opts, "file",
                                  json_object_ref(bd->child->full_opts));
  }
  if (!drv->open(bd, opts, error))
    goto fail;
  cbt_blockdev_register(bd);
  return bd;

fail:
  /* Never published: no hook may see it. */
  if (bd->child) {
    bd->child->parents--;
    cbt_blockdev_unref(bd->child);
  }
  json_object_unref(bd->full_opts);
  g_free(bd->node_name);
  g_free(bd);
  return NULL;
}

CbtBlockdev *
cbt_blockdev_open(JsonObject *opts, GError **error)
{
  CbtBlockdev *bd = open_node(opts, TRUE, error);

  if (bd)
    bd->monitor_owned = TRUE;
  return bd;
}
