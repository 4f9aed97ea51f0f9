/* tools/backup/main.c — cbt-backup's command line (docs/backup-vendors.md, "cbt-backup").
 *
 *   cbt-backup full|incremental --qmp SOCKET --nbd ADDR --node NODE --repo DIR [options]
 *   cbt-backup list|verify|restore|prune --repo DIR [options]
 *
 * Exit statuses are CbtBackupExit's (backup.h). SIGINT and SIGTERM stop a run at the next piece:
 * the point being written is thrown away and the server's checkpoints stay as they were.
 */
#include "backup.h"

#include <locale.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t interrupted;

static void
on_signal(int sig)
{
  interrupted = sig;
}

gboolean
cbt_backup_interrupted(void)
{
  return interrupted != 0;
}

gboolean
cbt_backup_check_interrupt(GError **error)
{
  if (!interrupted)
    return TRUE;
  g_set_error(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_INTERRUPTED, "interrupted by %s",
              interrupted == SIGINT ? "SIGINT" : "SIGTERM");
  return FALSE;
}

static void
catch_signals(void)
{
  struct sigaction sa = { .sa_handler = on_signal };

  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

static char *opt_qmp, *opt_nbd, *opt_node, *opt_file_node, *opt_repo, *opt_scratch, *opt_progress;
static char *opt_tls_certs, *opt_tls_psk, *opt_tls_user, *opt_persistent, *opt_to, *opt_rate;
static gboolean opt_auto, opt_json, opt_live;
static int opt_connections = 4, opt_point = -1, opt_keep = 0, opt_granularity = 0;

static const GOptionEntry take_entries[] = {
  { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &opt_qmp, "the daemon's QMP unix socket", "PATH" },
  { "nbd", 0, 0, G_OPTION_ARG_STRING, &opt_nbd, "its NBD server: unix:PATH, /PATH, HOST:PORT",
    "ADDR" },
  { "node", 0, 0, G_OPTION_ARG_STRING, &opt_node, "the node to back up", "NAME" },
  { "file-node", 0, 0, G_OPTION_ARG_STRING, &opt_file_node,
    "qemu-storage-daemon: the node's file child (default: looked up)", "NAME" },
  { "repo", 0, 0, G_OPTION_ARG_FILENAME, &opt_repo, "the repository directory", "DIR" },
  { "auto", 0, 0, G_OPTION_ARG_NONE, &opt_auto,
    "incremental: take a full when the chain cannot be proven, and say why", NULL },
  { "connections", 0, 0, G_OPTION_ARG_INT, &opt_connections,
    "NBD connections in parallel when the export allows multi-conn (default 4)", "N" },
  { "max-rate", 0, 0, G_OPTION_ARG_STRING, &opt_rate,
    "read at most this many bytes per second (suffixes K, M, G: powers of 1024)", "RATE" },
  { "scratch-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_scratch,
    "where the daemon keeps old data of the frozen view", "DIR" },
  { "persistent", 0, 0, G_OPTION_ARG_STRING, &opt_persistent,
    "the new checkpoint persistent: yes, no, auto (default)", "WHEN" },
  { "granularity", 0, 0, G_OPTION_ARG_INT, &opt_granularity,
    "the new checkpoint's granularity (default: the chain's)", "BYTES" },
  { "progress", 0, 0, G_OPTION_ARG_STRING, &opt_progress,
    "auto (a bar on a terminal), bar, json (lines on stdout), none", "MODE" },
  { "tls-certificates", 0, 0, G_OPTION_ARG_FILENAME, &opt_tls_certs,
    "NBD over TLS with x509 certificates in DIR", "DIR" },
  { "tls-psk-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_tls_psk, "NBD over TLS with a PSK file",
    "FILE" },
  { "tls-username", 0, 0, G_OPTION_ARG_STRING, &opt_tls_user, "the PSK user name", "NAME" },
  { NULL }
};

static const GOptionEntry repo_entries[] = {
  { "repo", 0, 0, G_OPTION_ARG_FILENAME, &opt_repo, "the repository directory", "DIR" },
  { "point", 0, 0, G_OPTION_ARG_INT, &opt_point,
    "verify/restore: this point (default: all / "
    "the last)",
    "N" },
  { "to", 0, 0, G_OPTION_ARG_STRING, &opt_to, "restore: a file, a block device or an NBD URI",
    "TARGET" },
  { "keep", 0, 0, G_OPTION_ARG_INT, &opt_keep, "prune: the number of points to keep", "K" },
  { "json", 0, 0, G_OPTION_ARG_NONE, &opt_json, "list: as JSON", NULL },
  { "progress", 0, 0, G_OPTION_ARG_STRING, &opt_progress, "as for a backup", "MODE" },
  { NULL }
};

/* verify --live reaches the daemon as a backup does. */
static const GOptionEntry live_entries[] = {
  { "live", 0, 0, G_OPTION_ARG_NONE, &opt_live,
    "verify: compare the last point with a frozen view of the node, where its checkpoint says "
    "nothing changed since",
    NULL },
  { "qmp", 0, 0, G_OPTION_ARG_FILENAME, &opt_qmp, "--live: the daemon's QMP unix socket", "PATH" },
  { "nbd", 0, 0, G_OPTION_ARG_STRING, &opt_nbd, "--live: its NBD server", "ADDR" },
  { "node", 0, 0, G_OPTION_ARG_STRING, &opt_node, "--live: the node (default: the repository's)",
    "NAME" },
  { "file-node", 0, 0, G_OPTION_ARG_STRING, &opt_file_node, "--live: as for a backup", "NAME" },
  { "scratch-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_scratch, "--live: as for a backup", "DIR" },
  { "tls-certificates", 0, 0, G_OPTION_ARG_FILENAME, &opt_tls_certs, "--live: as for a backup",
    "DIR" },
  { "tls-psk-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_tls_psk, "--live: as for a backup", "FILE" },
  { "tls-username", 0, 0, G_OPTION_ARG_STRING, &opt_tls_user, "--live: as for a backup", "NAME" },
  { NULL }
};

static gboolean G_GNUC_PRINTF(2, 3) usage(GError **error, const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  g_autofree char *text = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_set_error_literal(error, CBT_BACKUP_ERROR, CBT_BACKUP_EXIT_USAGE, text);
  return FALSE;
}

static gboolean
progress_mode(CbtBackupProgressMode *mode, GError **error)
{
  const char *p = opt_progress ? opt_progress : "auto";

  if (!strcmp(p, "auto"))
    *mode = isatty(STDERR_FILENO) ? CBT_BACKUP_PROGRESS_BAR : CBT_BACKUP_PROGRESS_NONE;
  else if (!strcmp(p, "bar"))
    *mode = CBT_BACKUP_PROGRESS_BAR;
  else if (!strcmp(p, "json"))
    *mode = CBT_BACKUP_PROGRESS_JSON;
  else if (!strcmp(p, "none"))
    *mode = CBT_BACKUP_PROGRESS_NONE;
  else
    return usage(error, "--progress=%s: expected auto, bar, json or none", p);
  return TRUE;
}

static gboolean
parse_rate(const char *text, guint64 *out, GError **error)
{
  char *end = NULL;
  guint64 v = g_ascii_strtoull(text, &end, 10);
  guint shift = 0;

  if (end && *end && !end[1] && strchr("KMG", g_ascii_toupper(*end)))
    shift = 10 * (guint)(strchr("KMG", g_ascii_toupper(*end)) - "KMG" + 1);
  else if (end && *end)
    v = 0;
  if (end == text || v == 0 || v > (G_MAXUINT64 >> 30))
    return usage(error, "--max-rate=%s: expected a positive number of bytes per second", text);
  *out = v << shift;
  return TRUE;
}

static gboolean
server_args(CbtBackupRunArgs *a, GError **error)
{
  if (!cbt_backup_nbd_addr_parse(&a->nbd, opt_nbd, error) || !progress_mode(&a->progress, error))
    return FALSE;
  a->nbd.tls_certificates = g_strdup(opt_tls_certs);
  a->nbd.tls_psk_file = g_strdup(opt_tls_psk);
  a->nbd.tls_username = g_strdup(opt_tls_user);
  if (opt_tls_certs && opt_tls_psk)
    return usage(error, "%s", "--tls-certificates and --tls-psk-file exclude each other");
  a->qmp = opt_qmp;
  a->node = opt_node;
  a->file_node = opt_file_node;
  a->repo = opt_repo;
  a->scratch_dir = opt_scratch;
  return TRUE;
}

static int
verify_live(GError **error)
{
  CbtBackupRunArgs a = { 0 };
  int rc = CBT_BACKUP_EXIT_USAGE;

  if (!opt_qmp || !opt_nbd)
    usage(error, "%s", "verify --live needs --qmp and --nbd");
  else if (server_args(&a, error))
    rc = cbt_backup_verify_live(&a, opt_point, error);
  cbt_backup_nbd_addr_clear(&a.nbd);
  return rc;
}

static gboolean
take_args(CbtBackupRunArgs *a, GError **error)
{
  if (!opt_qmp || !opt_nbd || !opt_node || !opt_repo)
    return usage(error, "%s", "--qmp, --nbd, --node and --repo are required");
  if (!server_args(a, error))
    return FALSE;
  a->auto_full = opt_auto;
  if (opt_connections < 1 || opt_connections > 16)
    return usage(error, "%s", "--connections must be between 1 and 16");
  a->connections = opt_connections;
  a->granularity = opt_granularity;
  if (opt_rate && !parse_rate(opt_rate, &a->max_rate, error))
    return FALSE;
  if (!opt_persistent || !strcmp(opt_persistent, "auto"))
    a->persistent = -1;
  else if (!strcmp(opt_persistent, "yes") || !strcmp(opt_persistent, "no"))
    a->persistent = !strcmp(opt_persistent, "yes");
  else
    return usage(error, "--persistent=%s: expected yes, no or auto", opt_persistent);
  return TRUE;
}

static int
dispatch(const char *cmd, GError **error)
{
  CbtBackupProgressMode mode = CBT_BACKUP_PROGRESS_NONE;

  if (!strcmp(cmd, "full") || !strcmp(cmd, "incremental")) {
    CbtBackupRunArgs a = { 0 };
    int rc =
      take_args(&a, error) ? cbt_backup_take(&a, cmd[0] == 'i', error) : CBT_BACKUP_EXIT_USAGE;
    cbt_backup_nbd_addr_clear(&a.nbd);
    return rc;
  }
  if (!opt_repo) {
    usage(error, "%s", "--repo is required");
    return CBT_BACKUP_EXIT_USAGE;
  }
  if (!progress_mode(&mode, error))
    return CBT_BACKUP_EXIT_USAGE;
  if (!strcmp(cmd, "list"))
    return cbt_backup_list(opt_repo, opt_json, error);
  if (!strcmp(cmd, "verify") && opt_live)
    return verify_live(error);
  if (!strcmp(cmd, "verify"))
    return cbt_backup_verify(opt_repo, opt_point, mode, error);
  if (!strcmp(cmd, "prune"))
    return cbt_backup_prune(opt_repo, opt_keep, mode, error);
  if (!opt_to) {
    usage(error, "%s", "restore needs --to");
    return CBT_BACKUP_EXIT_USAGE;
  }
  return cbt_backup_restore(opt_repo, opt_point, opt_to, error);
}

static const char *const commands[] = { "full",    "incremental", "list", "verify",
                                        "restore", "prune",       NULL };

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;
  const char *cmd = argc > 1 ? argv[1] : NULL;

  setlocale(LC_ALL, "");
  if (!cmd || !g_strv_contains(commands, cmd)) {
    fprintf(stderr, "usage: cbt-backup full|incremental|list|verify|restore|prune [OPTION...]\n"
                    "       cbt-backup COMMAND --help\n");
    return CBT_BACKUP_EXIT_USAGE;
  }
  gboolean take = !strcmp(cmd, "full") || !strcmp(cmd, "incremental");
  g_autofree char *param = g_strdup_printf("%s - cbtd's backup client", cmd);
  g_autoptr(GOptionContext) ctx = g_option_context_new(param);
  g_option_context_add_main_entries(ctx, take ? take_entries : repo_entries, NULL);
  if (!strcmp(cmd, "verify"))
    g_option_context_add_main_entries(ctx, live_entries, NULL);
  argv[1] = argv[0];
  argc--;
  argv++;
  if (!g_option_context_parse(ctx, &argc, &argv, &error) || argc > 1) {
    fprintf(stderr, "cbt-backup: %s\n", error ? error->message : "unexpected arguments");
    return CBT_BACKUP_EXIT_USAGE;
  }
  catch_signals();
  int rc = dispatch(cmd, &error);
  if (rc != CBT_BACKUP_EXIT_OK) {
    fprintf(stderr, "cbt-backup: %s\n", error ? error->message : "failed");
    if (opt_progress && !strcmp(opt_progress, "json")) {
      g_autoptr(JsonObject) o = json_object_new();
      json_object_set_string_member(o, "message", error ? error->message : "failed");
      json_object_set_int_member(o, "exit", rc);
      cbt_backup_progress_event(CBT_BACKUP_PROGRESS_JSON, "error", o);
    }
  }
  return rc;
}
