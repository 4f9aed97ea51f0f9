/* nbd/transport-tls.c — a gnutls session over the connection's socket (after NBD_OPT_STARTTLS).
 *
 * The transport reads ahead: one recv() takes as many records as have arrived (gnutls alone
 * asks for each record's header and then its body: two system calls per pipelined request).
 * Bytes may so wait in three places: raw in `ahead`, decrypted in gnutls, or decrypted in
 * `stash`. pending() counts the decrypted ones; wait_readable() first turns raw bytes into
 * decrypted ones without blocking, and polls the socket only when what is held is not a whole
 * record (gnutls then keeps the part), so it neither sleeps on data it holds nor spins on a
 * record still arriving. A reply's iovecs go
 * out corked, so one reply becomes as few full-size records as it fits in. No sendfile: the
 * bytes must pass through the cipher. The reader receives while a worker sends, which gnutls
 * allows on one session (one receiver, one sender at a time).
 */
#include "nbd/transport-tls.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rpc/rpc.h"

#define READ_AHEAD (16u << 10)
#define TLS_MAX_PLAINTEXT 16384u /* one record's plaintext at most (RFC 8446, 5.1) */

/* Everything below `session` belongs to the receiving thread (one at a time: the handshake's,
 * then the reader). */
typedef struct {
  CbtNbdTransport base;
  int fd;
  gnutls_session_t session;
  gboolean nowait; /* the reader's current recv must not block (recv_nowait) */
  gsize ahead_pos, ahead_len, stash_pos, stash_len;
  gboolean eof;
  guint8 ahead[READ_AHEAD];        /* received, not yet given to gnutls */
  guint8 stash[TLS_MAX_PLAINTEXT]; /* decrypted by wait_readable(), not yet read */
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

  if (t->ahead_pos == t->ahead_len) {
    do
      r = recv(t->fd, t->ahead, sizeof t->ahead, t->nowait ? MSG_DONTWAIT : 0);
    while (r < 0 && errno == EINTR);
    if (r <= 0) {
      if (r < 0)
        gnutls_transport_set_errno(t->session, errno);
      return r;
    }
    t->ahead_pos = 0;
    t->ahead_len = (gsize)r;
  }
  gsize n = MIN(len, t->ahead_len - t->ahead_pos);
  memcpy(buf, t->ahead + t->ahead_pos, n);
  t->ahead_pos += n;
  return (ssize_t)n;
}

static int
pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
  Tls *t = ptr;
  struct pollfd pfd = { .fd = t->fd, .events = POLLIN };
  int r;

  if (t->ahead_pos < t->ahead_len)
    return 1; /* gnutls asks before it pulls: what is read ahead is there */
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

  if (t->stash_pos < t->stash_len) {
    gsize n = MIN(len, t->stash_len - t->stash_pos);
    memcpy(buf, t->stash + t->stash_pos, n);
    t->stash_pos += n;
    return (ssize_t)n;
  }
  if (t->eof)
    return 0;
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
tls_pending(CbtNbdTransport *tr)
{
  Tls *t = tls_of(tr);
  return (t->stash_len - t->stash_pos) + gnutls_record_check_pending(t->session);
}

/* Raw bytes read ahead become decrypted ones in `stash`, without blocking: TRUE when there is
 * something (or EOF, or an error) for the next recv to report, FALSE when the bytes held do
 * not finish a record (gnutls keeps them; only the socket can bring the rest). */
static gboolean
decrypt_ahead(Tls *t)
{
  if (t->ahead_pos == t->ahead_len)
    return FALSE;
  ssize_t r = tls_recv_flags(&t->base, t->stash, sizeof t->stash, TRUE);
  if (r > 0) {
    t->stash_pos = 0;
    t->stash_len = (gsize)r;
    return TRUE;
  }
  if (r == 0)
    t->eof = TRUE;
  return r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
}

static int
tls_wait_readable(CbtNbdTransport *tr, gint64 deadline)
{
  Tls *t = tls_of(tr);

  for (;;) {
    if (tls_pending(tr) || t->eof || decrypt_ahead(t))
      return 0;
    gint64 left = deadline - g_get_monotonic_time();
    if (left <= 0) {
      errno = ETIMEDOUT;
      return -1;
    }
    struct pollfd pfd = { .fd = t->fd, .events = POLLIN };
    int r = poll(&pfd, 1, (int)MIN((left + 999) / 1000, G_MAXINT));
    if (r > 0)
      return 0;
    if (r < 0 && errno != EINTR)
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
