/* open.c — from checked BlockdevOptions to an opened node, in QEMU's order: inline children
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
  &cbt_blockdev_cbw_driver,
  &cbt_blockdev_snapshot_access_driver,
  &cbt_blockdev_blkdebug_driver,
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

/* What an inline child takes from its parent when it does not set it itself (QEMU's
 * inheritance): read-only, auto-read-only, force-share and the cache mode; discard defaults to
 * unmap for children, so the parent's policy alone decides. */
typedef struct {
  gboolean read_only, auto_read_only, force_share;
  gboolean cache_direct, cache_no_flush;
  gboolean discard_unmap;
} Inherited;

static const Inherited root_defaults = { 0 };

static CbtBlockdev *open_node(const CbtQmpBlockdevOptions *opts, const Inherited *from,
                              gboolean root, GError **error);

/* The common options of a node: its own where given, else what it inherited. */
static Inherited
resolve_common(const CbtQmpBlockdevOptions *opts, const Inherited *from)
{
  const CbtQmpBlockdevCacheOptions *c = opts->cache;

  return (Inherited){
    .read_only = opts->has_read_only ? opts->read_only : from->read_only,
    .auto_read_only = opts->has_auto_read_only ? opts->auto_read_only : from->auto_read_only,
    .force_share = opts->has_force_share ? opts->force_share : from->force_share,
    .cache_direct = c && c->has_direct ? c->direct : from->cache_direct,
    .cache_no_flush = c && c->has_no_flush ? c->no_flush : from->cache_no_flush,
    .discard_unmap = opts->has_discard ? opts->discard == CBT_QMP_BLOCKDEV_DISCARD_OPTIONS_UNMAP
                                       : from->discard_unmap,
  };
}

/* The `file` member: an existing node by name, or an inline definition that inherits
 * @parent's options. */
static CbtBlockdev *
open_child(const CbtQmpBlockdevRef *ref, const Inherited *parent, GError **error)
{
  if (ref->type == CBT_QMP_BLOCKDEV_REF_KIND_REFERENCE) {
    const char *name = ref->u.reference;
    CbtBlockdev *bd = cbt_blockdev_find(name);
    if (!bd) {
      g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "Cannot find device='%s' nor node-name='%s'", name,
                  name);
      return NULL;
    }
    return cbt_blockdev_ref(bd);
  }
  Inherited from = *parent;
  from.discard_unmap = TRUE;
  return open_node(ref->u.definition, &from, FALSE, error);
}

/* The role a driver gives its child @name (its table of children). */
static guint
child_role(const CbtBlockdevDriver *drv, const char *name)
{
  for (const CbtBlockdevChildSpec *c = drv->children; c && c->name; c++)
    if (g_str_equal(c->name, name))
      return c->role;
  return CBT_BLOCKDEV_CHILD_DATA | CBT_BLOCKDEV_CHILD_PRIMARY;
}

/* The child reference of a format driver's options, or NULL for protocol drivers. */
static const CbtQmpBlockdevRef *
child_ref(const CbtQmpBlockdevOptions *opts)
{
  switch (opts->driver) {
  case CBT_QMP_BLOCKDEV_DRIVER_RAW:
    return opts->u.raw.file;
  case CBT_QMP_BLOCKDEV_DRIVER_COPY_BEFORE_WRITE:
    return opts->u.copy_before_write.file;
  case CBT_QMP_BLOCKDEV_DRIVER_BOCHS:
  case CBT_QMP_BLOCKDEV_DRIVER_CLOOP:
  case CBT_QMP_BLOCKDEV_DRIVER_COMPRESS:
  case CBT_QMP_BLOCKDEV_DRIVER_DMG:
  case CBT_QMP_BLOCKDEV_DRIVER_PARALLELS:
  case CBT_QMP_BLOCKDEV_DRIVER_SNAPSHOT_ACCESS:
  case CBT_QMP_BLOCKDEV_DRIVER_VDI:
  case CBT_QMP_BLOCKDEV_DRIVER_VHDX:
  case CBT_QMP_BLOCKDEV_DRIVER_VPC:
    return opts->u.bochs.file; /* every one is a BlockdevOptionsGenericFormat */
  case CBT_QMP_BLOCKDEV_DRIVER_QCOW:
  case CBT_QMP_BLOCKDEV_DRIVER_QCOW2:
  case CBT_QMP_BLOCKDEV_DRIVER_QED:
  case CBT_QMP_BLOCKDEV_DRIVER_VMDK:
    return opts->u.qcow2.file; /* every one is a BlockdevOptionsGenericCOWFormat */
  default:
    return NULL;
  }
}

static void
set_common(CbtBlockdev *bd, const Inherited *c, const CbtQmpBlockdevOptions *opts)
{
  bd->read_only = c->read_only;
  bd->auto_read_only = c->auto_read_only;
  bd->force_share = c->force_share;
  bd->discard_unmap = c->discard_unmap;
  bd->cache_direct = c->cache_direct;
  bd->cache_no_flush = c->cache_no_flush;
  bd->detect_zeroes = opts->detect_zeroes;
}

/* The generic checks QEMU makes after opening the children and before naming the node, in its
 * order. */
static gboolean
check_common(CbtBlockdev *bd, const CbtQmpBlockdevOptions *opts, GError **error)
{
  const CbtQmpBlockdevOptionsFile *file = cbt_blockdev_file_options(opts);

  if (bd->force_share && !bd->read_only) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "force-share=on can only be used with read-only images");
    return FALSE;
  }
  if (file && !file->filename[0]) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "The '%s' block driver requires a file name",
                bd->drv->name);
    return FALSE;
  }
  if (bd->detect_zeroes == CBT_QMP_BLOCKDEV_DETECT_ZEROES_OPTIONS_UNMAP && !bd->discard_unmap) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0,
                "setting detect-zeroes to unmap is not allowed "
                "without setting discard operation to unmap");
    return FALSE;
  }
  return TRUE;
}

static CbtBlockdev *
open_node(const CbtQmpBlockdevOptions *opts, const Inherited *from, gboolean root, GError **error)
{
  const char *name = opts->node_name;
  const CbtQmpBlockdevRef *ref = child_ref(opts);
  const CbtBlockdevDriver *drv;
  g_autoptr(CbtBlockdev) child = NULL;

  if (root && !name) {
    g_set_error(error, CBT_BLOCKDEV_ERROR, 0, "'node-name' must be specified for the root node");
    return NULL;
  }
  Inherited common = resolve_common(opts, from);
  /* QEMU opens (or looks up) the children first. */
  if (ref && !(child = open_child(ref, &common, error)))
    return NULL;
  drv = find_driver(cbt_qmp_blockdev_driver_to_string(opts->driver), error);
  if (!drv)
    return NULL;

  CbtBlockdev *bd = cbt_blockdev_new(drv);
  bd->full_opts = json_object_new();
  json_object_set_string_member(bd->full_opts, "driver", drv->name);
  set_common(bd, &common, opts);
  if (!check_common(bd, opts, error) || !assign_name(bd, name, error))
    goto fail;
  if (child) {
    cbt_blockdev_attach_child(bd, child, "file", child_role(drv, "file"));
    json_object_set_object_member(bd->full_opts, "file", json_object_ref(child->full_opts));
  }
  if (!drv->open(bd, opts, error))
    goto fail;
  /* What the driver needs of its children (a window unshares resize) takes effect now. */
  if (!cbt_blockdev_refresh_perms(bd, error)) {
    drv->close(bd);
    goto fail;
  }
  cbt_blockdev_refresh_limits(bd);
  cbt_blockdev_register(bd);
  return bd;

fail:
  /* Never published: no notifier may see it. */
  while (bd->children->len)
    cbt_blockdev_detach_child(g_ptr_array_index(bd->children, 0));
  g_ptr_array_unref(bd->children);
  g_ptr_array_unref(bd->parents);
  json_object_unref(bd->full_opts);
  g_free(bd->tracked);
  g_free(bd->exact_filename); /* set by a driver that opened, then lost on permissions */
  g_free(bd->node_name);
  g_free(bd);
  return NULL;
}

CbtBlockdevChild *
cbt_blockdev_open_child(CbtBlockdev *parent, const CbtQmpBlockdevRef *ref, const char *name,
                        GError **error)
{
  const Inherited from = {
    .read_only = parent->read_only,
    .auto_read_only = parent->auto_read_only,
    .force_share = parent->force_share,
    .cache_direct = parent->cache_direct,
    .cache_no_flush = parent->cache_no_flush,
    .discard_unmap = parent->discard_unmap,
  };
  g_autoptr(CbtBlockdev) child = open_child(ref, &from, error);

  CBT_ASSERT_MAIN_THREAD();
  if (!child)
    return NULL;
  json_object_set_object_member(parent->full_opts, name, json_object_ref(child->full_opts));
  return cbt_blockdev_attach_child(parent, child, name, child_role(parent->drv, name));
}

CbtBlockdev *
cbt_blockdev_open(const CbtQmpBlockdevOptions *opts, GError **error)
{
  CbtBlockdev *bd = open_node(opts, &root_defaults, TRUE, error);

  CBT_ASSERT_MAIN_THREAD();
  if (bd)
    bd->monitor_owned = TRUE;
  return bd;
}

CbtBlockdev *
cbt_blockdev_open_internal(const CbtQmpBlockdevOptions *opts, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  /* Not a root: the node gets a generated name, and blockdev-del refuses it (not the
   * monitor's). */
  return open_node(opts, &root_defaults, FALSE, error);
}
