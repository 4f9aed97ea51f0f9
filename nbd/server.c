/* nbd/server.c — the listener and the connection threads.
 *
 * The main thread accepts (a GSource on the non-blocking listening socket) and gives each client
 * a thread: a spare one parked after its last client, else a new one. A thread owns its
 * CbtNbdConn: handshake, transmission (where it is the reader and starts the connection's
 * workers, joined before it returns: transmit.c, pool.c), then cleanup; then it waits up to
 * CBT_NBD_SPARE_WAIT_US for the next client (at most CBT_NBD_SPARE_THREADS wait), so a backup
 * tool that connects once per step does not pay a thread's creation and exit each time.
 * Other threads only shut its transport down (under cbt_nbd_lock) to make it leave. With
 * max-connections set, the listener stops accepting at the limit, so further clients wait in the
 * backlog (as qsd).
 */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common/memory.h"

/* pthread's rather than GMutex/GCond (futex-based in glib, opaque to ThreadSanitizer): a
 * connection handed to a parked thread is ordered through this lock alone. */
CbtMutex cbt_nbd_lock = CBT_MUTEX_INIT;

static struct {
  gboolean running;
  int listen_fd;
  gboolean is_inet;
  guint32 max_conn;
  guint source_id;     /* main thread only */
  GPtrArray *conns;    /* every live connection; under cbt_nbd_lock */
  guint n_threads;     /* under cbt_nbd_lock */
  guint n_current;     /* connections of the running server; under cbt_nbd_lock */
  pthread_cond_t idle; /* a thread ended */
  guint handshake_ms;
  gint64 poll_max_ns;               /* adaptive polling's cap (transmit.c); 0 turns it off */
  GQueue spare_conns;               /* accepted, for a parked thread to take; under cbt_nbd_lock */
  guint n_parked;                   /* threads waiting for spare_conns; under cbt_nbd_lock */
  pthread_cond_t spare;             /* a connection was queued, or the server stopped */
  CbtNbdTransportNew transport_new; /* NULL: plain (tests set another) */
} srv = { .listen_fd = -1, .handshake_ms = 10000, .poll_max_ns = CBT_NBD_POLL_MAX_NS };

/* The conditions wait on CLOCK_MONOTONIC deadlines, as g_get_monotonic_time() gives them. */
static void
init_conds_once(void)
{
  pthread_condattr_t a;

  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(&srv.idle, &a);
  pthread_cond_init(&srv.spare, &a);
  pthread_condattr_destroy(&a);
}

static void
init_conds(void)
{
  static pthread_once_t once = PTHREAD_ONCE_INIT;

  pthread_once(&once, init_conds_once);
}

/* Wait on @cond until signalled or g_get_monotonic_time() reaches @end; FALSE on timeout. */
static gboolean
cond_wait_until(pthread_cond_t *cond, gint64 end)
{
  struct timespec ts = { .tv_sec = end / G_USEC_PER_SEC, .tv_nsec = end % G_USEC_PER_SEC * 1000 };
  return cbt_mutex_cond_timedwait(&cbt_nbd_lock, cond, &ts) != ETIMEDOUT;
}

#define CBT_NBD_SPARE_THREADS 4u
#define CBT_NBD_SPARE_WAIT_US (10 * G_USEC_PER_SEC)
static gint64 spare_wait_us = CBT_NBD_SPARE_WAIT_US;

static gboolean on_accept(gint fd, GIOCondition cond, gpointer data);

gboolean
cbt_nbd_server_running(void)
{
  return srv.running;
}

guint32
cbt_nbd_server_max_connections(void)
{
  return srv.max_conn;
}

void
cbt_nbd_set_spare_wait(gint64 us)
{
  spare_wait_us = us;
}

void
cbt_nbd_set_handshake_timeout(guint ms)
{
  srv.handshake_ms = ms;
}

gint64
cbt_nbd_poll_max_ns(void)
{
  return srv.poll_max_ns;
}

gint64
cbt_nbd_handshake_timeout_us(void)
{
  return (gint64)srv.handshake_ms * 1000;
}

void
cbt_nbd_set_transport_new(CbtNbdTransportNew fn)
{
  srv.transport_new = fn;
}

void
cbt_nbd_conn_kick_locked(CbtNbdConn *conn)
{
  CBT_ASSERT_HELD(&cbt_nbd_lock);
  conn->closing = TRUE;
  cbt_nbd_transport_shutdown(conn->transport);
}

/* A socket option rather than a transport's business: a TLS session runs over the same
 * socket and its sends block in the same place. */
void
cbt_nbd_conn_set_send_timeout(CbtNbdConn *conn, guint ms)
{
  struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = ms % 1000 * 1000 };

  setsockopt(conn->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void
conn_free(CbtNbdConn *conn)
{
  if (conn->exp) {
    cbt_nbd_export_detach(conn->exp, conn);
    cbt_nbd_export_unref(conn->exp);
  }
  if (conn->meta_exp)
    cbt_nbd_export_unref(conn->meta_exp);
  if (conn->meta)
    g_array_unref(conn->meta);
  cbt_nbd_transport_free(conn->transport);
  cbt_mutex_clear(&conn->send_lock);
  g_free(conn);
}

static gboolean
rearm_idle(gpointer data)
{
  cbt_mutex_lock(&cbt_nbd_lock);
  gboolean below = srv.max_conn == 0 || srv.n_current < srv.max_conn;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (srv.running && !srv.source_id && below)
    srv.source_id = g_unix_fd_add(srv.listen_fd, G_IO_IN, on_accept, NULL);
  return G_SOURCE_REMOVE;
}

static void
serve(CbtNbdConn *conn)
{
  gboolean current;

  if (cbt_nbd_handshake(conn))
    cbt_nbd_transmit(conn);

  cbt_mutex_lock(&cbt_nbd_lock);
  current = g_ptr_array_remove(srv.conns, conn) && !conn->closing;
  cbt_mutex_unlock(&cbt_nbd_lock);
  conn_free(conn);
  /* What a connection allocates besides its request buffers (handshake payloads, replies)
   * stays in its thread's arena: count it, so that a stream of clients leads to a trim. */
  cbt_memory_released(CBT_NBD_CONN_OVERHEAD);

  cbt_mutex_lock(&cbt_nbd_lock);
  if (current && srv.n_current > 0)
    srv.n_current--;
  gboolean rearm = current && srv.max_conn;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (rearm)
    g_idle_add(rearm_idle, NULL);
}

/* Park the calling thread until a connection is handed to it; NULL when none came in time, the
 * server stopped or enough threads wait already. Under cbt_nbd_lock. */
static CbtNbdConn *
park_locked(void)
{
  CBT_ASSERT_HELD(&cbt_nbd_lock);
  gint64 end = g_get_monotonic_time() + spare_wait_us;

  if (!srv.running || srv.n_parked >= CBT_NBD_SPARE_THREADS)
    return NULL;
  srv.n_parked++;
  while (srv.running && g_queue_is_empty(&srv.spare_conns))
    if (!cond_wait_until(&srv.spare, end))
      break;
  CbtNbdConn *conn = g_queue_pop_head(&srv.spare_conns);
  srv.n_parked--;
  return conn;
}

static gpointer
conn_thread(gpointer data)
{
  CbtNbdConn *conn = data;
  sigset_t pipe;

  cbt_memory_thread_begin();

  /* sendfile() cannot say MSG_NOSIGNAL: a client gone mid-reply must not kill the process
   * (the workers inherit this mask). */
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, NULL);
  while (conn) {
    serve(conn);
    cbt_mutex_lock(&cbt_nbd_lock);
    conn = park_locked();
    if (!conn) {
      srv.n_threads--;
      pthread_cond_broadcast(&srv.idle);
    }
    cbt_mutex_unlock(&cbt_nbd_lock);
  }
  return NULL;
}

static void
start_conn(int fd)
{
  CbtNbdConn *conn = g_new0(CbtNbdConn, 1);
  g_autoptr(GError) error = NULL;
  int one = 1;

  conn->fd = fd;
  conn->transport = srv.transport_new ? srv.transport_new(fd) : cbt_nbd_transport_plain_new(fd);
  cbt_mutex_init(&conn->send_lock);
  conn->is_inet = srv.is_inet;
  if (conn->is_inet)
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  /* A unix socket's default send buffer (~208 KiB) holds a fifth of one 1 MiB read reply, so a
   * sender blocks and the client is woken many times per reply. Room for two replies lets the
   * socket stream (sequential 1 MiB reads ~1.5x faster here); the kernel caps it at wmem_max.
   * TCP keeps its autotuning. */
  int sndbuf = CBT_NBD_UNIX_SNDBUF;
  if (!conn->is_inet)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  conn->deadline = g_get_monotonic_time() + cbt_nbd_handshake_timeout_us();
  /* A client that stops reading cannot hold its handshake thread past the deadline either. */
  cbt_nbd_conn_set_send_timeout(conn, srv.handshake_ms);

  cbt_mutex_lock(&cbt_nbd_lock);
  g_ptr_array_add(srv.conns, conn);
  srv.n_current++;
  /* A parked thread that has not yet taken a queued connection is already spoken for. */
  gboolean spare = srv.n_parked > g_queue_get_length(&srv.spare_conns);
  if (spare) {
    g_queue_push_tail(&srv.spare_conns, conn);
    pthread_cond_signal(&srv.spare);
  } else {
    srv.n_threads++;
  }
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (spare)
    return;

  GThread *t = g_thread_try_new("nbd-conn", conn_thread, conn, &error);
  if (!t) {
    g_warning("cannot start a thread for an NBD client: %s", error->message);
    cbt_mutex_lock(&cbt_nbd_lock);
    g_ptr_array_remove(srv.conns, conn);
    srv.n_threads--;
    srv.n_current--;
    cbt_mutex_unlock(&cbt_nbd_lock);
    conn_free(conn);
    return;
  }
  g_thread_unref(t);
}

static gboolean
on_accept(gint fd, GIOCondition cond, gpointer data)
{
  CBT_ASSERT_MAIN_THREAD();
  int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC);

  if (cfd < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
      g_warning("NBD accept failed: %s", g_strerror(errno));
    return G_SOURCE_CONTINUE;
  }
  start_conn(cfd);

  cbt_mutex_lock(&cbt_nbd_lock);
  gboolean full = srv.max_conn && srv.n_current >= srv.max_conn;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (full) {
    srv.source_id = 0;
    return G_SOURCE_REMOVE;
  }
  return G_SOURCE_CONTINUE;
}

/* CBTD_NBD_POLL_MAX_NS: nanoseconds, 0 to 10 ms; anything else is refused with a warning and
 * the default stays. */
static void
read_poll_max_ns(void)
{
  const char *env = g_getenv("CBTD_NBD_POLL_MAX_NS");
  g_autoptr(GError) error = NULL;
  guint64 ns;

  if (!env)
    return;
  if (!g_ascii_string_to_unsigned(env, 10, 0, 10 * G_GUINT64_CONSTANT(1000000), &ns, &error)) {
    g_warning("CBTD_NBD_POLL_MAX_NS ignored: %s (the cap stays %" G_GINT64_FORMAT " ns)",
              error->message, srv.poll_max_ns);
    return;
  }
  srv.poll_max_ns = (gint64)ns;
}

gboolean
cbt_nbd_server_listen(const char *what, int fd, gboolean is_inet, guint32 max_conn, GError **error)
{
  CBT_ASSERT_MAIN_THREAD();
  const char *env = g_getenv("CBTD_NBD_HANDSHAKE_TIMEOUT_MS");

  init_conds();
  if (env && *env)
    srv.handshake_ms = (guint)g_ascii_strtoull(env, NULL, 10);
  read_poll_max_ns();
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Cannot use socket: %s",
                g_strerror(errno));
    return FALSE;
  }
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  srv.listen_fd = fd;
  /* Under the lock: threads parked by an earlier server read these. */
  cbt_mutex_lock(&cbt_nbd_lock);
  if (!srv.conns)
    srv.conns = g_ptr_array_new();
  srv.n_current = 0;
  srv.is_inet = is_inet;
  srv.max_conn = max_conn;
  srv.running = TRUE;
  cbt_mutex_unlock(&cbt_nbd_lock);
  srv.source_id = g_unix_fd_add(fd, G_IO_IN, on_accept, NULL);
  g_debug("NBD server listening on %s", what);
  return TRUE;
}

void
cbt_nbd_server_stop_listening(void)
{
  CBT_ASSERT_MAIN_THREAD();
  if (!srv.running)
    return;
  cbt_mutex_lock(&cbt_nbd_lock); /* parked threads read it under the lock */
  srv.running = FALSE;
  cbt_mutex_unlock(&cbt_nbd_lock);
  if (srv.source_id)
    g_source_remove(srv.source_id);
  srv.source_id = 0;
  close(srv.listen_fd);
  srv.listen_fd = -1;

  cbt_mutex_lock(&cbt_nbd_lock);
  for (guint i = 0; i < srv.conns->len; i++)
    cbt_nbd_conn_kick_locked(g_ptr_array_index(srv.conns, i));
  srv.n_current = 0;
  pthread_cond_broadcast(&srv.spare); /* parked threads end (a queued connection is still served) */
  cbt_mutex_unlock(&cbt_nbd_lock);
}

void
cbt_nbd_server_wait_idle(gint64 timeout_us)
{
  gint64 end = g_get_monotonic_time() + timeout_us;

  init_conds();
  cbt_mutex_lock(&cbt_nbd_lock);
  while (srv.n_threads > 0) {
    if (!cond_wait_until(&srv.idle, end))
      break;
  }
  cbt_mutex_unlock(&cbt_nbd_lock);
}
