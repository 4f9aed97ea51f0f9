/* tests/bitmap-cmds/fake-blockdev.h — test doubles of blockdev/ nodes and rpc/ registration for
 * the unit test of blockdev/dirty-bitmap-cmds.c (see fake-blockdev.c). */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

#include "blockdev/blockdev.h"
#include "rpc/rpc.h"

CbtBlockdev *fake_blockdev_add(const char *name, guint64 size, gboolean read_only);
/* blockdev-del: FALSE while the node has users; runs the node_closing hook drained. */
gboolean fake_blockdev_del(const char *name);
void fake_blockdev_close_all(void);
/* A guest write: marks every tracked bitmap; asserts the node is not drained. */
void fake_blockdev_write(CbtBlockdev *bd, guint64 offset, guint64 len);
guint fake_blockdev_tracked(CbtBlockdev *bd);
int fake_blockdev_users(CbtBlockdev *bd);
int fake_blockdev_drained(CbtBlockdev *bd);
/* The node's query-named-block-nodes entry as far as the node_info hook fills it (transfer
 * full). */
JsonObject *fake_blockdev_info(CbtBlockdev *bd);

/* Call a handler registered through cbt_rpc_register() with already valid @json_args. */
JsonNode *fake_rpc_call(const char *command, const char *json_args, GError **error);
