/* nbd/transmit.c — the transmission phase's reader: take requests off the socket (buffered:
 * one recv brings every request the client has queued), validate each in one place
 * (validate()), admit it into the connection's pool and hand it to a worker, which executes it
 * and replies as soon as it completes (execute.c), so replies may leave out of order.
 *
 * The reader serves a request itself, without a thread hand-off, only when it cannot block: a
 * READ whose data cachestat() finds in the page cache, a short buffered WRITE or a BLOCK_STATUS
 * answered from bitmaps alone. That keeps a one-request-at-a-time client at one thread's
 * latency.
 *
 * On DISC, EOF, a protocol violation or a dead socket the reader stops, waits for every admitted
 * request to be answered and joins the workers before the connection may be freed
 * (docs/nbd-server.md, "Connections and their requests").
 */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* cachestat(2) (Linux 6.5; one number on every architecture), not yet in every libc's headers. */
#define CBT_NR_CACHESTAT 451
typedef struct {
  guint64 off, len;
} CacheRange;
typedef struct {
  guint64 nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
} CacheStat;

#define INBUF_SIZE (16u << 10) /* hundreds of request headers per recv */
#define CBT_NBD_POLL_MIN_NS 4000

typedef struct {
  guint16 flags;
  guint16 type;
  guint64 cookie;
  guint64 offset;
  guint32 len;
} Request;

typedef struct {
  CbtNbdConn *conn;
  CbtNbdPool *pool;
  guint8 *in; /* received, not yet consumed: [start, end) */
  gsize start, end;
  CbtNbdCork cork;        /* replies of requests the reader served itself */
  gint64 poll_ns;         /* spin this long for the next request before sleeping (receive()) */
  gboolean last_was_data; /* the last request admitted was a READ or WRITE */
} Reader;

static const guint16 known_flags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF |
                                   NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
static gboolean
is_write_type(guint16 type)
{
  return type == NBD_CMD_WRITE || type == NBD_CMD_TRIM || type == NBD_CMD_WRITE_ZEROES;
}

static guint32
refuse(const char **msg, const char *why, guint32 err)
{
  *msg = why;
  return err;
}

/* Every check before any backend call (docs/nbd-server.md, "Requests"). Returns an NBD error
 * (0 = valid) and a message for the error chunk. */
static guint32
validate(CbtNbdConn *conn, const Request *r, const char **msg)
{
  CbtNbdExport *exp = conn->exp;
  guint16 f = r->flags;

  if (r->type > NBD_CMD_BLOCK_STATUS)
    return refuse(msg, "unknown command", NBD_EINVAL);
  if (f & ~known_flags)
    return refuse(msg, "unknown command flags", NBD_EINVAL);
  if ((f & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) && r->type != NBD_CMD_WRITE_ZEROES)
    return refuse(msg, "NO_HOLE and FAST_ZERO apply to WRITE_ZEROES only", NBD_EINVAL);
  if ((f & NBD_CMD_FLAG_DF) && (r->type != NBD_CMD_READ || !(conn->eflags & NBD_FLAG_SEND_DF)))
    return refuse(msg, "DF applies to structured READ only", NBD_EINVAL);
  if ((f & NBD_CMD_FLAG_FAST_ZERO) && !(conn->eflags & NBD_FLAG_SEND_FAST_ZERO))
    return refuse(msg, "FAST_ZERO not negotiated", NBD_EINVAL);
  if ((f & NBD_CMD_FLAG_REQ_ONE) && r->type != NBD_CMD_BLOCK_STATUS)
    return refuse(msg, "REQ_ONE applies to BLOCK_STATUS only", NBD_EINVAL);
  if (is_write_type(r->type) && !exp->writable)
    return refuse(msg, "export is read-only", NBD_EPERM);
  if (r->type == NBD_CMD_BLOCK_STATUS && !conn->structured)
    return refuse(msg, "structured replies not negotiated", NBD_EINVAL);
  if (r->type == NBD_CMD_FLUSH)
    return NBD_SUCCESS; /* offset and length are reserved; ignored as qemu does */

  if (r->offset > exp->size || r->len > exp->size - r->offset) {
    *msg = "request past the end of the export";
    return (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES) ? NBD_ENOSPC : NBD_EINVAL;
  }
  if (r->len == 0)
    return refuse(msg, "zero-length request", NBD_EINVAL);
  if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->len > exp->max_payload)
    return refuse(msg, "request larger than the maximum payload", NBD_EINVAL);
  if (r->type == NBD_CMD_BLOCK_STATUS && (!conn->meta || conn->meta->len == 0))
    return refuse(msg, "no meta context negotiated", NBD_EINVAL);
  return NBD_SUCCESS;
}

/* --- buffered intake ----------------------------------------------------------------------- */

/* Adaptive polling (the idea of QEMU's IOThread poll-max-ns): a client that sends its next
 * request within moments of our reply is waited for by spinning on a non-blocking receive, not
 * by sleeping. Sleeping costs two wake-ups per round trip, and on a virtual machine a wake-up of an
 * idle vCPU (an IPI and a VM exit) costs more than a cached 4 KiB read. The spin budget follows
 * the client: it doubles while waits end soon after it ran out and halves when a wait outlasts
 * cbt_nbd_poll_max_ns(), so a slow or idle client soon costs no CPU. Only data I/O spins: after a
 * BLOCK_STATUS reply the client has hundreds of extents to digest, and a backup's map walk is
 * bound by that, not by our wake-up. Bytes the transport already holds are no wait at all: they
 * are taken at once and say nothing about the client's pace. */
static ssize_t
receive(Reader *rd)
{
  CbtNbdTransport *t = rd->conn->transport;
  guint8 *p = rd->in + rd->end;
  gsize room = INBUF_SIZE - rd->end;
  gint64 poll_max = cbt_nbd_poll_max_ns();
  gint64 t0 = 0;

  if (t->ops->pending(t) > 0)
    return t->ops->recv_nowait(t, p, room);
  if (!rd->last_was_data || poll_max == 0 || cbt_nbd_pool_busy(rd->pool))
    return t->ops->recv(t, p, room); /* workers have requests: their replies prompt the client */
  if (rd->poll_ns > 0) {
    t0 = g_get_monotonic_time();
    gint64 until = t0 + rd->poll_ns / 1000;
    do {
      ssize_t r = t->ops->recv_nowait(t, p, room);
      if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
        return r;
    } while (g_get_monotonic_time() < until);
  } else {
    ssize_t r = t->ops->recv_nowait(t, p, room);
    if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
      return r;
    t0 = g_get_monotonic_time();
  }
  ssize_t r = t->ops->recv(t, p, room);
  gint64 waited_ns = (g_get_monotonic_time() - t0) * 1000;
  if (waited_ns > poll_max)
    rd->poll_ns = rd->poll_ns / 2 >= CBT_NBD_POLL_MIN_NS ? rd->poll_ns / 2 : 0;
  else if (waited_ns > rd->poll_ns)
    rd->poll_ns = MIN(poll_max, MAX(rd->poll_ns * 2, CBT_NBD_POLL_MIN_NS));
  return r;
}

/* Until at least @want (<= INBUF_SIZE) bytes are buffered. FALSE at EOF or on error. */
static gboolean
fill(Reader *rd, gsize want)
{
  if (rd->end - rd->start >= want)
    return TRUE;
  if (INBUF_SIZE - rd->start < want) {
    memmove(rd->in, rd->in + rd->start, rd->end - rd->start);
    rd->end -= rd->start;
    rd->start = 0;
  }
  /* About to wait for the client: whatever it may be waiting for goes out first. */
  cbt_nbd_cork_flush(&rd->cork);
  while (rd->end - rd->start < want) {
    ssize_t r = receive(rd);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return FALSE;
    rd->end += (gsize)r;
  }
  return TRUE;
}

/* The rest of a message whose start has arrived: the client is sending it now (a header and its
 * payload often leave in two sends), so it is spun for, up to the polling cap, rather than slept
 * for; what the transport holds already is taken whatever the cap. Advances *@dst and *@len;
 * FALSE at EOF or on a socket error. */
static gboolean
spin_for(Reader *rd, guint8 **dst, guint64 *len)
{
  CbtNbdTransport *t = rd->conn->transport;
  gint64 poll_max = cbt_nbd_poll_max_ns();
  gint64 until = poll_max ? g_get_monotonic_time() + poll_max / 1000 : 0;

  while (*len > 0 && (t->ops->pending(t) > 0 || (poll_max && g_get_monotonic_time() < until))) {
    ssize_t r = t->ops->recv_nowait(t, *dst, *len);
    if (r > 0) {
      *dst += r;
      *len -= (guint64)r;
    } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      return FALSE;
    }
  }
  return TRUE;
}

/* @len payload bytes into @dst (NULL: drop them), the buffered part first, the rest straight
 * from the transport. */
static gboolean
take_payload(Reader *rd, guint8 *dst, guint64 len)
{
  gsize have = (gsize)MIN(len, rd->end - rd->start);

  if (dst)
    memcpy(dst, rd->in + rd->start, have);
  rd->start += have;
  if (rd->start == rd->end)
    rd->start = rd->end = 0;
  len -= have;
  if (len == 0)
    return TRUE;
  cbt_nbd_cork_flush(&rd->cork);
  if (!dst)
    return cbt_nbd_discard(rd->conn, len) == 0;
  dst += have;
  if (!spin_for(rd, &dst, &len))
    return FALSE;
  return len == 0 || cbt_nbd_read_full(rd->conn, dst, len) == 0;
}

/* --- serving --------------------------------------------------------------------------------- */

/* How much of a range the page cache holds, from cachestat(2). */
typedef enum {
  CACHE_UNKNOWN, /* the kernel cannot tell (before Linux 6.5) */
  CACHE_PARTLY,  /* some pages, or none */
  CACHE_ALL,
} CacheState;

static CacheState
cache_state(int fd, guint64 offset, guint64 len)
{
  static gint unsupported;
  guint64 page = (guint64)sysconf(_SC_PAGESIZE); /* cachestat counts pages */
  guint64 first = offset / page, last = (offset + len - 1) / page;
  CacheRange range = { first * page, (last - first + 1) * page };
  CacheStat cs;

  if (g_atomic_int_get(&unsupported))
    return CACHE_UNKNOWN;
  if (syscall(CBT_NR_CACHESTAT, fd, &range, &cs, 0) < 0) {
    if (errno == ENOSYS)
      g_atomic_int_set(&unsupported, 1);
    return CACHE_UNKNOWN;
  }
  return cs.nr_cache == last - first + 1 ? CACHE_ALL : CACHE_PARTLY;
}

/* A short READ served from the page cache without blocking; FALSE when it must go to a
 * worker (not cached, no file, or a short read). The cache is asked first rather than a
 * RWF_NOWAIT read tried: on a miss that read starts readahead, and readahead over an unwritten
 * extent (zeroed with FALLOC_FL_ZERO_RANGE) fills zero pages at once, which SEEK_DATA then
 * reports as data: base:allocation would turn a zeroed range into data where qsd, which
 * never reads what block status calls zero, keeps it a hole. Where the kernel cannot tell, the
 * attempt is still made: a worker hand-off for every short read would cost more. */
static gboolean
try_read_inline(CbtNbdReq *req)
{
  CbtBlockdev *bd = req->conn->exp->bd;
  guint64 fd_offset;
  gboolean ok = FALSE;

  cbt_blockdev_io_begin(bd);
  int fd = cbt_blockdev_get_data_fd(bd, &fd_offset);
  if (fd >= 0 && cache_state(fd, fd_offset + req->offset, req->len) != CACHE_PARTLY) {
    struct iovec iov = { req->buf, req->len };
    ok = preadv2(fd, &iov, 1, (off_t)(fd_offset + req->offset), RWF_NOWAIT) == (ssize_t)req->len;
    if (ok)
      cbt_nbd_execute_read_prefilled(req);
  }
  cbt_blockdev_io_end(bd);
  return ok;
}

/* How a READ goes out. */
typedef enum {
  READ_BUFFERED,         /* through req->buf */
  READ_ZERO_COPY,        /* sendfile from the node's file, by a worker */
  READ_ZERO_COPY_INLINE, /* the same by the reader: all cached, so it cannot block */
} ReadPath;

/* Zero-copy takes a long read, a node backed by one file and a transport that can send file
 * data, and then only a range all in the page cache. A range partly on the disk goes through
 * the buffer, read as qsd reads it (execute.c read_sparse): sendfile reads in pipe-sized steps,
 * which the kernel takes for a sequential stream and reads ahead of, well past the request,
 * into zero pages of unwritten extents that SEEK_DATA then counts as data; one pread per data
 * run is read ahead of as qsd's are. Where the kernel cannot tell, zero-copy stays. */
static ReadPath
read_path(CbtNbdConn *conn, const Request *r)
{
  CbtBlockdev *bd = conn->exp->bd;
  guint64 fd_offset;
  CacheState c = CACHE_PARTLY;

  if (r->len <= CBT_NBD_COPY_MAX || !cbt_nbd_transport_can_sendfile(conn->transport))
    return READ_BUFFERED;
  cbt_blockdev_io_begin(bd);
  int fd = cbt_blockdev_get_data_fd(bd, &fd_offset);
  if (fd >= 0)
    c = cache_state(fd, fd_offset + r->offset, r->len);
  cbt_blockdev_io_end(bd);
  if (c == CACHE_ALL)
    return READ_ZERO_COPY_INLINE;
  return c == CACHE_UNKNOWN ? READ_ZERO_COPY : READ_BUFFERED;
}

/* A long READ sent zero-copy from the page cache by the reader. */
static gboolean
try_send_inline(CbtNbdReq *req)
{
  CbtBlockdev *bd = req->conn->exp->bd;
  guint64 fd_offset;

  cbt_blockdev_io_begin(bd);
  int fd = cbt_blockdev_get_data_fd(bd, &fd_offset);
  if (fd >= 0)
    cbt_nbd_execute_read_zero_copy(req, fd, fd_offset);
  cbt_blockdev_io_end(bd);
  return fd >= 0;
}

/* A short WRITE the reader carries out itself: not one that may wait for a copy-before-write
 * filter's copy of the old data (a point-in-time view, a push-mode backup), which would stall
 * every request behind it on the connection. */
static gboolean
cheap_write(CbtNbdConn *conn, const CbtNbdReq *req)
{
  if (req->type != NBD_CMD_WRITE || req->len > CBT_NBD_INLINE_MAX ||
      (req->flags & NBD_CMD_FLAG_FUA) || conn->exp->writethrough)
    return FALSE;
  CbtBlockdev *bd = conn->exp->bd;
  cbt_blockdev_io_begin(bd);
  gboolean waits = cbt_blockdev_writes_may_wait(bd);
  cbt_blockdev_io_end(bd);
  return !waits;
}

/* BLOCK_STATUS whose contexts only walk in-memory state (bitmaps, the constant allocation
 * depth): no syscall, so the reader answers it without a thread hand-off. base:allocation asks
 * the file system (lseek), which may wait on its metadata: that goes to a worker. */
static gboolean
cheap_status(CbtNbdConn *conn)
{
  for (guint i = 0; i < conn->meta->len; i++)
    if (g_array_index(conn->meta, CbtNbdMetaSel, i).kind == CBT_NBD_META_BASE_ALLOCATION)
      return FALSE;
  return TRUE;
}

/* Serve @req on the reader's thread when that cannot block; FALSE: a worker must. */
static gboolean
serve_inline(Reader *rd, CbtNbdReq *req, ReadPath path)
{
  if (req->type == NBD_CMD_READ && path == READ_BUFFERED)
    return req->len <= CBT_NBD_INLINE_MAX && try_read_inline(req);
  if (req->type == NBD_CMD_READ)
    return path == READ_ZERO_COPY_INLINE && try_send_inline(req);
  if (req->type == NBD_CMD_BLOCK_STATUS ? !cheap_status(rd->conn) : !cheap_write(rd->conn, req))
    return FALSE;
  cbt_nbd_execute(rd->pool, req);
  return TRUE;
}

/* Admit a valid request (its payload, if any, still on the socket) and start it. */
static gboolean
start_request(Reader *rd, const Request *r)
{
  ReadPath path = r->type == NBD_CMD_READ ? read_path(rd->conn, r) : READ_BUFFERED;
  gsize need = 0;

  if (r->type == NBD_CMD_WRITE || (r->type == NBD_CMD_READ && path == READ_BUFFERED))
    need = r->len;
  rd->last_was_data = r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE;
  CbtNbdReq *req = cbt_nbd_pool_admit(rd->pool, r->type, need);
  if (!req)
    return FALSE;
  req->flags = r->flags;
  req->type = r->type;
  req->cookie = r->cookie;
  req->offset = r->offset;
  req->len = r->len;
  req->zero_copy = path != READ_BUFFERED;
  req->failed = FALSE;
  req->t0 = cbt_blockdev_now_ns();
  if (r->type == NBD_CMD_WRITE && !take_payload(rd, req->buf, r->len)) {
    req->t0 = 0; /* the connection ends: never answered, not counted */
    cbt_nbd_pool_complete(rd->pool, req);
    return FALSE;
  }
  if (serve_inline(rd, req, path))
    cbt_nbd_pool_complete(rd->pool, req);
  else
    cbt_nbd_pool_submit(rd->pool, req);
  return TRUE;
}

/* One request; FALSE ends the connection (DISC, EOF, protocol violation, dead socket). */
static gboolean
serve_one(Reader *rd)
{
  const char *msg = NULL;

  if (!fill(rd, NBD_REQUEST_SIZE))
    return FALSE;
  const guint8 *h = rd->in + rd->start;
  if (cbt_nbd_get32(h) != NBD_REQUEST_MAGIC)
    return FALSE; /* the stream cannot be resynchronised */
  Request r = { .flags = cbt_nbd_get16(h + 4),
                .type = cbt_nbd_get16(h + 6),
                .cookie = cbt_nbd_get64(h + 8),
                .offset = cbt_nbd_get64(h + 16),
                .len = cbt_nbd_get32(h + 24) };
  rd->start += NBD_REQUEST_SIZE;
  if (r.type == NBD_CMD_DISC)
    return FALSE;

  guint32 err = validate(rd->conn, &r, &msg);
  if (!err)
    return start_request(rd, &r);
  /* Consume a refused WRITE's payload unbuffered; beyond twice the maximum it is a DoS, not a
   * client. */
  if (r.type == NBD_CMD_WRITE &&
      (r.len > CBT_NBD_MAX_DISCARD_WRITE || !take_payload(rd, NULL, r.len)))
    return FALSE;
  g_debug("NBD request type %u flags 0x%x offset %" G_GUINT64_FORMAT " len %u refused: %s", r.type,
          r.flags, r.offset, r.len, msg);
  cbt_nbd_account_invalid(rd->conn, r.type);
  cbt_nbd_reply_error(rd->conn, r.cookie, err, msg);
  return TRUE;
}

/* Batch the reader's replies only while more requests are waiting, and not too many. */
static void
cork_or_flush(Reader *rd)
{
  if (rd->end - rd->start < NBD_REQUEST_SIZE || rd->cork.replies >= CBT_NBD_CORK_REPLIES)
    cbt_nbd_cork_flush(&rd->cork);
}

void
cbt_nbd_transmit(CbtNbdConn *conn)
{
  Reader rd = { .conn = conn, .pool = cbt_nbd_pool_new(conn), .in = g_malloc(INBUF_SIZE) };

  rd.cork = (CbtNbdCork){ .conn = conn };
  cbt_nbd_cork_set(&rd.cork);
  while (serve_one(&rd))
    cork_or_flush(&rd);
  cbt_nbd_cork_flush(&rd.cork);
  cbt_nbd_cork_set(NULL);
  g_free(rd.cork.buf);
  /* DISC or the end: every admitted request is answered (or its reply dropped on a dead
   * socket) before the connection goes. */
  cbt_nbd_pool_free(rd.pool);
  g_free(rd.in);
}
