/* nbd/transport-plain.c — the plain socket transport: bytes go straight to and from the
 * kernel, so nothing is ever pending inside it and file data can go out with sendfile(). */
#include "nbd/transport.h"

#include <errno.h>
#include <poll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct {
  CbtNbdTransport base;
  int fd;
} Plain;

static int
fd_of(CbtNbdTransport *t)
{
  return ((Plain *)t)->fd;
}

static ssize_t
plain_recv(CbtNbdTransport *t, void *buf, gsize len)
{
  ssize_t r;

  do
    r = recv(fd_of(t), buf, len, 0);
  while (r < 0 && errno == EINTR);
  return r;
}

static ssize_t
plain_recv_nowait(CbtNbdTransport *t, void *buf, gsize len)
{
  return recv(fd_of(t), buf, len, MSG_DONTWAIT);
}

static gsize
plain_pending(CbtNbdTransport *t)
{
  return 0;
}

static int
plain_wait_readable(CbtNbdTransport *t, gint64 deadline)
{
  for (;;) {
    gint64 left = deadline - g_get_monotonic_time();
    if (left <= 0) {
      errno = ETIMEDOUT;
      return -1;
    }
    struct pollfd pfd = { .fd = fd_of(t), .events = POLLIN };
    int r = poll(&pfd, 1, (int)MIN((left + 999) / 1000, G_MAXINT));
    if (r > 0)
      return 0;
    if (r < 0 && errno != EINTR)
      return -1;
  }
}

static int
plain_sendv(CbtNbdTransport *t, struct iovec *iov, int n)
{
  while (n > 0) {
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = n };
    ssize_t r = sendmsg(fd_of(t), &msg, MSG_NOSIGNAL);
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

/* Zeroes for the part of a zero-copy read past the end of a file that shrank under us. */
static int
send_zeroes(CbtNbdTransport *t, gsize len)
{
  static const guint8 zero[16384];

  while (len > 0) {
    struct iovec iov = { (void *)zero, MIN(len, sizeof zero) };
    len -= iov.iov_len;
    if (plain_sendv(t, &iov, 1) < 0)
      return -1;
  }
  return 0;
}

static int
plain_sendfile(CbtNbdTransport *t, int fd, guint64 offset, gsize len)
{
  off_t off = (off_t)offset;

  while (len > 0) {
    /* sendfile has no MSG_NOSIGNAL: the connection threads block SIGPIPE (server.c). */
    ssize_t r = sendfile(fd_of(t), fd, &off, MIN(len, (gsize)1 << 30));
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0)
      return send_zeroes(t, len);
    len -= (gsize)r;
  }
  return 0;
}

static void
plain_shutdown(CbtNbdTransport *t)
{
  shutdown(fd_of(t), SHUT_RDWR);
}

static void
plain_free(CbtNbdTransport *t)
{
  close(fd_of(t));
  g_free(t);
}

static const CbtNbdTransportOps plain_ops = {
  .recv = plain_recv,
  .recv_nowait = plain_recv_nowait,
  .pending = plain_pending,
  .wait_readable = plain_wait_readable,
  .sendv = plain_sendv,
  .sendfile = plain_sendfile,
  .shutdown = plain_shutdown,
  .free = plain_free,
};

CbtNbdTransport *
cbt_nbd_transport_plain_new(int fd)
{
  Plain *p = g_new0(Plain, 1);

  p->base.ops = &plain_ops;
  p->fd = fd;
  return &p->base;
}
