/* nbd/transport.h — how a connection's bytes move: the seam between the NBD code and the socket.
 *
 * Everything above it (handshake, reader, replies) speaks through a CbtNbdTransport, so a second
 * transport (TLS) can slide in under a connection. The plain socket (transport-plain.c) is the
 * first. A transport may hold received bytes of its own (a TLS record decrypted only in part),
 * which poll() on the socket cannot see: whoever waits for input asks pending() first. A
 * transport that cannot send file data without a copy leaves sendfile NULL; callers then copy
 * through a buffer.
 *
 * Threads: the connection's reader receives; its reader and workers send, one at a time under
 * the connection's send_lock; shutdown may come from any thread at any time (a hard export
 * delete, server stop); free only after every other user is done.
 */
#pragma once

#include <glib.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct CbtNbdTransport CbtNbdTransport;

typedef struct {
  /* Wait for input: bytes received (up to @len), 0 at EOF (or after shutdown), -1 with errno.
   * Never fails with EINTR. */
  ssize_t (*recv)(CbtNbdTransport *t, void *buf, gsize len);
  /* The same without waiting: -1 with EAGAIN when nothing is there yet. */
  ssize_t (*recv_nowait)(CbtNbdTransport *t, void *buf, gsize len);
  /* Bytes received and held inside the transport, ready for recv at once (0 for plain). */
  gsize (*pending)(CbtNbdTransport *t);
  /* Until input is ready or g_get_monotonic_time() reaches @deadline: 0, or -1 with errno
   * (ETIMEDOUT at the deadline). Returns 0 at once while pending() is not 0. */
  int (*wait_readable)(CbtNbdTransport *t, gint64 deadline);
  /* Send all of @iov (which may be modified): 0, or -1 with errno. */
  int (*sendv)(CbtNbdTransport *t, struct iovec *iov, int n);
  /* Send @len bytes of @fd from @offset without copying them through user space; bytes past
   * the end of a file that shrank go out as zeroes. 0, or -1 with errno. NULL: cannot. */
  int (*sendfile)(CbtNbdTransport *t, int fd, guint64 offset, gsize len);
  /* Any thread: blocked and later recv/send calls fail or see EOF. Idempotent. */
  void (*shutdown)(CbtNbdTransport *t);
  /* Release everything, the socket included. */
  void (*free)(CbtNbdTransport *t);
} CbtNbdTransportOps;

struct CbtNbdTransport {
  const CbtNbdTransportOps *ops;
};

/* The plain socket @fd (connected, blocking), which the transport owns from now on. */
CbtNbdTransport *cbt_nbd_transport_plain_new(int fd);

/* Tests: build the transport of every connection accepted from now on (NULL: plain). */
typedef CbtNbdTransport *(*CbtNbdTransportNew)(int fd);
void cbt_nbd_set_transport_new(CbtNbdTransportNew fn);

static inline gboolean
cbt_nbd_transport_can_sendfile(const CbtNbdTransport *t)
{
  return t->ops->sendfile != NULL;
}

static inline void
cbt_nbd_transport_shutdown(CbtNbdTransport *t)
{
  t->ops->shutdown(t);
}

static inline void
cbt_nbd_transport_free(CbtNbdTransport *t)
{
  t->ops->free(t);
}
