/* nbd/reply.c — encoding and sending transmission replies.
 *
 * Several workers answer one connection, so each reply goes out whole under conn->send_lock:
 * the chunks of one structured reply are never interleaved with another's. Header and payload
 * leave in one send; zero-copy data follows its header with the transport's sendfile. Once a
 * send fails the transport is shut down (the reader stops) and later replies on it are dropped.
 *
 * Corking: while the reader serves requests itself and more are already buffered, its small
 * replies are gathered (copied) into a batch and leave in one send: one syscall for many.
 * A larger reply is not copied: it leaves in the same send as the batch before it. Only whole
 * replies are batched, and any other send by the corking thread flushes the batch first, so
 * bytes of one reply stay in order and together.
 */
#include "nbd/nbd-internal.h"

static __thread CbtNbdCork *cork; /* the calling thread's batch, or NULL */

static void
sent(CbtNbdConn *conn, int r)
{
  if (r < 0 && !conn->send_failed) {
    conn->send_failed = TRUE;
    cbt_nbd_transport_shutdown(conn->transport);
  }
}

static void
flush_locked(CbtNbdConn *conn)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  if (!cork || cork->conn != conn || cork->len == 0)
    return;
  if (!conn->send_failed)
    sent(conn, cbt_nbd_write_full(conn, cork->buf, cork->len));
  cork->len = 0;
  cork->replies = 0;
}

void
cbt_nbd_cork_set(CbtNbdCork *c)
{
  cork = c;
}

void
cbt_nbd_cork_flush(CbtNbdCork *c)
{
  if (c->len == 0)
    return;
  CbtNbdCork *saved = cork;
  cork = c;
  cbt_mutex_lock(&c->conn->send_lock);
  flush_locked(c->conn);
  cbt_mutex_unlock(&c->conn->send_lock);
  cork = saved;
}

/* Batching copies a reply only when something can batch with it: a small one may be followed
 * by more; a mid-sized one is copied only behind replies already waiting. Any other reply leaves
 * directly, in one send with the batch before it. */
static void
sendv_locked(CbtNbdConn *conn, struct iovec *iov, int n)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  if (conn->send_failed)
    return;
  if (cork && cork->conn == conn) {
    gsize total = 0;
    for (int i = 0; i < n; i++)
      total += iov[i].iov_len;
    if (total <= CBT_NBD_CORK_SMALL || (cork->len > 0 && total <= CBT_NBD_CORK_COPY_MAX)) {
      if (total > CBT_NBD_CORK_SIZE - cork->len)
        flush_locked(conn);
      if (!cork->buf)
        cork->buf = g_malloc(CBT_NBD_CORK_SIZE); /* only connections that batch pay for it */
      for (int i = 0; i < n; i++) {
        memcpy(cork->buf + cork->len, iov[i].iov_base, iov[i].iov_len);
        cork->len += iov[i].iov_len;
      }
      cork->replies++;
      return;
    }
    if (cork->len > 0 && n < CBT_NBD_CORK_IOV) {
      struct iovec all[CBT_NBD_CORK_IOV] = { { cork->buf, cork->len } };
      memcpy(all + 1, iov, n * sizeof *iov);
      sent(conn, cbt_nbd_writev_full(conn, all, n + 1));
      cork->len = 0;
      cork->replies = 0;
      return;
    }
    flush_locked(conn);
  }
  sent(conn, cbt_nbd_writev_full(conn, iov, n));
}

static void
chunk_header(guint8 *h, gboolean done, guint16 type, guint64 cookie, guint32 len)
{
  cbt_nbd_put32(h, NBD_STRUCTURED_REPLY_MAGIC);
  cbt_nbd_put16(h + 4, done ? NBD_REPLY_FLAG_DONE : 0);
  cbt_nbd_put16(h + 6, type);
  cbt_nbd_put64(h + 8, cookie);
  cbt_nbd_put32(h + 16, len);
}

static void
simple_header(guint8 *h, guint64 cookie, guint32 err)
{
  cbt_nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
  cbt_nbd_put32(h + 4, err);
  cbt_nbd_put64(h + 8, cookie);
}

void
cbt_nbd_reply_simple(CbtNbdConn *conn, guint64 cookie, guint32 err, const void *data, gsize len)
{
  guint8 h[NBD_SIMPLE_REPLY_SIZE];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)data, len } };

  simple_header(h, cookie, err);
  cbt_mutex_lock(&conn->send_lock);
  sendv_locked(conn, iov, len ? 2 : 1);
  cbt_mutex_unlock(&conn->send_lock);
}

void
cbt_nbd_reply_error_locked(CbtNbdConn *conn, guint64 cookie, guint32 err, const char *msg)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  if (!conn->structured) {
    guint8 s[NBD_SIMPLE_REPLY_SIZE];
    struct iovec iov = { s, sizeof s };
    simple_header(s, cookie, err);
    sendv_locked(conn, &iov, 1);
    return;
  }
  gsize ml = msg ? strlen(msg) : 0;
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 6];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)msg, ml } };

  chunk_header(h, TRUE, NBD_REPLY_TYPE_ERROR, cookie, 6 + ml);
  cbt_nbd_put32(h + 20, err);
  cbt_nbd_put16(h + 24, ml);
  sendv_locked(conn, iov, ml ? 2 : 1);
}

void
cbt_nbd_reply_error(CbtNbdConn *conn, guint64 cookie, guint32 err, const char *msg)
{
  cbt_mutex_lock(&conn->send_lock);
  cbt_nbd_reply_error_locked(conn, cookie, err, msg);
  cbt_mutex_unlock(&conn->send_lock);
}

void
cbt_nbd_reply_data_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                          const void *data, gsize len)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 8];
  struct iovec iov[2] = { { h, sizeof h }, { (void *)data, len } };

  chunk_header(h, done, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
  cbt_nbd_put64(h + 20, offset);
  sendv_locked(conn, iov, 2);
}

static void
sendfile_locked(CbtNbdConn *conn, guint8 *h, gsize hlen, int fd, guint64 fd_offset, gsize len)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  flush_locked(conn);
  if (conn->send_failed)
    return;
  /* The header cannot ride in the same call; a failure after it cannot be reported in-band,
   * so the connection is dropped (docs/nbd-server.md, "Replies"). */
  int r = cbt_nbd_write_full(conn, h, hlen);
  if (r == 0)
    r = cbt_nbd_sendfile_full(conn, fd, fd_offset, len);
  sent(conn, r);
}

void
cbt_nbd_reply_data_fd_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                             int fd, guint64 fd_offset, gsize len)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 8];

  chunk_header(h, done, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
  cbt_nbd_put64(h + 20, offset);
  sendfile_locked(conn, h, sizeof h, fd, fd_offset, len);
}

void
cbt_nbd_reply_simple_fd_locked(CbtNbdConn *conn, guint64 cookie, int fd, guint64 fd_offset,
                               gsize len)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  guint8 h[NBD_SIMPLE_REPLY_SIZE];

  simple_header(h, cookie, 0);
  sendfile_locked(conn, h, sizeof h, fd, fd_offset, len);
}

void
cbt_nbd_reply_hole_locked(CbtNbdConn *conn, guint64 cookie, gboolean done, guint64 offset,
                          guint32 len)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 12];
  struct iovec iov = { h, sizeof h };

  chunk_header(h, done, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  cbt_nbd_put64(h + 20, offset);
  cbt_nbd_put32(h + 28, len);
  sendv_locked(conn, &iov, 1);
}

/* The descriptors are turned into wire order where they lie and leave with their header in
 * one send: no copy and no allocation. @ext is consumed (its contents are big-endian after). */
void
cbt_nbd_reply_status_locked(CbtNbdConn *conn, guint64 cookie, guint32 id, GArray *ext,
                            gboolean done)
{
  CBT_ASSERT_HELD(&conn->send_lock);
  guint8 h[NBD_STRUCTURED_REPLY_SIZE + 4];
  G_STATIC_ASSERT(sizeof(CbtNbdExtent) == 8);
  struct iovec iov[2] = { { h, sizeof h }, { ext->data, 8 * ext->len } };

  chunk_header(h, done, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * ext->len);
  cbt_nbd_put32(h + 20, id);
  for (guint i = 0; i < ext->len; i++) {
    CbtNbdExtent *e = &g_array_index(ext, CbtNbdExtent, i);
    cbt_nbd_put32((guint8 *)&e->len, e->len);
    cbt_nbd_put32((guint8 *)&e->flags, e->flags);
  }
  sendv_locked(conn, iov, 2);
}
