/* nbd/transmit.c — the transmission phase: read a request, validate it in one place
 * (validate()), run it against blockdev/, reply (simple, or structured chunks when negotiated).
 *
 * One request at a time per connection; every reply is written by the connection's own thread,
 * so no reply can reach another connection (pitfall P14).
 */
#include "nbd/nbd-internal.h"

#include <errno.h>

typedef struct {
  guint16 flags;
  guint16 type;
  guint64 cookie;
  guint64 offset;
  guint32 len;
} Request;

static const guint16 known_flags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF
                                   | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
/* ZERO runs shorter than this are sent as data: a chunk header costs more than the zeroes. */
#define MIN_HOLE_CHUNK 4096u
/* Content chunks per READ before the rest is sent as one data chunk. */
#define MAX_READ_RUNS 1024u

guint32
cbt_nbd_errno_to_nbd(int err, guint16 cmd_flags)
{
  switch (err) {
  case 0:
    return NBD_SUCCESS;
  case EPERM:
  case EROFS:
    return NBD_EPERM;
  case EIO:
    return NBD_EIO;
  case ENOMEM:
    return NBD_ENOMEM;
  case ENOSPC:
  case EDQUOT:
  case EFBIG:
    return NBD_ENOSPC;
  case ESHUTDOWN:
    return NBD_ESHUTDOWN;
  case ENOTSUP:
    return (cmd_flags & NBD_CMD_FLAG_FAST_ZERO) ? NBD_ENOTSUP : NBD_EINVAL;
  case EOVERFLOW:
    return (cmd_flags & NBD_CMD_FLAG_DF) ? NBD_EOVERFLOW : NBD_EINVAL;
  default:
    return NBD_EINVAL;
  }
}

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

/* Every check before any backend call (nbd-server.md §7). Returns an NBD error (0 = valid) and
 * a message for the error chunk. */
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

/* --- replies ------------------------------------------------------------------------------- */

static void
chunk_header(guint8 *h, guint16 flags, guint16 type, guint64 cookie, guint32 len)
{
  cbt_nbd_put32(h, NBD_STRUCTURED_REPLY_MAGIC);
  cbt_nbd_put16(h + 4, flags);
  cbt_nbd_put16(h + 6, type);
  cbt_nbd_put64(h + 8, cookie);
  cbt_nbd_put32(h + 16, len);
}

static int
send_simple(CbtNbdConn *conn, guint64 cookie, guint32 err, const void *data, gsize len)
{
  guint8 h[NBD_SIMPLE_REPLY_SIZE];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)data, len } };

  cbt_nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
  cbt_nbd_put32(h + 4, err);
  cbt_nbd_put64(h + 8, cookie);
  return cbt_nbd_writev_full(conn, iov, len ? 2 : 1);
}

static int
send_error(CbtNbdConn *conn, const Request *r, guint32 err, const char *msg)
{
  if (!conn->structured)
    return send_simple(conn, r->cookie, err, NULL, 0);

  gsize ml = msg ? strlen(msg) : 0;
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 6];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)msg, ml } };

  chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->cookie, 6 + ml);
  cbt_nbd_put32(h + 20, err);
  cbt_nbd_put16(h + 24, ml);
  return cbt_nbd_writev_full(conn, iov, ml ? 2 : 1);
}

static int
send_data_chunk(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset, const guint8 *data,
                gsize len)
{
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 8];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)data, len } };

  chunk_header(h, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
  cbt_nbd_put64(h + 20, offset);
  return cbt_nbd_writev_full(conn, iov, 2);
}

static int
send_hole_chunk(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset, guint32 len)
{
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 12];

  chunk_header(h, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  cbt_nbd_put64(h + 20, offset);
  cbt_nbd_put32(h + 28, len);
  return cbt_nbd_write_full(conn, h, sizeof h);
}

/* --- READ ---------------------------------------------------------------------------------- */

typedef struct {
  guint32 start; /* relative to the request offset */
  guint32 len;
  gboolean hole;
} Run;

/* Split the request into data and hole runs from base:allocation. Failure to learn the status
 * only costs efficiency: the rest is data. */
static GArray *
read_runs(CbtNbdConn *conn, const Request *r)
{
  GArray *runs = g_array_new(FALSE, FALSE, sizeof(Run));
  guint32 pos = 0;

  while (pos < r->len) {
    guint64 pnum = 0;
    guint32 status = 0;
    gboolean hole = FALSE;
    if (runs->len < MAX_READ_RUNS
        && cbt_blockdev_block_status(conn->exp->bd, r->offset + pos, r->len - pos, &pnum, &status)
               == 0
        && pnum > 0 && pnum <= r->len - pos)
      hole = (status & CBT_BLOCKDEV_STATUS_ZERO) && pnum >= MIN_HOLE_CHUNK;
    else
      pnum = r->len - pos;
    Run *last = runs->len ? &g_array_index(runs, Run, runs->len - 1) : NULL;
    if (last && last->hole == hole) {
      last->len += pnum;
    } else {
      Run run = { .start = pos, .len = (guint32)pnum, .hole = hole };
      g_array_append_val(runs, run);
    }
    pos += pnum;
  }
  return runs;
}

/* Read the data runs first, so an I/O error is known before any chunk is sent. */
static int
do_read(CbtNbdConn *conn, const Request *r)
{
  CbtBlockdev *bd = conn->exp->bd;
  gboolean df = (r->flags & NBD_CMD_FLAG_DF) || !conn->structured;
  g_autofree guint8 *buf = g_try_malloc(r->len);
  g_autoptr(GArray) runs = NULL;
  int err = 0;

  if (!buf)
    return send_error(conn, r, NBD_ENOMEM, "out of memory");
  if (df) {
    err = cbt_blockdev_pread(bd, buf, r->offset, r->len);
  } else {
    runs = read_runs(conn, r);
    for (guint i = 0; i < runs->len && !err; i++) {
      Run *run = &g_array_index(runs, Run, i);
      if (!run->hole)
        err = cbt_blockdev_pread(bd, buf + run->start, r->offset + run->start, run->len);
    }
  }
  if (err < 0)
    return send_error(conn, r, cbt_nbd_errno_to_nbd(-err, r->flags), g_strerror(-err));
  if (!conn->structured)
    return send_simple(conn, r->cookie, 0, buf, r->len);
  if (df)
    return send_data_chunk(conn, r->cookie, TRUE, r->offset, buf, r->len);
  for (guint i = 0; i < runs->len; i++) {
    Run *run = &g_array_index(runs, Run, i);
    gboolean done = i + 1 == runs->len;
    int w = run->hole ? send_hole_chunk(conn, r->cookie, done, r->offset + run->start, run->len)
                      : send_data_chunk(conn, r->cookie, done, r->offset + run->start,
                                        buf + run->start, run->len);
    if (w < 0)
      return w;
  }
  return 0;
}

/* --- BLOCK_STATUS -------------------------------------------------------------------------- */

static int
send_status_chunk(CbtNbdConn *conn, const Request *r, guint32 id, GArray *ext, gboolean done)
{
  gsize n = ext->len;
  g_autofree guint8 *buf = g_malloc(NBD_STRUCTURED_REPLY_SIZE + 4 + 8 * n);

  chunk_header(buf, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, r->cookie,
               4 + 8 * n);
  cbt_nbd_put32(buf + 20, id);
  for (gsize i = 0; i < n; i++) {
    CbtNbdExtent *e = &g_array_index(ext, CbtNbdExtent, i);
    cbt_nbd_put32(buf + 24 + 8 * i, e->len);
    cbt_nbd_put32(buf + 28 + 8 * i, e->flags);
  }
  return cbt_nbd_write_full(conn, buf, NBD_STRUCTURED_REPLY_SIZE + 4 + 8 * n);
}

static int
do_block_status(CbtNbdConn *conn, const Request *r)
{
  gboolean one = (r->flags & NBD_CMD_FLAG_REQ_ONE) != 0;

  for (guint i = 0; i < conn->meta->len; i++) {
    CbtNbdMetaSel *sel = &g_array_index(conn->meta, CbtNbdMetaSel, i);
    g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(CbtNbdExtent));
    int err = cbt_nbd_status_extents(conn->exp, sel, r->offset, r->len, one, ext);
    if (err < 0 || ext->len == 0) {
      /* Status 0 ("data", "clean") is always a safe answer (nbd-server.md §10). */
      CbtNbdExtent e = { (guint32)MIN(r->len, CBT_NBD_MAX_STATUS_LEN - (r->offset & 4095)), 0 };
      g_array_set_size(ext, 0);
      g_array_append_val(ext, e);
    }
    if (send_status_chunk(conn, r, sel->id, ext, i + 1 == conn->meta->len) < 0)
      return -1;
  }
  return 0;
}

/* --- the other commands -------------------------------------------------------------------- */

static int
run_command(CbtNbdConn *conn, const Request *r, const guint8 *payload)
{
  CbtNbdExport *exp = conn->exp;
  guint bflags = (r->flags & NBD_CMD_FLAG_FUA) ? CBT_BLOCKDEV_FUA : 0;

  switch (r->type) {
  case NBD_CMD_WRITE:
    if (exp->writethrough)
      bflags |= CBT_BLOCKDEV_FUA;
    return cbt_blockdev_pwrite(exp->bd, payload, r->offset, r->len, bflags);
  case NBD_CMD_FLUSH:
    return cbt_blockdev_flush(exp->bd);
  case NBD_CMD_TRIM:
    return cbt_blockdev_discard(exp->bd, r->offset, r->len, bflags);
  case NBD_CMD_WRITE_ZEROES:
    if (!(r->flags & NBD_CMD_FLAG_NO_HOLE))
      bflags |= CBT_BLOCKDEV_MAY_UNMAP;
    if (r->flags & NBD_CMD_FLAG_FAST_ZERO)
      bflags |= CBT_BLOCKDEV_NO_FALLBACK;
    if (exp->writethrough)
      bflags |= CBT_BLOCKDEV_FUA;
    return cbt_blockdev_write_zeroes(exp->bd, r->offset, r->len, bflags);
  case NBD_CMD_CACHE:
    return 0; /* advisory; the page cache does the rest */
  }
  return -EINVAL;
}

/* Run a valid request and reply. Returns -1 when the connection is unusable. */
static int
dispatch(CbtNbdConn *conn, const Request *r, const guint8 *payload)
{
  CbtBlockdev *bd = conn->exp->bd;
  int ret;

  cbt_blockdev_io_begin(bd);
  if (r->type == NBD_CMD_READ) {
    ret = do_read(conn, r);
  } else if (r->type == NBD_CMD_BLOCK_STATUS) {
    ret = do_block_status(conn, r);
  } else {
    int err = run_command(conn, r, payload);
    ret = err < 0 ? send_error(conn, r, cbt_nbd_errno_to_nbd(-err, r->flags), g_strerror(-err))
                  : send_simple(conn, r->cookie, 0, NULL, 0);
  }
  cbt_blockdev_io_end(bd);
  return ret;
}

/* One request; FALSE ends the connection (DISC, EOF, protocol violation, dead socket). */
static gboolean
serve_one(CbtNbdConn *conn)
{
  guint8 h[NBD_REQUEST_SIZE];
  const char *msg = NULL;

  if (cbt_nbd_read_full(conn, h, sizeof h) < 0)
    return FALSE;
  if (cbt_nbd_get32(h) != NBD_REQUEST_MAGIC)
    return FALSE; /* the stream cannot be resynchronised */
  Request r = { .flags = cbt_nbd_get16(h + 4),
                .type = cbt_nbd_get16(h + 6),
                .cookie = cbt_nbd_get64(h + 8),
                .offset = cbt_nbd_get64(h + 16),
                .len = cbt_nbd_get32(h + 24) };
  if (r.type == NBD_CMD_DISC)
    return FALSE;

  guint32 err = validate(conn, &r, &msg);
  g_autofree guint8 *payload = NULL;
  if (r.type == NBD_CMD_WRITE) {
    if (err) {
      /* Consume the payload unbuffered; beyond twice the maximum it is a DoS, not a client. */
      if (r.len > CBT_NBD_MAX_DISCARD_WRITE || cbt_nbd_discard(conn, r.len) < 0)
        return FALSE;
    } else {
      payload = g_try_malloc(r.len);
      if (!payload)
        return FALSE;
      if (cbt_nbd_read_full(conn, payload, r.len) < 0)
        return FALSE;
    }
  }
  if (err) {
    g_debug("NBD request type %u flags 0x%x offset %" G_GUINT64_FORMAT " len %u refused: %s",
            r.type, r.flags, r.offset, r.len, msg);
    return send_error(conn, &r, err, msg) == 0;
  }
  return dispatch(conn, &r, payload) == 0;
}

void
cbt_nbd_transmit(CbtNbdConn *conn)
{
  while (serve_one(conn))
    ;
}
