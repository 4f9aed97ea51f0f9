/* nbd/nbd-internal.h — what the files of nbd/ share. Not for other modules.
 *
 * Locking: one mutex, cbt_nbd_lock, guards the export list, every export's `conns`,
 * `shutting_down` and `deleted`, and the server's connection list. It is never held across
 * socket or block I/O. Export fields other than those are immutable after creation.
 */
#pragma once

#include <glib.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include "nbd/nbd.h"
#include "nbd/nbd-protocol.h"

/* Limits (nbd-server.md §12). */
#define CBT_NBD_MAX_OPTION_PAYLOAD (1u << 20)  /* larger options are discarded unread */
#define CBT_NBD_MAX_OPTION_DISCARD (64u << 20) /* larger ones drop the client */
#define CBT_NBD_OPTION_BUDGET 64u              /* options before GO (+1 per export listed) */
#define CBT_NBD_MAX_CONTEXTS 64u               /* selected per connection */
#define CBT_NBD_MAX_EXTENTS (1u << 20)         /* descriptors per status chunk */
#define CBT_NBD_MAX_STATUS_LEN 0xFFFFF000u     /* longest answer to one BLOCK_STATUS */
#define CBT_NBD_MAX_PAYLOAD NBD_DEFAULT_MAX_PAYLOAD
#define CBT_NBD_MAX_DISCARD_WRITE (2u * CBT_NBD_MAX_PAYLOAD) /* above: disconnect */

typedef struct CbtNbdExport CbtNbdExport;
typedef struct CbtNbdConn CbtNbdConn;

typedef struct {
  char *name; /* the bitmap's name; the context is qemu:dirty-bitmap:<name> */
  CbtBitmap *bm;
} CbtNbdExportBitmap;

struct CbtNbdExport {
  gatomicrefcount ref;
  char *id;
  char *name;
  char *description; /* NULL when none */
  CbtBlockdev *bd;   /* referenced; a user of the node */
  guint64 size;
  gboolean writable;
  gboolean writethrough;
  gboolean allocation_depth;
  gboolean multi_conn;
  guint32 min_block;
  guint32 pref_block;
  guint32 max_payload;
  GPtrArray *bitmaps; /* CbtNbdExportBitmap */
  /* Under cbt_nbd_lock: */
  gboolean shutting_down;
  gboolean deleted;
  GPtrArray *conns; /* attached CbtNbdConn (not owned) */
};

/* Kinds of meta context. */
typedef enum {
  CBT_NBD_META_BASE_ALLOCATION,
  CBT_NBD_META_ALLOCATION_DEPTH,
  CBT_NBD_META_DIRTY_BITMAP,
} CbtNbdMetaKind;

typedef struct {
  guint32 id;
  CbtNbdMetaKind kind;
  guint bitmap; /* index into exp->bitmaps for DIRTY_BITMAP */
} CbtNbdMetaSel;

/* One client connection, owned by its thread. Only `fd` (for shutdown()) and `exp` are looked
 * at by other threads, under cbt_nbd_lock. */
struct CbtNbdConn {
  int fd;
  gboolean is_inet;
  gint64 deadline; /* g_get_monotonic_time() limit while handshaking, 0 afterwards */
  gboolean no_zeroes;
  gboolean fixed;
  gboolean structured;
  CbtNbdExport *exp;      /* attached export (ref held) once in transmission */
  CbtNbdExport *meta_exp; /* export the meta selection was made for (ref held) */
  GArray *meta;           /* CbtNbdMetaSel */
  guint16 eflags;
  gboolean closing; /* under cbt_nbd_lock: the server asked this connection to end */
};

/* server.c */
extern GMutex cbt_nbd_lock;
gboolean cbt_nbd_server_running(void);
guint32 cbt_nbd_server_max_connections(void);
gint64 cbt_nbd_handshake_timeout_us(void);

/* wire.c: blocking socket I/O. Reads honour conn->deadline when it is set. Each returns 0, or
 * -1 on EOF/error (errno set; EOF at a message boundary gives errno 0 from read_full). */
int cbt_nbd_read_full(CbtNbdConn *conn, void *buf, gsize len);
int cbt_nbd_discard(CbtNbdConn *conn, guint64 len);
int cbt_nbd_write_full(CbtNbdConn *conn, const void *buf, gsize len);
int cbt_nbd_writev_full(CbtNbdConn *conn, struct iovec *iov, int n);

/* handshake.c: TRUE with conn->exp attached when transmission may start. */
gboolean cbt_nbd_handshake(CbtNbdConn *conn);

/* meta.c */
typedef struct {
  CbtNbdMetaKind kind;
  guint bitmap;
  char *name;
} CbtNbdMetaMatch;
/* Parse a LIST/SET_META_CONTEXT payload (after the export name). Appends what @queries match on
 * @exp to @out (CbtNbdMetaMatch, caller clears names). FALSE if the payload is malformed. */
gboolean cbt_nbd_meta_parse(CbtNbdExport *exp, gboolean list, const guint8 *buf, gsize len,
                            GArray *out, const char **why);
void cbt_nbd_meta_match_clear(gpointer p);

/* export.c */
CbtNbdExport *cbt_nbd_export_find_name(const char *name); /* ref'd; skips shutting-down ones */
CbtNbdExport *cbt_nbd_export_ref(CbtNbdExport *exp);
void cbt_nbd_export_unref(CbtNbdExport *exp);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtNbdExport, cbt_nbd_export_unref)
gboolean cbt_nbd_export_attach(CbtNbdExport *exp, CbtNbdConn *conn);
void cbt_nbd_export_detach(CbtNbdExport *exp, CbtNbdConn *conn);
/* (name, description-or-NULL) pairs of every listable export, in creation order. */
GPtrArray *cbt_nbd_export_list(void);
guint16 cbt_nbd_export_eflags(CbtNbdExport *exp, gboolean structured);
/* Every export (main thread): stop them and drop their clients; finalize unattached ones. */
void cbt_nbd_export_shutdown_all(gboolean wait_for_clients);
GPtrArray *cbt_nbd_export_query(void); /* CbtNbdExport refs, newest first */
void cbt_nbd_export_set_rpc(CbtRpc *rpc);

/* server.c: ask a connection to end (under cbt_nbd_lock). */
void cbt_nbd_conn_kick_locked(CbtNbdConn *conn);
/* Wait (main thread) until every connection thread has exited or @timeout_us passed. */
void cbt_nbd_server_wait_idle(gint64 timeout_us);
void cbt_nbd_server_stop_listening(void);
gboolean cbt_nbd_server_listen(const char *what, int fd, gboolean is_inet, guint32 max_conn,
                               GError **error);

/* status.c: extents of one context from @offset, covering [offset, offset + len) (the last one
 * may run on past it, see status.c), merged, at most CBT_NBD_MAX_EXTENTS, one only with
 * @req_one, appended to @out (CbtNbdExtent, host order). Returns 0 or a negative errno. */
typedef struct {
  guint32 len;
  guint32 flags;
} CbtNbdExtent;

int cbt_nbd_status_extents(CbtNbdExport *exp, const CbtNbdMetaSel *sel, guint64 offset, guint64 len,
                           gboolean req_one, GArray *out);

/* transmit.c */
void cbt_nbd_transmit(CbtNbdConn *conn);
/* errno (positive) -> NBD error, in one place. */
guint32 cbt_nbd_errno_to_nbd(int err, guint16 cmd_flags);

/* Big-endian helpers */
static inline void
cbt_nbd_put16(guint8 *p, guint16 v)
{
  p[0] = v >> 8;
  p[1] = v;
}

static inline void
cbt_nbd_put32(guint8 *p, guint32 v)
{
  v = GUINT32_TO_BE(v);
  memcpy(p, &v, 4);
}

static inline void
cbt_nbd_put64(guint8 *p, guint64 v)
{
  v = GUINT64_TO_BE(v);
  memcpy(p, &v, 8);
}

static inline guint16
cbt_nbd_get16(const guint8 *p)
{
  return (guint16)(p[0] << 8 | p[1]);
}

static inline guint32
cbt_nbd_get32(const guint8 *p)
{
  guint32 v;
  memcpy(&v, p, 4);
  return GUINT32_FROM_BE(v);
}

static inline guint64
cbt_nbd_get64(const guint8 *p)
{
  guint64 v;
  memcpy(&v, p, 8);
  return GUINT64_FROM_BE(v);
}
