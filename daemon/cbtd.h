/* daemon/ — private interfaces between the daemon's files. */
#pragma once

#include <glib.h>
#include "rpc/rpc.h"

G_BEGIN_DECLS

#define CBTD_ERROR (g_quark_from_static_string("cbtd"))

typedef struct {
  char *pidfile;
  gboolean daemonize;
  /* --state-dir (the last one given): host devices keep their bitmap stores under it. Known
   * before any option applies, so a --blockdev before --state-dir finds it too. */
  char *state_dir;
} CbtdEarlyOptions;

/* options.c: scan for -h/-V/--daemonize/--pidfile (and reject unknown options) before
 * anything starts; returns -1 to continue, else an exit status. */
int cbtd_options_early(int argc, char **argv, CbtdEarlyOptions *early);
/* Process every option in order through the QMP handlers; on failure the message names the
 * option as given, as qemu-storage-daemon's does. */
gboolean cbtd_options_apply(CbtRpc *rpc, int argc, char **argv, GError **error);

/* state-dir.c: the embedded default configuration under @dir. */
gboolean cbtd_state_dir_setup(CbtRpc *rpc, const char *dir, GError **error);

/* pidfile.c */
gboolean cbtd_pidfile_create(const char *path, GError **error);
void cbtd_pidfile_remove(void);
/* Fork; the parent waits for cbtd_daemonize_done() and exits with its status. */
gboolean cbtd_daemonize_start(GError **error);
void cbtd_daemonize_done(int status);

G_END_DECLS
