/* nbd/execute.c — running one validated request against the export, and its reply.
 *
 * Called by a worker, or by the reader for requests it serves itself; always between
 * cbt_blockdev_io_begin() and _end() so a drain of the node waits for it. READ data comes from
 * the request's pooled buffer, or, for long reads the reader chose to send zero-copy (transmit.c
 * read_path()), straight from the node's file to the transport (sendfile) after the chunk
 * header: no copy through user space.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>

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

static void
reply_errno(CbtNbdReq *r, int err)
{
  r->failed = TRUE;
  cbt_nbd_reply_error(r->conn, r->cookie, cbt_nbd_errno_to_nbd(err, r->flags), g_strerror(err));
}

/* --- READ ---------------------------------------------------------------------------------- */

typedef struct {
  guint32 start; /* relative to the request offset */
  guint32 len;
  gboolean hole;
} Run;

/* Split the request into data and hole runs from base:allocation; ZERO runs shorter than
 * @min_hole count as data. Failure to learn the status only costs efficiency: the rest is
 * data. */
static GArray *
read_runs(CbtNbdReq *r, guint32 min_hole)
{
  GArray *runs = g_array_new(FALSE, FALSE, sizeof(Run));
  guint32 pos = 0;

  while (pos < r->len) {
    guint64 pnum = 0;
    guint32 status = 0;
    gboolean hole = FALSE;
    if (runs->len < MAX_READ_RUNS &&
        cbt_blockdev_block_status(r->conn->exp->bd, r->offset + pos, r->len - pos, &pnum,
                                  &status) == 0 &&
        pnum > 0 && pnum <= r->len - pos)
      hole = (status & CBT_BLOCKDEV_STATUS_ZERO) && pnum >= min_hole;
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

/* A hole of MIN_HOLE_CHUNK bytes reads as zeroes, so data without such a run of zero bytes has
 * none: most reads skip the allocation lookup. Checks for MIN_HOLE_CHUNK - 8 zero bytes in
 * aligned words, which every such run contains. */
static gboolean
may_hold_hole(const guint8 *buf, gsize len)
{
  const guint8 *p = (const guint8 *)(((guintptr)buf + 7) & ~(guintptr)7);
  const guint8 *end = buf + len;
  gsize zero_words = 0, need = MIN_HOLE_CHUNK / 8 - 1;

  if (len < MIN_HOLE_CHUNK)
    return FALSE;
  for (; p + 8 <= end; p += 8) {
    guint64 w;
    memcpy(&w, p, 8);
    zero_words = w ? 0 : zero_words + 1;
    if (zero_words >= need)
      return TRUE;
  }
  return FALSE;
}

/* The chunks of a structured READ whose data runs are in req->buf. */
static void
send_runs_locked(CbtNbdReq *r, GArray *runs)
{
  CBT_ASSERT_HELD(&r->conn->send_lock);
  for (guint i = 0; i < runs->len; i++) {
    Run *run = &g_array_index(runs, Run, i);
    gboolean done = i + 1 == runs->len;
    guint64 off = r->offset + run->start;
    if (run->hole)
      cbt_nbd_reply_hole_locked(r->conn, r->cookie, done, off, run->len);
    else
      cbt_nbd_reply_data_locked(r->conn, r->cookie, done, off, r->buf + run->start, run->len);
  }
}

void
cbt_nbd_execute_read_prefilled(CbtNbdReq *r)
{
  CbtNbdConn *conn = r->conn;
  g_autoptr(GArray) runs = NULL;

  if (!conn->structured) {
    cbt_nbd_reply_simple(conn, r->cookie, 0, r->buf, r->len);
    return;
  }
  if (!(r->flags & NBD_CMD_FLAG_DF) && may_hold_hole(r->buf, r->len))
    runs = read_runs(r, MIN_HOLE_CHUNK);
  cbt_mutex_lock(&conn->send_lock);
  if (runs)
    send_runs_locked(r, runs);
  else
    cbt_nbd_reply_data_locked(conn, r->cookie, TRUE, r->offset, r->buf, r->len);
  cbt_mutex_unlock(&conn->send_lock);
}

/* Structured READs whose range is not known to be cached are served as qsd serves every one:
 * block status first, then one pread per data run, and every zero run, however short, goes out
 * as a hole chunk unread. Reading zeroes would cache them, and SEEK_DATA counts cached pages of
 * an unwritten extent (zeroed with FALLOC_FL_ZERO_RANGE) as data: the next map would call the
 * range data because a client looked at it. */
static void
read_sparse(CbtNbdReq *r)
{
  g_autoptr(GArray) runs = read_runs(r, 1);

  for (guint i = 0; i < runs->len; i++) {
    Run *run = &g_array_index(runs, Run, i);
    int err = run->hole ? 0
                        : cbt_blockdev_pread(r->conn->exp->bd, r->buf + run->start,
                                             r->offset + run->start, run->len);
    if (err < 0) {
      reply_errno(r, -err);
      return;
    }
  }
  cbt_mutex_lock(&r->conn->send_lock);
  send_runs_locked(r, runs);
  cbt_mutex_unlock(&r->conn->send_lock);
}

/* Long reads of a file-backed node: headers from here, data from the page cache. */
void
cbt_nbd_execute_read_zero_copy(CbtNbdReq *r, int fd, guint64 fd_offset)
{
  CbtNbdConn *conn = r->conn;
  g_autoptr(GArray) runs = NULL;

  if (conn->structured && !(r->flags & NBD_CMD_FLAG_DF))
    runs = read_runs(r, MIN_HOLE_CHUNK);
  cbt_mutex_lock(&conn->send_lock);
  if (!conn->structured) {
    cbt_nbd_reply_simple_fd_locked(conn, r->cookie, fd, fd_offset + r->offset, r->len);
  } else if (!runs) {
    cbt_nbd_reply_data_fd_locked(conn, r->cookie, TRUE, r->offset, fd, fd_offset + r->offset,
                                 r->len);
  } else {
    for (guint i = 0; i < runs->len; i++) {
      Run *run = &g_array_index(runs, Run, i);
      gboolean done = i + 1 == runs->len;
      guint64 off = r->offset + run->start;
      if (run->hole)
        cbt_nbd_reply_hole_locked(conn, r->cookie, done, off, run->len);
      else
        cbt_nbd_reply_data_fd_locked(conn, r->cookie, done, off, fd, fd_offset + off, run->len);
    }
  }
  cbt_mutex_unlock(&conn->send_lock);
}

static void
do_read(CbtNbdReq *r)
{
  CbtBlockdev *bd = r->conn->exp->bd;
  guint64 fd_offset;
  int fd = cbt_blockdev_get_data_fd(bd, &fd_offset);

  if (r->zero_copy && fd >= 0) {
    cbt_nbd_execute_read_zero_copy(r, fd, fd_offset);
    return;
  }
  if (!r->buf || r->cap < r->len) {
    reply_errno(r, ENOMEM);
    return;
  }
  if (fd >= 0 && r->conn->structured && !(r->flags & NBD_CMD_FLAG_DF)) {
    read_sparse(r);
    return;
  }
  /* Simple replies and DF reads carry every byte as data, so they read it all, as qsd's do. */
  int err = cbt_blockdev_pread(bd, r->buf, r->offset, r->len);
  if (err < 0)
    reply_errno(r, -err);
  else
    cbt_nbd_execute_read_prefilled(r);
}

/* --- BLOCK_STATUS -------------------------------------------------------------------------- */

/* Each thread keeps its extent arrays across requests, so a status answer allocates nothing;
 * an array that grew past CBT_NBD_STATUS_KEEP descriptors is let go after use. */
#define CBT_NBD_STATUS_KEEP 65536u

static void
free_scratch(gpointer p)
{
  g_ptr_array_unref(p);
}

static GPrivate status_scratch = G_PRIVATE_INIT(free_scratch);

static GArray *
scratch_array(guint i)
{
  GPtrArray *all = g_private_get(&status_scratch);

  if (!all) {
    all = g_ptr_array_new_with_free_func((GDestroyNotify)g_array_unref);
    g_private_set(&status_scratch, all);
  }
  while (all->len <= i)
    g_ptr_array_add(all, g_array_sized_new(FALSE, FALSE, sizeof(CbtNbdExtent), 1024));
  GArray *ext = g_ptr_array_index(all, i);
  g_array_set_size(ext, 0);
  return ext;
}

static void
scratch_trim(guint n)
{
  GPtrArray *all = g_private_get(&status_scratch);

  for (guint i = 0; i < n; i++) {
    GArray *ext = g_ptr_array_index(all, i);
    if (ext->len > CBT_NBD_STATUS_KEEP) {
      g_array_unref(ext);
      g_ptr_array_index(all, i) = g_array_sized_new(FALSE, FALSE, sizeof(CbtNbdExtent), 1024);
    }
  }
}

static void
do_block_status(CbtNbdReq *r)
{
  CbtNbdConn *conn = r->conn;
  gboolean one = (r->flags & NBD_CMD_FLAG_REQ_ONE) != 0;
  GArray *meta = conn->meta;

  /* Every context first, so the chunks leave together under one hold of the send lock. */
  for (guint i = 0; i < meta->len; i++) {
    CbtNbdMetaSel *sel = &g_array_index(meta, CbtNbdMetaSel, i);
    GArray *ext = scratch_array(i);
    int err = cbt_nbd_status_extents(conn->exp, sel, r->offset, r->len, one, ext);
    if (err < 0 || ext->len == 0) {
      /* Status 0 ("data", "clean") is always a safe answer (docs/nbd-server.md, "Block status"). */
      CbtNbdExtent e = { (guint32)MIN(r->len, CBT_NBD_MAX_STATUS_LEN - (r->offset & 4095)), 0 };
      g_array_set_size(ext, 0);
      g_array_append_val(ext, e);
    }
  }
  GPtrArray *all = g_private_get(&status_scratch);
  cbt_mutex_lock(&conn->send_lock);
  for (guint i = 0; i < meta->len; i++)
    cbt_nbd_reply_status_locked(conn, r->cookie, g_array_index(meta, CbtNbdMetaSel, i).id,
                                g_ptr_array_index(all, i), i + 1 == meta->len);
  cbt_mutex_unlock(&conn->send_lock);
  scratch_trim(meta->len);
}

/* --- the other commands -------------------------------------------------------------------- */

static int
run_command(CbtNbdReq *r)
{
  CbtNbdExport *exp = r->conn->exp;
  guint bflags = (r->flags & NBD_CMD_FLAG_FUA) ? CBT_BLOCKDEV_FUA : 0;

  switch (r->type) {
  case NBD_CMD_WRITE:
    if (exp->writethrough)
      bflags |= CBT_BLOCKDEV_FUA;
    return cbt_blockdev_pwrite(exp->bd, r->buf, r->offset, r->len, bflags);
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

void
cbt_nbd_execute(CbtNbdPool *pool, CbtNbdReq *r)
{
  CbtBlockdev *bd = r->conn->exp->bd;

  /* Before io_begin: a write waiting for a drain to end must not be waited for by a request
   * the drain itself waits for. */
  if (r->type == NBD_CMD_FLUSH)
    cbt_nbd_pool_wait_writes(pool, r);
  cbt_blockdev_io_begin(bd);
  if (r->type == NBD_CMD_READ) {
    do_read(r);
  } else if (r->type == NBD_CMD_BLOCK_STATUS) {
    do_block_status(r);
  } else {
    int err = run_command(r);
    if (err < 0)
      reply_errno(r, -err);
    else
      cbt_nbd_reply_simple(r->conn, r->cookie, 0, NULL, 0);
  }
  cbt_blockdev_io_end(bd);
}

/* --- statistics ---------------------------------------------------------------------------- */

gboolean
cbt_nbd_acct_kind(guint16 type, CbtBlockdevAcct *kind)
{
  switch (type) {
  case NBD_CMD_READ:
    *kind = CBT_BLOCKDEV_ACCT_READ;
    return TRUE;
  case NBD_CMD_WRITE:
  case NBD_CMD_WRITE_ZEROES:
    *kind = CBT_BLOCKDEV_ACCT_WRITE;
    return TRUE;
  case NBD_CMD_TRIM:
    *kind = CBT_BLOCKDEV_ACCT_UNMAP;
    return TRUE;
  case NBD_CMD_FLUSH:
    *kind = CBT_BLOCKDEV_ACCT_FLUSH;
    return TRUE;
  default:
    return FALSE;
  }
}

void
cbt_nbd_account_done(CbtNbdReq *r)
{
  CbtNbdExport *exp = r->conn->exp;
  CbtBlockdevAcct kind;

  if (!r->t0 || !cbt_nbd_acct_kind(r->type, &kind))
    return;
  gint64 now = cbt_blockdev_now_ns();
  guint64 bytes = kind == CBT_BLOCKDEV_ACCT_FLUSH ? 0 : r->len;
  cbt_blockdev_stats_done(cbt_blockdev_get_stats(exp->bd), kind, bytes, r->t0, now, r->failed);
  cbt_blockdev_stats_done(cbt_blockdev_export_stats_get(exp->stats), kind, bytes, r->t0, now,
                          r->failed);
}

void
cbt_nbd_account_invalid(CbtNbdConn *conn, guint16 type)
{
  CbtBlockdevAcct kind;

  if (!cbt_nbd_acct_kind(type, &kind))
    return;
  cbt_blockdev_stats_invalid(cbt_blockdev_get_stats(conn->exp->bd), kind);
  cbt_blockdev_stats_invalid(cbt_blockdev_export_stats_get(conn->exp->stats), kind);
}
