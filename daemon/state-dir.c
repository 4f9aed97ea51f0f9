/* The embedded default configuration: one sparse demo disk served over QMP and NBD from a
 * state directory, so `make run` gives a working daemon with no configuration at all. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/cbtd.h"

#define DEMO_DISK_SIZE (10ull << 30)

static gboolean
create_demo_disk(const char *path, GError **error)
{
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST)
      return TRUE;
    g_set_error(error, CBTD_ERROR, 0, "Could not create '%s': %s", path, g_strerror(errno));
    return FALSE;
  }
  if (ftruncate(fd, DEMO_DISK_SIZE) < 0) {
    int saved = errno;
    close(fd);
    unlink(path);
    g_set_error(error, CBTD_ERROR, 0, "Could not size '%s': %s", path, g_strerror(saved));
    return FALSE;
  }
  close(fd);
  return TRUE;
}

static gboolean
execute(CbtRpc *rpc, const char *command, const char *json, GError **error)
{
  g_autoptr(JsonParser) parser = json_parser_new_immutable();
  if (!json_parser_load_from_data(parser, json, -1, error))
    return FALSE;
  JsonObject *args = json_node_get_object(json_parser_get_root(parser));
  g_autoptr(JsonNode) ret = cbt_rpc_execute(rpc, command, args, FALSE, error);
  return ret != NULL;
}

gboolean
cbtd_state_dir_setup(CbtRpc *rpc, const char *dir, GError **error)
{
  if (g_mkdir_with_parents(dir, 0755) < 0) {
    g_set_error(error, CBTD_ERROR, 0, "Could not create '%s': %s", dir, g_strerror(errno));
    return FALSE;
  }
  g_autofree char *disk = g_build_filename(dir, "disk0.img", NULL);
  g_autofree char *qmp = g_build_filename(dir, "qmp.sock", NULL);
  g_autofree char *nbd = g_build_filename(dir, "nbd.sock", NULL);

  if (!create_demo_disk(disk, error))
    return FALSE;

  /* JSON-quote the paths through json-glib rather than by hand. */
  g_autoptr(JsonNode) disk_json = json_node_init_string(json_node_alloc(), disk);
  g_autoptr(JsonNode) nbd_json = json_node_init_string(json_node_alloc(), nbd);
  g_autofree char *disk_q = json_to_string(disk_json, FALSE);
  g_autofree char *nbd_q = json_to_string(nbd_json, FALSE);
  g_autofree char *add =
    g_strdup_printf("{\"driver\": \"file\", \"node-name\": \"disk0\", \"discard\": \"unmap\", "
                    "\"filename\": %s}",
                    disk_q);
  g_autofree char *start =
    g_strdup_printf("{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": %s}}}", nbd_q);

  if (!execute(rpc, "blockdev-add", add, error) || !cbt_rpc_listen_unix(rpc, qmp, FALSE, error) ||
      !execute(rpc, "nbd-server-start", start, error) ||
      !execute(rpc, "block-export-add",
               "{\"type\": \"nbd\", \"id\": \"disk0\", \"node-name\": \"disk0\", "
               "\"writable\": true}",
               error))
    return FALSE;

  printf("cbtd: state directory %s\n"
         "cbtd: QMP listening on %s   (try: cbtctl --qmp %s query-named-block-nodes)\n"
         "cbtd: NBD listening on %s   (export 'disk0', 10 GiB, writable;\n"
         "      try: nbdinfo 'nbd+unix:///disk0?socket=%s')\n",
         dir, qmp, qmp, nbd, nbd);
  fflush(stdout);
  return TRUE;
}
