/* nbd/transport-tls.c — a gnutls session over the connection's socket (after NBD_OPT_STARTTLS).
 *
 * gnutls may hold decrypted bytes of a record the caller has not read yet: pending() reports
 * them so the reader does not poll() a socket that has nothing more to say. A reply's iovecs go
 * out corked, so one reply becomes as few full-size records as it fits in. No sendfile: the
 * bytes must pass through the cipher. The reader receives while a worker sends, which gnutls
 * allows on one session (one receiver, one sender at a time).
 */
#include "nbd/transport-tls.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rpc/rpc.h"

typedef struct {
  CbtNbdTransport base;
  int fd;
  gnutls_session_t session;
  gboolean nowait; /* the reader's current recv must not block (recv_nowait) */
} Tls;

static Tls *
tls_of(CbtNbdTransport *t)
{
  return (Tls *)t;
}

static ssize_t
pull(gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
  Tls *t = ptr;
  ssize_t r;

  do
    r = recv(t->fd, buf, len, t->nowait ? MSG_DONTWAIT : 0);
  while (r < 0 && errno == EINTR);
  if (r < 0)
    gnutls_transport_set_errno(t->session, errno);
  return r;
}

static int
pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
  Tls *t = ptr;
  struct pollfd pfd = { .fd = t->fd, .events = POLLIN };
  int r;

  do
    r = poll(&pfd, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
  while (r < 0 && errno == EINTR);
  return r;
}

static ssize_t
push(gnutls_transport_ptr_t ptr, const giovec_t *iov, int n)
{
  Tls *t = ptr;
  struct msghdr msg = { .msg_iov = (struct iovec *)iov, .msg_iovlen = n };
  ssize_t r;

  do
    r = sendmsg(t->fd, &msg, MSG_NOSIGNAL);
  while (r < 0 && errno == EINTR);
  return r;
}

static ssize_t
tls_recv_flags(CbtNbdTransport *tr, void *buf, gsize len, gboolean nowait)
{
  Tls *t = tls_of(tr);
  ssize_t r;

  t->nowait = nowait;
  do
    r = gnutls_record_recv(t->session, buf, len);
  while (r == GNUTLS_E_INTERRUPTED || (!nowait && r == GNUTLS_E_AGAIN));
  t->nowait = FALSE;
  if (r >= 0)
    return r;
  if (r == GNUTLS_E_AGAIN) {
    errno = EAGAIN;
    return -1;
  }
  if (r == GNUTLS_E_PREMATURE_TERMINATION)
    return 0; /* the peer closed without close_notify: EOF all the same */
  g_debug("TLS receive failed: %s", gnutls_strerror((int)r));
  errno = EIO;
  return -1;
}

static ssize_t
tls_recv(CbtNbdTransport *t, void *buf, gsize len)
{
  return tls_recv_flags(t, buf, len, FALSE);
}

static ssize_t
tls_recv_nowait(CbtNbdTransport *t, void *buf, gsize len)
{
  return tls_recv_flags(t, buf, len, TRUE);
}

static gsize
tls_pending(CbtNbdTransport *t)
{
  return gnutls_record_check_pending(tls_of(t)->session);
}

static int
tls_wait_readable(CbtNbdTransport *t, gint64 deadline)
{
  for (;;) {
    if (tls_pending(t))
      return 0;
    gint64 left = deadline - g_get_monotonic_time();
    if (left <= 0) {
      errno = ETIMEDOUT;
      return -1;
    }
    int r = pull_timeout(t, (unsigned)MIN((left + 999) / 1000, G_MAXINT));
    if (r > 0)
      return 0;
    if (r < 0)
      return -1;
  }
}

static int
tls_sendv(CbtNbdTransport *tr, struct iovec *iov, int n)
{
  Tls *t = tls_of(tr);

  gnutls_record_cork(t->session);
  for (int i = 0; i < n; i++) {
    /* Corked, a send only appends to the record buffer; loop all the same, as a short or
     * interrupted send must not drop the rest of the iovec. */
    for (gsize done = 0; done < iov[i].iov_len;) {
      ssize_t r =
        gnutls_record_send(t->session, (char *)iov[i].iov_base + done, iov[i].iov_len - done);
      if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
        continue;
      if (r < 0)
        goto fail;
      done += r;
    }
  }
  for (;;) {
    int r = gnutls_record_uncork(t->session, GNUTLS_RECORD_WAIT);
    if (r >= 0)
      return 0;
    if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED)
      goto fail;
  }
fail:
  errno = EIO;
  return -1;
}

static void
tls_shutdown(CbtNbdTransport *t)
{
  shutdown(tls_of(t)->fd, SHUT_RDWR);
}

static void
tls_free(CbtNbdTransport *tr)
{
  Tls *t = tls_of(tr);

  gnutls_deinit(t->session);
  close(t->fd);
  g_free(t);
}

static const CbtNbdTransportOps tls_ops = {
  .recv = tls_recv,
  .recv_nowait = tls_recv_nowait,
  .pending = tls_pending,
  .wait_readable = tls_wait_readable,
  .sendv = tls_sendv,
  .sendfile = NULL,
  .shutdown = tls_shutdown,
  .free = tls_free,
};

CbtNbdTransport *
cbt_nbd_transport_tls_new(int fd, gnutls_session_t session, gint64 deadline, GError **error)
{
  Tls *t = g_new0(Tls, 1);
  int r;

  t->base.ops = &tls_ops;
  t->fd = fd;
  t->session = session;
  gnutls_transport_set_ptr(session, t);
  gnutls_transport_set_pull_function(session, pull);
  gnutls_transport_set_pull_timeout_function(session, pull_timeout);
  gnutls_transport_set_vec_push_function(session, push);
  gint64 left_ms = (deadline - g_get_monotonic_time()) / 1000;
  gnutls_handshake_set_timeout(session, (unsigned)CLAMP(left_ms, 1, G_MAXINT));
  do
    r = gnutls_handshake(session);
  while (r < 0 && !gnutls_error_is_fatal(r) && g_get_monotonic_time() < deadline);
  if (r < 0) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "TLS handshake failed: %s",
                gnutls_strerror(r));
    tls_free(&t->base);
    return NULL;
  }
  return &t->base;
}
