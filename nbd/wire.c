/* nbd/wire.c — whole messages over a connection's transport, with the handshake deadline. */
#include "nbd/nbd-internal.h"

#include <errno.h>

int
cbt_nbd_read_full(CbtNbdConn *conn, void *buf, gsize len)
{
  CbtNbdTransport *t = conn->transport;
  guint8 *p = buf;
  gsize done = 0;

  while (done < len) {
    if (conn->deadline && t->ops->wait_readable(t, conn->deadline) < 0)
      return -1;
    ssize_t r = t->ops->recv(t, p + done, len - done);
    if (r == 0) {
      errno = done ? EPIPE : 0; /* EOF between messages is a quiet goodbye */
      return -1;
    }
    if (r < 0)
      return -1;
    done += r;
  }
  return 0;
}

int
cbt_nbd_discard(CbtNbdConn *conn, guint64 len)
{
  guint8 buf[16384];

  while (len > 0) {
    gsize n = MIN(len, sizeof buf);
    if (cbt_nbd_read_full(conn, buf, n) < 0) {
      if (errno == 0)
        errno = EPIPE;
      return -1;
    }
    len -= n;
  }
  return 0;
}

int
cbt_nbd_writev_full(CbtNbdConn *conn, struct iovec *iov, int n)
{
  return conn->transport->ops->sendv(conn->transport, iov, n);
}

int
cbt_nbd_write_full(CbtNbdConn *conn, const void *buf, gsize len)
{
  struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
  return cbt_nbd_writev_full(conn, &iov, 1);
}

int
cbt_nbd_sendfile_full(CbtNbdConn *conn, int fd, guint64 offset, gsize len)
{
  CbtNbdTransport *t = conn->transport;

  if (!cbt_nbd_transport_can_sendfile(t)) {
    errno = ENOTSUP; /* callers ask first (cbt_nbd_read_needs_buffer) */
    return -1;
  }
  return t->ops->sendfile(t, fd, offset, len);
}
