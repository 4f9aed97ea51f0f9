/* tests/dirty-bitmaps/fake-blockdev.h — test doubles of blockdev/'s nodes for the unit test of
 * dirty-bitmaps/ (see fake-blockdev.c), and the real rpc/ that test drives. */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

#include "blockdev/blockdev.h"
#include "rpc/rpc.h"

CbtBlockdev *fake_blockdev_add(const char *name, guint64 size, gboolean read_only);
/* blockdev-del: FALSE while the node has users; runs the CLOSING notifiers drained. */
gboolean fake_blockdev_del(const char *name);
void fake_blockdev_close_all(void);
/* A guest write: marks every tracked bitmap; asserts the node is not drained. */
void fake_blockdev_write(CbtBlockdev *bd, guint64 offset, guint64 len);
guint fake_blockdev_tracked(CbtBlockdev *bd);
int fake_blockdev_users(CbtBlockdev *bd);
int fake_blockdev_drained(CbtBlockdev *bd);
/* The node's query-named-block-nodes entry as far as the QUERY notifiers fill it (transfer
 * full). */
JsonObject *fake_blockdev_info(CbtBlockdev *bd);

/* A CbtRpc with the commands of schemas/dirty-bitmap.json; calls run through the schema's
 * validation and the generated marshallers, as over QMP. */
void fake_rpc_init(void);
JsonNode *fake_rpc_call(const char *command, const char *json_args, GError **error);
