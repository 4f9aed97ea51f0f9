/* tests/fuzz/fuzz-daemon.h — the daemon's modules wired up in the fuzzer's own process, as
 * daemon/main.c wires them, over a private temporary directory that is the working directory
 * while the fuzzer runs. Every command goes through the real schema check and handlers.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>
#include "rpc/rpc.h"

typedef struct {
  CbtRpc *rpc;
  char *dir;  /* the temporary directory (removed at exit) */
  char *sock; /* the NBD server's unix socket, once fuzz_daemon_nbd_start() ran */
} FuzzDaemon;

extern FuzzDaemon fuzz_daemon;

/* Set up once: temp dir, state dir, every module's commands. */
void fuzz_daemon_init(void);
/* Run @command with @json_args (JSON object text or NULL); aborts when it fails. */
void fuzz_daemon_qmp_ok(const char *command, const char *json_args);
/* Start the NBD server on a unix socket in the temp dir. */
void fuzz_daemon_nbd_start(void);
/* fuzz_daemon_init(), the NBD server, and nodes n0 and n1 (1 MiB each): what every harness of
 * the whole daemon starts from. */
void fuzz_daemon_init_standard(void);
/* A sparse image file in the temp dir with a node `node` over it. */
void fuzz_daemon_add_node(const char *node, guint64 size);
/* Iterate the main context until nothing is ready. */
void fuzz_daemon_spin(void);
