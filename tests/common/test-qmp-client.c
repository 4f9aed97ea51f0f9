/* common/qmp-client against the real daemon (CBTD names it): the greeting, negotiation, a return
 * value, error classes and texts, events that arrive between replies, a pretty monitor, and a
 * server that goes away. The daemon dies with this test (PR_SET_PDEATHSIG) even if it fails. */
#include <glib/gstdio.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/qmp-client.h"

static char *dir, *qmp, *pretty, *nbd;
static GPid daemon_pid;

static void
die_with_parent(gpointer data)
{
  prctl(PR_SET_PDEATHSIG, SIGKILL);
}

static void
start_daemon(void)
{
  const char *cbtd = g_getenv("CBTD");
  g_autofree char *chardev = g_strdup_printf("socket,id=m1,path=%s,server=on,wait=off", pretty);
  const char *argv[] = {
    cbtd, "--qmp", qmp, "--chardev", chardev, "--monitor", "chardev=m1,pretty=on", NULL
  };
  g_autoptr(GError) error = NULL;

  g_assert_nonnull(cbtd);
  g_assert_true(g_spawn_async(NULL, (char **)argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD, die_with_parent,
                              NULL, &daemon_pid, &error));
  g_assert_no_error(error);
  for (int i = 0; i < 500 && !g_file_test(pretty, G_FILE_TEST_EXISTS); i++)
    g_usleep(10000);
  g_assert_true(g_file_test(pretty, G_FILE_TEST_EXISTS));
}

static JsonObject *
args(const char *json)
{
  g_autoptr(JsonNode) n = json_from_string(json, NULL);
  g_assert_nonnull(n);
  return json_object_ref(json_node_get_object(n));
}

static void
test_calls(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtQmpClient) c = cbt_qmp_client_connect_unix(qmp, TRUE, 10000, &error);

  g_assert_no_error(error);
  JsonObject *qmpo = json_object_get_object_member(cbt_qmp_client_greeting(c), "QMP");
  g_assert_cmpint(json_array_get_length(json_object_get_array_member(qmpo, "capabilities")), ==, 1);
  g_assert_null(cbt_qmp_client_error_class(c));

  g_autoptr(JsonNode) v = cbt_qmp_client_call(c, "query-version", NULL, &error);
  g_assert_no_error(error);
  JsonObject *q = json_object_get_object_member(json_node_get_object(v), "qemu");
  g_assert_cmpint(json_object_get_int_member(q, "major"), ==, 7);

  g_autoptr(JsonObject) del = args("{\"node-name\": \"x\"}");
  g_assert_null(cbt_qmp_client_call(c, "blockdev-del", del, &error));
  g_assert_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_GENERIC);
  g_assert_cmpstr(error->message, ==, "Failed to find node with node-name='x'");
  g_assert_cmpstr(cbt_qmp_client_error_class(c), ==, "GenericError");
  g_clear_error(&error);
  g_assert_null(cbt_qmp_client_call(c, "frobnicate", NULL, &error));
  g_assert_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_COMMAND_NOT_FOUND);
  g_assert_cmpstr(error->message, ==, "The command frobnicate has not been found");
  g_assert_cmpstr(cbt_qmp_client_error_class(c), ==, "CommandNotFound");
  g_clear_error(&error);

  /* A whole request: its id comes back, and so does an error reply, as it is. */
  g_autoptr(JsonObject) req = args("{\"execute\": \"query-commands\", \"id\": 7}");
  g_autoptr(JsonObject) reply = cbt_qmp_client_request(c, req, &error);
  g_assert_no_error(error);
  g_assert_cmpint(json_object_get_int_member(reply, "id"), ==, 7);
  g_assert_true(json_object_has_member(reply, "return"));
}

/* Events queue up behind replies and wait for whoever asks; none is invented. */
static void
test_events(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtQmpClient) c = cbt_qmp_client_connect_unix(qmp, TRUE, 10000, &error);
  g_autofree char *start = g_strdup_printf("{\"addr\": {\"type\": \"unix\", \"data\": "
                                           "{\"path\": \"%s\"}}}",
                                           nbd);
  const char *calls[][2] = {
    { "blockdev-add", "{\"driver\": \"null-co\", \"node-name\": \"n0\"}" },
    { "nbd-server-start", start },
    { "block-export-add", "{\"type\": \"nbd\", \"id\": \"e0\", \"node-name\": \"n0\"}" },
    { "block-export-del", "{\"id\": \"e0\"}" },
  };

  g_assert_no_error(error);
  g_assert_null(cbt_qmp_client_next_event(c, 0, &error));
  g_assert_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO);
  g_clear_error(&error);
  for (gsize i = 0; i < G_N_ELEMENTS(calls); i++) {
    g_autoptr(JsonObject) a = args(calls[i][1]);
    g_autoptr(JsonNode) ret = cbt_qmp_client_call(c, calls[i][0], a, &error);
    g_assert_no_error(error);
  }
  g_autoptr(JsonObject) ev = cbt_qmp_client_next_event(c, 5000, &error);
  g_assert_no_error(error);
  g_assert_cmpstr(json_object_get_string_member(ev, "event"), ==, "BLOCK_EXPORT_DELETED");
  g_assert_cmpstr(json_object_get_string_member(json_object_get_object_member(ev, "data"), "id"),
                  ==, "e0");
  g_assert_null(cbt_qmp_client_next_event(c, 200, &error));
  g_assert_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO);
  g_clear_error(&error);
  g_autoptr(JsonNode) stop = cbt_qmp_client_call(c, "nbd-server-stop", NULL, &error);
  g_autoptr(JsonObject) d = args("{\"node-name\": \"n0\"}");
  g_autoptr(JsonNode) gone = cbt_qmp_client_call(c, "blockdev-del", d, &error);
  g_assert_no_error(error);
}

/* A pretty monitor spreads each message over lines; negotiation is the caller's choice. */
static void
test_pretty_and_unnegotiated(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtQmpClient) c = cbt_qmp_client_connect_unix(pretty, FALSE, 10000, &error);

  g_assert_no_error(error);
  g_assert_null(cbt_qmp_client_call(c, "query-version", NULL, &error));
  g_assert_cmpstr(error->message, ==,
                  "Expecting capabilities negotiation with "
                  "'qmp_capabilities'");
  g_clear_error(&error);
  g_autoptr(JsonNode) caps = cbt_qmp_client_call(c, "qmp_capabilities", NULL, &error);
  g_assert_no_error(error);
  g_autoptr(JsonNode) v = cbt_qmp_client_call(c, "query-version", NULL, &error);
  g_assert_no_error(error);
  g_assert_true(JSON_NODE_HOLDS_OBJECT(v));
}

static void
test_server_gone(void)
{
  g_autoptr(GError) error = NULL;
  g_autoptr(CbtQmpClient) c = cbt_qmp_client_connect_unix(qmp, TRUE, 10000, &error);
  int status;

  g_assert_no_error(error);
  g_autoptr(JsonNode) q = cbt_qmp_client_call(c, "quit", NULL, &error);
  g_assert_no_error(error);
  g_assert_cmpint(waitpid(daemon_pid, &status, 0), ==, daemon_pid);
  g_assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  daemon_pid = 0;
  g_assert_null(cbt_qmp_client_call(c, "query-version", NULL, &error));
  g_assert_error(error, CBT_QMP_CLIENT_ERROR, CBT_QMP_CLIENT_ERROR_IO);
  g_clear_error(&error);
  g_assert_null(cbt_qmp_client_connect_unix(qmp, TRUE, 1000, &error));
  g_assert_true(g_str_has_prefix(error->message, "Failed to connect to '"));
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  dir = g_dir_make_tmp("cbt-qmp-client-XXXXXX", &error);
  g_assert_no_error(error);
  qmp = g_build_filename(dir, "qmp.sock", NULL);
  pretty = g_build_filename(dir, "pretty.sock", NULL);
  nbd = g_build_filename(dir, "nbd.sock", NULL);
  start_daemon();
  g_test_add_func("/qmp-client/calls", test_calls);
  g_test_add_func("/qmp-client/events", test_events);
  g_test_add_func("/qmp-client/pretty-and-unnegotiated", test_pretty_and_unnegotiated);
  g_test_add_func("/qmp-client/server-gone", test_server_gone);
  int ret = g_test_run();
  if (daemon_pid > 0) {
    kill(daemon_pid, SIGKILL);
    waitpid(daemon_pid, NULL, 0);
  }
  g_unlink(qmp);
  g_unlink(pretty);
  g_unlink(nbd);
  g_rmdir(dir);
  return ret;
}
