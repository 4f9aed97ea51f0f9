/* tools/backup/backup.h — cbt-backup's parts, shared inside the tool only.
 *
 *   main.c      command line, exit codes, signals
 *   nbd.c       reaching the NBD server (addresses, TLS, listing meta contexts)
 *   server.c    the QMP side: which daemon, the chain proof, the frozen view and its teardown
 *   map.c       which extents a point must copy (base:allocation, a dirty bitmap)
 *   copy.c      the parallel NBD copy of those extents into a point, with checksums
 *   qcow2.c     a point's image, written once as a qcow2 file
 *   point.c     serving a point read-only (qemu-nbd); files, times
 *   chain.c     the proof that a checkpoint continues a point's chain
 *   take.c      a full or incremental backup: proof, freeze, copy, commit, release
 *   repo.c      the repository: its layout, points and manifests; list
 *   verify.c    a point against its manifest
 *   live.c      the last point against the live disk, where its checkpoint says nothing changed
 *   restore.c   a point to a file, a device or an NBD export, with qemu-img
 *   prune.c     the oldest points merged into one full
 *   progress.c  the progress bar and JSON progress lines
 *
 * Errors cross these files as GError in CBT_BACKUP_ERROR; the code is the exit status.
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>
#include <libnbd.h>
#include <stdint.h>

G_BEGIN_DECLS

#define CBT_BACKUP_ERROR (cbt_backup_error_quark())
GQuark cbt_backup_error_quark(void);

/* Exit statuses (docs/backup-vendors.md, "cbt-backup"): what a scheduler can act on. */
typedef enum {
  CBT_BACKUP_EXIT_OK = 0,
  CBT_BACKUP_EXIT_FAILED = 1,  /* the server, the network or the repository failed: retry */
  CBT_BACKUP_EXIT_USAGE = 2,   /* bad command line */
  CBT_BACKUP_EXIT_CHAIN = 3,   /* an incremental the chain cannot prove: take a full */
  CBT_BACKUP_EXIT_DAMAGED = 4, /* verify found a point that does not match its manifest */
  CBT_BACKUP_EXIT_INTERRUPTED = 130,
} CbtBackupExit;

/* ---- main.c: the interrupt flag every long loop looks at --------------------------------- */
gboolean cbt_backup_interrupted(void);
gboolean cbt_backup_check_interrupt(GError **error);

/* ---- where the NBD server is, and how to reach it ----------------------------------------- */
typedef struct {
  char *unix_path;        /* either this ... */
  char *host, *port;      /* ... or TCP */
  char *tls_certificates; /* x509: a directory with ca-cert.pem (client-cert.pem, ...) */
  char *tls_psk_file;     /* PSK: a keys file, with tls_username */
  char *tls_username;
} CbtBackupNbdAddr;

gboolean cbt_backup_nbd_addr_parse(CbtBackupNbdAddr *addr, const char *text, GError **error);
void cbt_backup_nbd_addr_clear(CbtBackupNbdAddr *addr);
/* A handle with TLS as configured and @contexts (NULL-terminated, may be NULL) requested,
 * connected to @export_name. */
struct nbd_handle *cbt_backup_nbd_connect(const CbtBackupNbdAddr *addr, const char *export_name,
                                          const char *const *contexts, GError **error);
/* The meta contexts NBD_OPT_LIST_META_CONTEXT names for @query on @export_name. */
GPtrArray *cbt_backup_nbd_list_contexts(const CbtBackupNbdAddr *addr, const char *export_name,
                                        const char *query, GError **error);
/* libnbd's last error as a GError. */
void cbt_backup_nbd_error(GError **error, const char *what);

/* ---- server.c ------------------------------------------------------------------------------ */
typedef struct CbtBackupServer CbtBackupServer;

/* A bitmap as query-named-block-nodes shows it. uuid/unbroken are cbtd's own. */
typedef struct {
  gboolean exists, recording, inconsistent, persistent, busy;
  guint32 granularity;
  char *uuid; /* NULL on a daemon without identities */
  gboolean has_unbroken, unbroken;
  char *broken_reason;
} CbtBackupBitmapInfo;
void cbt_backup_bitmap_info_clear(CbtBackupBitmapInfo *info);

/* What a backup reads: the frozen view's export and the bitmap there that holds the changes. */
typedef struct {
  char *export_name;
  char *dirty_context;    /* "qemu:dirty-bitmap:X" for an incremental, else NULL */
  char *identity_context; /* cbtd: "cbtd:bitmap-identity:OLD" to check at the instant */
  char *frozen_at;        /* ISO 8601, the instant of the view (as the client saw it) */
} CbtBackupView;

CbtBackupServer *cbt_backup_server_connect(const char *qmp_path, const char *prefix,
                                           GError **error);
void cbt_backup_server_free(CbtBackupServer *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtBackupServer, cbt_backup_server_free)
gboolean cbt_backup_server_is_cbtd(CbtBackupServer *s);
const char *cbt_backup_server_name(CbtBackupServer *s); /* "cbtd 1.0" / "qemu-storage-daemon 7.2" */
gboolean cbt_backup_server_bitmap(CbtBackupServer *s, const char *node, const char *name,
                                  CbtBackupBitmapInfo *out, GError **error);
/* Remove what an earlier run of this repository left behind (a view, its nodes, checkpoints
 * with our prefix that @keep does not name). */
void cbt_backup_server_clean_stale(CbtBackupServer *s, const char *node, const char *keep);

typedef struct {
  const char *node, *file_node; /* file_node: qemu-storage-daemon only (NULL: looked up) */
  const char *old_checkpoint;   /* NULL for a full */
  const char *new_checkpoint;   /* NULL: a view only (verify --live) */
  gboolean persistent;          /* of the new checkpoint */
  guint32 granularity;          /* of the new checkpoint; 0: the daemon's choice */
  const char *scratch_dir;      /* qemu-storage-daemon: where its scratch file goes */
  guint64 size;
} CbtBackupFreezeArgs;

/* Freeze the view (cbtd: one block-export-add; qemu-storage-daemon: the fleecing steps) with
 * the new checkpoint recording from no later than the instant. */
gboolean cbt_backup_server_freeze(CbtBackupServer *s, const CbtBackupFreezeArgs *a,
                                  CbtBackupView *view, GError **error);
/* Undo the view. @committed: the point is safe, so the old checkpoint goes; otherwise the new
 * one goes and the old one still covers everything. Best effort: failures are logged. */
void cbt_backup_server_release(CbtBackupServer *s, const CbtBackupFreezeArgs *a,
                               gboolean committed);
void cbt_backup_view_clear(CbtBackupView *v);
guint64 cbt_backup_server_node_size(CbtBackupServer *s, const char *node, GError **error);

/* ---- map.c --------------------------------------------------------------------------------- */
typedef enum { CBT_BACKUP_DATA, CBT_BACKUP_ZERO } CbtBackupKind;
typedef struct {
  guint64 offset, length;
  CbtBackupKind kind;
  guint8 sha256[32]; /* DATA, filled by the copy; a DATA piece read as zeroes becomes ZERO */
} CbtBackupPiece;

/* The pieces of a full (every extent not known to read as zeroes) or, with @dirty_context, of
 * an incremental (the dirty extents: data, or zeroes that must mask the older point). Pieces
 * are whole clusters of the point's image (the view is the disk at its instant everywhere, so
 * reading a whole cluster around a change is always right), at most @max_piece bytes, in
 * offset order. */
GArray *cbt_backup_map(struct nbd_handle *h, const char *dirty_context, guint64 max_piece,
                       GError **error);
guint64 cbt_backup_map_bytes(GArray *pieces);
/* The extents @dirty_context does not mark (DATA pieces of at most @max_piece bytes), and in
 * @dirty_bytes how much it marks. */
GArray *cbt_backup_map_clean(struct nbd_handle *h, const char *dirty_context, guint64 max_piece,
                             guint64 *dirty_bytes, GError **error);

/* ---- progress.c ---------------------------------------------------------------------------- */
typedef enum {
  CBT_BACKUP_PROGRESS_NONE,
  CBT_BACKUP_PROGRESS_BAR,
  CBT_BACKUP_PROGRESS_JSON
} CbtBackupProgressMode;
typedef struct CbtBackupProgress CbtBackupProgress;
CbtBackupProgress *cbt_backup_progress_new(CbtBackupProgressMode mode, const char *phase,
                                           guint64 total);
void cbt_backup_progress_add(CbtBackupProgress *p, guint64 bytes);  /* any thread */
void cbt_backup_progress_tick(CbtBackupProgress *p, gboolean last); /* the thread that owns it */
void cbt_backup_progress_free(CbtBackupProgress *p);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtBackupProgress, cbt_backup_progress_free)
/* A JSON line on stdout in JSON mode ({"type": TYPE, ...} with @obj's members). */
void cbt_backup_progress_event(CbtBackupProgressMode mode, const char *type, JsonObject *obj);

/* ---- qcow2.c ------------------------------------------------------------------------------- */
/* A qcow2 image of @size bytes written once, front to back; an overlay of @backing (a name
 * relative to the image's directory, a qcow2 file) when not NULL. Writes are whole clusters
 * (cbt_backup_qcow2_cluster(); the last may end at @size) and may come from several threads;
 * the file is an image only after cbt_backup_qcow2_finish(). */
typedef struct CbtBackupQcow2 CbtBackupQcow2;
CbtBackupQcow2 *cbt_backup_qcow2_create(const char *path, const char *backing, guint64 size,
                                        GError **error);
/* Clusters of zeroes in @buf are left out: unallocated, or with @zero_flag read as zeroes over
 * the backing file. */
gboolean cbt_backup_qcow2_write(CbtBackupQcow2 *q, guint64 offset, const guint8 *buf, gsize len,
                                gboolean zero_flag, GError **error);
gboolean cbt_backup_qcow2_zero(CbtBackupQcow2 *q, guint64 offset, guint64 len, GError **error);
gboolean cbt_backup_qcow2_finish(CbtBackupQcow2 *q, GError **error);
void cbt_backup_qcow2_free(CbtBackupQcow2 *q);
guint64 cbt_backup_qcow2_cluster(void);
/* After finish(): where the tables begin (the data clusters end there). */
guint64 cbt_backup_qcow2_tables_offset(CbtBackupQcow2 *q);
/* SHA-256 (hex) of the header cluster and of everything from @tables to the end of the file;
 * the file's size in @file_size. */
char *cbt_backup_qcow2_tables_sha256(const char *path, guint64 tables, guint64 *file_size,
                                     GError **error);

/* ---- copy.c -------------------------------------------------------------------------------- */
typedef struct {
  const CbtBackupNbdAddr *source;
  const char *source_export;
  CbtBackupQcow2 *target; /* the point's image */
  guint connections;
  gboolean write_zeroes; /* incremental: ZERO pieces read as zeroes over the older point */
  guint64 max_rate;      /* bytes read per second, all connections together; 0: no limit */
  CbtBackupProgress *progress;
} CbtBackupCopyArgs;

typedef struct {
  guint64 read, written, zeroed;
} CbtBackupCopyStats;

gboolean cbt_backup_copy(const CbtBackupCopyArgs *a, GArray *pieces, CbtBackupCopyStats *stats,
                         GError **error);

/* ---- point.c ------------------------------------------------------------------------------- */
typedef struct CbtBackupServe CbtBackupServe; /* a qemu-nbd serving an image */
/* qemu-nbd serving @image (and its backing chain) read-only. */
CbtBackupServe *cbt_backup_serve(const char *image, guint connections, GError **error);
const char *cbt_backup_serve_uri(CbtBackupServe *sv);
const char *cbt_backup_serve_socket(CbtBackupServe *sv);
gboolean cbt_backup_serve_stop(CbtBackupServe *sv, GError **error); /* frees it */
gboolean cbt_backup_run(const char *const *argv, char **out, GError **error);
gboolean cbt_backup_fsync_path(const char *path, GError **error);
char *cbt_backup_now_iso(void);

/* ---- repo.c -------------------------------------------------------------------------------- */
/* A repository: a directory with repo.json and, per point N, N.qcow2 and its manifest N.json
 * (docs/backup-vendors.md, "cbt-backup"). A point exists once its manifest does. */
typedef struct {
  char *path, *id, *prefix, *node;
  GPtrArray *points; /* JsonObject manifests, oldest first */
  int lock_fd;
} CbtBackupRepo;

/* @write: locked against other writers, a failed run's leftovers removed; @create: made when
 * missing (with @write). @node: the node it must be for (NULL: any). */
CbtBackupRepo *cbt_backup_repo_open(const char *path, const char *node, gboolean write,
                                    gboolean create, GError **error);
void cbt_backup_repo_free(CbtBackupRepo *r);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtBackupRepo, cbt_backup_repo_free)
JsonObject *cbt_backup_repo_last(CbtBackupRepo *r);
/* Point @seq (< 0: the last one), or NULL with @error. */
JsonObject *cbt_backup_repo_point(CbtBackupRepo *r, int seq, GError **error);
char *cbt_backup_repo_file(CbtBackupRepo *r, const char *name);
char *cbt_backup_point_name(guint seq, const char *suffix); /* "0007.qcow2" */
/* Write @obj as @name atomically and durably: a temporary, fsync, rename, fsync of the dir. */
gboolean cbt_backup_repo_write_json(CbtBackupRepo *r, const char *name, JsonObject *obj,
                                    GError **error);
JsonArray *cbt_backup_pieces_to_json(GArray *pieces);
/* Copy @image's chain (all of it: a full) into a new standalone qcow2 @out; used by prune. */
gboolean cbt_backup_flatten(const char *image, const char *out, guint64 size,
                            CbtBackupProgressMode mode, GArray **pieces, guint64 *tables,
                            GError **error);
/* Set in @m the members that describe the image file @path (its size, where its tables begin,
 * their SHA-256). */
gboolean cbt_backup_image_describe(JsonObject *m, const char *path, guint64 tables, GError **error);
/* NULL when @path is the image file @m describes, else what differs (or NULL with @error). */
char *cbt_backup_image_check(JsonObject *m, const char *path, GError **error);

typedef struct {
  const char *qmp, *node, *file_node, *repo, *scratch_dir;
  CbtBackupNbdAddr nbd;
  guint connections;
  guint64 max_rate;
  gboolean auto_full;
  int persistent; /* -1: as the chain (or the daemon) decides */
  guint32 granularity;
  CbtBackupProgressMode progress;
} CbtBackupRunArgs;

/* ---- chain.c ------------------------------------------------------------------------------- */
/* A manifest's string member, NULL when absent or null. */
const char *cbt_backup_manifest_str(JsonObject *m, const char *name);
/* Why @base's checkpoint on @node (now @size bytes) does not continue its chain, NULL when it
 * does (or with @error set: could not tell). @info: the checkpoint as the daemon shows it. */
char *cbt_backup_chain_refusal(CbtBackupServer *s, CbtBackupRepo *r, const char *node, guint64 size,
                               JsonObject *base, CbtBackupBitmapInfo *info, GError **error);
/* cbtd: why the identity @view published at its instant is not @base's, NULL when it is. */
char *cbt_backup_instant_refusal(const CbtBackupNbdAddr *nbd, const CbtBackupView *view,
                                 JsonObject *base, GError **error);

void cbt_backup_prune_recover(CbtBackupRepo *r, const char *manifest_new);
int cbt_backup_take(const CbtBackupRunArgs *a, gboolean incremental, GError **error);
int cbt_backup_list(const char *repo, gboolean json, GError **error);
int cbt_backup_verify(const char *repo, int point, CbtBackupProgressMode progress, GError **error);
/* The last point against a frozen view of the live node: where its checkpoint says nothing
 * changed since, both must read the same. */
int cbt_backup_verify_live(const CbtBackupRunArgs *a, int point, GError **error);
int cbt_backup_restore(const char *repo, int point, const char *to, GError **error);
int cbt_backup_prune(const char *repo, guint keep, CbtBackupProgressMode progress, GError **error);

G_END_DECLS
