/* nbd/wire.c — blocking socket I/O for one connection, with the handshake deadline. */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <poll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>

/* Wait until @fd is readable or the handshake deadline passes. */
static int
wait_readable(CbtNbdConn *conn)
{
  if (!conn->deadline)
    return 0;
  for (;;) {
    gint64 left = conn->deadline - g_get_monotonic_time();
    if (left <= 0) {
      errno = ETIMEDOUT;
      return -1;
    }
    struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };
    int r = poll(&pfd, 1, (int)MIN((left + 999) / 1000, G_MAXINT));
    if (r > 0)
      return 0;
    if (r < 0 && errno != EINTR)
      return -1;
  }
}

int
cbt_nbd_read_full(CbtNbdConn *conn, void *buf, gsize len)
{
  guint8 *p = buf;
  gsize done = 0;

  while (done < len) {
    if (wait_readable(conn) < 0)
      return -1;
    ssize_t r = recv(conn->fd, p + done, len - done, 0);
    if (r == 0) {
      errno = done ? EPIPE : 0; /* EOF between messages is a quiet goodbye */
      return -1;
    }
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
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
  while (n > 0) {
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = n };
    ssize_t r = sendmsg(conn->fd, &msg, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    while (n > 0 && (gsize)r >= iov->iov_len) {
      r -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (guint8 *)iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  return 0;
}

int
cbt_nbd_write_full(CbtNbdConn *conn, const void *buf, gsize len)
{
  struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
  return cbt_nbd_writev_full(conn, &iov, 1);
}

/* Zeroes for the part of a zero-copy read past the end of a file that shrank under us. */
static int
write_zeroes(CbtNbdConn *conn, gsize len)
{
  static const guint8 zero[16384];

  while (len > 0) {
    gsize n = MIN(len, sizeof zero);
    if (cbt_nbd_write_full(conn, zero, n) < 0)
      return -1;
    len -= n;
  }
  return 0;
}

int
cbt_nbd_sendfile_full(CbtNbdConn *conn, int fd, guint64 offset, gsize len)
{
  off_t off = (off_t)offset;

  while (len > 0) {
    /* The daemon ignores SIGPIPE; sendfile has no MSG_NOSIGNAL. */
    ssize_t r = sendfile(conn->fd, fd, &off, MIN(len, (gsize)1 << 30));
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0)
      return write_zeroes(conn, len);
    len -= (gsize)r;
  }
  return 0;
}
