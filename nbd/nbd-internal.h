/* nbd/nbd-internal.h — what the files of nbd/ share. Not for other modules.
 *
 * Locking: one mutex, cbt_nbd_lock, guards the export list, every export's `conns`,
 * `shutting_down` and `deleted`, and the server's connection list. It is never held across
 * socket or block I/O. Export fields other than those are immutable after creation.
 * Per connection in transmission: `send_lock` makes each reply (all chunks of a structured one)
 * one unit on the socket; the request pool's own lock (pool.c) guards its slots and queue.
 * Neither is taken while holding the other, nor with cbt_nbd_lock.
 */
#pragma once

#include <glib.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include "common/assert.h"
#include "nbd/nbd.h"
#include "nbd/nbd-protocol.h"
#include "crypto/crypto.h"
#include "nbd/transport.h"

/* Limits (docs/nbd-server.md, "Limits"). */
#define CBT_NBD_MAX_OPTION_PAYLOAD (1u << 20)  /* larger options are discarded unread */
#define CBT_NBD_MAX_OPTION_DISCARD (64u << 20) /* larger ones drop the client */
#define CBT_NBD_OPTION_BUDGET 64u              /* options before GO (+1 per export listed) */
#define CBT_NBD_MAX_CONTEXTS 64u               /* selected per connection */
#define CBT_NBD_MAX_EXTENTS (1u << 20)         /* descriptors per status chunk */
#define CBT_NBD_MAX_STATUS_LEN 0xFFFFF000u     /* longest answer to one BLOCK_STATUS */
#define CBT_NBD_MAX_PAYLOAD NBD_DEFAULT_MAX_PAYLOAD
#define CBT_NBD_MAX_DISCARD_WRITE (2u * CBT_NBD_MAX_PAYLOAD) /* above: disconnect */

/* Transmission concurrency per connection (docs/architecture.md "Threads"): at most this many
 * requests admitted and not yet answered, served by at most this many worker threads, with at
 * most this many bytes of request buffers (in flight or pooled for reuse). */
#define CBT_NBD_MAX_INFLIGHT 64u
#define CBT_NBD_MAX_WORKERS 8u
#define CBT_NBD_BUFFER_BUDGET (64u << 20)
/* What one connection is counted to leave in its thread's malloc arena when it ends, towards
 * a trim (common/memory.h): a handshake payload or a few replies. */
#define CBT_NBD_CONN_OVERHEAD (256u << 10)
/* Send buffer asked for on unix-socket connections (server.c). */
#define CBT_NBD_UNIX_SNDBUF (2 << 20)
/* Reads up to this size are copied through a buffer; longer ones go zero-copy (sendfile) from
 * the node's file when it has one. */
#define CBT_NBD_COPY_MAX (64u << 10)
/* Requests up to this size may be served by the reader itself when they cannot block. */
#define CBT_NBD_INLINE_MAX (64u << 10)

typedef struct CbtNbdExport CbtNbdExport;
typedef struct CbtNbdConn CbtNbdConn;
typedef struct CbtNbdPool CbtNbdPool;

typedef struct {
  char *name;     /* the bitmap's name; the context is qemu:dirty-bitmap:<name> */
  char *identity; /* "UUID:unbroken" or "UUID:broken" as the export was made, or NULL */
  CbtBitmap *bm;
  gboolean frozen; /* a snapshot export's own copy: freed, not released */
} CbtNbdExportBitmap;

struct CbtNbdExport {
  gint ref; /* g_atomic_int_*: inline atomics, which ThreadSanitizer sees */
  char *id;
  char *name;
  char *description; /* NULL when none */
  CbtBlockdev *bd;   /* referenced; a user of the node */
  /* snapshot: true: the view @bd reads (its snapshot-access node), undone with the export. */
  CbtBlockdevSnapshot *snapshot;
  guint64 size;
  gboolean writable;
  gboolean writethrough;
  gboolean allocation_depth;
  gboolean multi_conn;
  guint32 min_block;
  guint32 pref_block;
  guint32 max_payload;  /* the longest READ or WRITE served */
  guint32 max_block;    /* the maximum block size advertised (the node's max transfer) */
  GPtrArray *bitmaps;   /* CbtNbdExportBitmap */
  gboolean auto_remove; /* deleted when its last client leaves (once one came) */
  guint32 max_clients;  /* attached connections at most (0: no limit) */
  /* Its requests' statistics, listed under @bd by query-blockstats; while published. */
  CbtBlockdevExportStats *stats;
  /* Under cbt_nbd_lock: */
  gboolean shutting_down;
  gboolean deleted;
  gboolean had_client;
  GPtrArray *conns; /* attached CbtNbdConn (not owned) */
};

/* Kinds of meta context. */
typedef enum {
  CBT_NBD_META_BASE_ALLOCATION,
  CBT_NBD_META_ALLOCATION_DEPTH,
  CBT_NBD_META_DIRTY_BITMAP,
  CBT_NBD_META_IDENTITY, /* LIST only: a published bitmap's identity, in the context's name */
} CbtNbdMetaKind;

typedef struct {
  guint32 id;
  CbtNbdMetaKind kind;
  guint bitmap; /* index into exp->bitmaps for DIRTY_BITMAP */
} CbtNbdMetaSel;

/* One client connection, owned by its thread. Only `transport` (for its shutdown) and `exp` are
 * looked at by other threads, under cbt_nbd_lock; in transmission the connection's workers also
 * read the negotiated fields (immutable by then) and send under `send_lock`. The connection
 * thread joins its workers before the connection is freed. */
struct CbtNbdConn {
  CbtNbdTransport *transport; /* every byte to and from the client; owns the socket */
  int fd;                     /* the socket itself: for socket options only (server.c) */
  gboolean is_inet;
  gint64 deadline; /* g_get_monotonic_time() limit while handshaking, 0 afterwards */
  gboolean no_zeroes;
  gboolean fixed;
  gboolean structured;
  CbtCryptoTlsCreds *tls_creds; /* while handshaking, when the server requires TLS (ref held) */
  CbtCryptoAuthz *tls_authz;    /* the same, for the identity check */
  gboolean tls_done;            /* STARTTLS succeeded */
  CbtNbdExport *exp;            /* attached export (ref held) once in transmission */
  CbtNbdExport *meta_exp;       /* export the meta selection was made for (ref held) */
  GArray *meta;                 /* CbtNbdMetaSel */
  guint16 eflags;
  gboolean closing;     /* under cbt_nbd_lock: the server asked this connection to end */
  CbtMutex send_lock;   /* one reply at a time on the socket */
  gboolean send_failed; /* under send_lock: the socket is unusable, replies are dropped */
};

/* One request of a connection in transmission: a slot of its pool. The slot, and so the
 * request, belongs to one connection for its whole life and is answered there
 * (docs/nbd-server.md, "Connections and their requests"). */
typedef struct {
  CbtNbdConn *conn;
  guint16 flags;
  guint16 type;
  guint64 cookie;
  guint64 offset;
  guint32 len;
  guint8 *buf; /* pooled across requests: WRITE payload or READ data */
  gsize cap;
  gboolean zero_copy; /* READ: sent from the node's file, not through buf (transmit.c) */
  guint64 write_seq;  /* write-type: admission order; 0 once finished (under the pool lock) */
  guint64 flush_upto; /* FLUSH: the last write admitted before it */
  gint64 t0;          /* when it was admitted (CLOCK_MONOTONIC ns); 0: not counted */
  gboolean failed;    /* answered with an error (execute.c reply_errno) */
  gint next;          /* free-list / queue link */
} CbtNbdReq;

/* server.c */
extern CbtMutex cbt_nbd_lock;
gboolean cbt_nbd_server_running(void);
guint32 cbt_nbd_server_max_connections(void);
gint64 cbt_nbd_handshake_timeout_us(void);
/* Adaptive polling's cap in ns (CBTD_NBD_POLL_MAX_NS; 0: never spin). The default is above the
 * ~40 us a cross-vCPU wake-up was measured to cost on the development VM. */
#define CBT_NBD_POLL_MAX_NS 100000
gint64 cbt_nbd_poll_max_ns(void);

/* wire.c: whole messages through conn->transport, blocking. Reads honour conn->deadline when it
 * is set. Each returns 0, or -1 on EOF/error (errno set; EOF at a message boundary gives errno 0
 * from read_full). */
int cbt_nbd_read_full(CbtNbdConn *conn, void *buf, gsize len);
int cbt_nbd_discard(CbtNbdConn *conn, guint64 len);
int cbt_nbd_write_full(CbtNbdConn *conn, const void *buf, gsize len);
int cbt_nbd_writev_full(CbtNbdConn *conn, struct iovec *iov, int n);
/* Send @len bytes of @fd from @offset (zero-copy); bytes past the end of the file go out as
 * zeroes. Only on a transport that can (cbt_nbd_transport_can_sendfile). */
int cbt_nbd_sendfile_full(CbtNbdConn *conn, int fd, guint64 offset, gsize len);

/* pool.c: the requests of one connection in transmission and the workers that serve them. */
CbtNbdPool *cbt_nbd_pool_new(CbtNbdConn *conn);
/* Reader: a free slot whose buffer holds @buf_len bytes, waiting while the connection is at
 * its limits. Write-type and FLUSH requests get their ordering set here. NULL when memory is
 * short. */
CbtNbdReq *cbt_nbd_pool_admit(CbtNbdPool *pool, guint16 type, gsize buf_len);
/* Hand an admitted request to a worker; it executes it, replies and completes it. */
void cbt_nbd_pool_submit(CbtNbdPool *pool, CbtNbdReq *req);
/* Whether any admitted request is still unanswered. */
gboolean cbt_nbd_pool_busy(CbtNbdPool *pool);
/* The request is answered: its slot is free again. */
void cbt_nbd_pool_complete(CbtNbdPool *pool, CbtNbdReq *req);
/* FLUSH: wait until every write admitted before @req has finished. */
void cbt_nbd_pool_wait_writes(CbtNbdPool *pool, const CbtNbdReq *req);
/* Wait for every admitted request to be answered, stop and join the workers, free. */
void cbt_nbd_pool_free(CbtNbdPool *pool);

/* execute.c: run a valid request against the export and reply; the caller then completes it.
 * execute_read_prefilled: a READ whose data is already in req->buf. */
void cbt_nbd_execute(CbtNbdPool *pool, CbtNbdReq *req);
/* query-blockstats (execute.c): @req was answered, on any thread; a request of @type the reader
 * refused. Both count on the export's node and on the export, with relaxed atomics. */
void cbt_nbd_account_done(CbtNbdReq *req);
void cbt_nbd_account_invalid(CbtNbdConn *conn, guint16 type);
/* Is a request of @type counted, and as what? */
gboolean cbt_nbd_acct_kind(guint16 type, CbtBlockdevAcct *kind);
void cbt_nbd_execute_read_prefilled(CbtNbdReq *req);
/* A READ sent zero-copy from @fd, the node's data file (@fd_offset: where the node starts in
 * it); between io_begin and io_end. */
void cbt_nbd_execute_read_zero_copy(CbtNbdReq *req, int fd, guint64 fd_offset);

/* reply.c: a batch of whole replies gathered by one thread (see reply.c). */
#define CBT_NBD_CORK_SIZE (64u << 10)
#define CBT_NBD_CORK_REPLIES 32u
#define CBT_NBD_CORK_COPY_MAX (CBT_NBD_CORK_SIZE / 2) /* larger replies are not copied */
#define CBT_NBD_CORK_SMALL (4096u + 64u)              /* a 4 KiB read's reply and header */
#define CBT_NBD_CORK_IOV 4                            /* batch + a large reply's pieces */
typedef struct {
  CbtNbdConn *conn;
  gsize len;
  guint replies;
  guint8 *buf; /* CBT_NBD_CORK_SIZE bytes, allocated on first use; the owner frees it */
} CbtNbdCork;
/* Gather the calling thread's replies on c->conn into @c (NULL: send directly again). */
void cbt_nbd_cork_set(CbtNbdCork *c);
void cbt_nbd_cork_flush(CbtNbdCork *c);

/* reply.c: every sender takes conn->send_lock itself unless named _locked (caller holds it).
 * A failed send marks the connection unusable and shuts its socket down, so the reader stops. */
void cbt_nbd_reply_simple(CbtNbdConn *conn, guint64 cookie, guint32 err, const void *data,
                          gsize len);
void cbt_nbd_reply_error(CbtNbdConn *conn, guint64 cookie, guint32 err, const char *msg);
void cbt_nbd_reply_error_locked(CbtNbdConn *conn, guint64 cookie, guint32 err, const char *msg);
void cbt_nbd_reply_data_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                               const void *data, gsize len);
void cbt_nbd_reply_data_fd_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                                  int fd, guint64 fd_offset, gsize len);
void cbt_nbd_reply_simple_fd_locked(CbtNbdConn *conn, guint64 cookie, int fd, guint64 fd_offset,
                                    gsize len);
void cbt_nbd_reply_hole_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                               guint32 len);
void cbt_nbd_reply_status_locked(CbtNbdConn *conn, guint64 cookie, guint32 id, GArray *ext,
                                 gboolean done);

/* cmds.c: the running server's TLS credentials and authz (references), FALSE without TLS. */
gboolean cbt_nbd_tls_get(CbtCryptoTlsCreds **creds, CbtCryptoAuthz **authz);

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
/* The export's clients include @conn from now on: CBT_NBD_ATTACH_OK, or why not. */
typedef enum { CBT_NBD_ATTACH_OK, CBT_NBD_ATTACH_GONE, CBT_NBD_ATTACH_FULL } CbtNbdAttach;
CbtNbdAttach cbt_nbd_export_attach(CbtNbdExport *exp, CbtNbdConn *conn);
void cbt_nbd_export_detach(CbtNbdExport *exp, CbtNbdConn *conn);
/* (name, description-or-NULL) pairs of every listable export, in creation order. */
GPtrArray *cbt_nbd_export_list(void);
guint16 cbt_nbd_export_eflags(CbtNbdExport *exp, gboolean structured);
/* Every export (main thread): stop them and drop their clients; finalize unattached ones. */
void cbt_nbd_export_shutdown_all(gboolean wait_for_clients);
GPtrArray *cbt_nbd_export_query(void); /* CbtNbdExport refs, newest first */

/* server.c: ask a connection to end (under cbt_nbd_lock). */
void cbt_nbd_conn_kick_locked(CbtNbdConn *conn);
/* server.c: a send that cannot finish within @ms fails (0: sends may wait for ever). */
void cbt_nbd_conn_set_send_timeout(CbtNbdConn *conn, guint ms);
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
/* errno (positive) -> NBD error, in one place (execute.c). */
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
