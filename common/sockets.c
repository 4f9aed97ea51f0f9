/* common/sockets.c — listen and connect for every SocketAddress kind (see sockets.h). */
#include "common/sockets.h"

#include <errno.h>
#include <linux/vm_sockets.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define SOCKET_ERROR (g_quark_from_static_string("cbt-socket"))

static int G_GNUC_PRINTF(2, 3) fail(GError **error, const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  g_set_error_literal(error, SOCKET_ERROR, 0, msg);
  return -1;
}

/* ---- unix --------------------------------------------------------------------------------- */

/* Fill @sun for @u; its length, or 0 when the path does not fit. */
static socklen_t
unix_address(const CbtQmpUnixSocketAddress *u, struct sockaddr_un *sun)
{
  gsize len = strlen(u->path), off = u->abstract ? 1 : 0;

  memset(sun, 0, sizeof *sun);
  sun->sun_family = AF_UNIX;
  if (len + off >= sizeof sun->sun_path)
    return 0;
  memcpy(sun->sun_path + off, u->path, len);
  /* tight defaults to on: an abstract name is as long as the path, not the whole array. */
  if (u->abstract && (!u->has_tight || u->tight))
    return offsetof(struct sockaddr_un, sun_path) + 1 + len;
  return sizeof *sun;
}

static int
unix_socket(GError **error)
{
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

  if (fd < 0)
    fail(error, "Failed to create Unix socket: %s", g_strerror(errno));
  return fd;
}

static guint unix_mode = CBT_SOCKET_DEFAULT_MODE;

void
cbt_socket_set_unix_mode(guint mode)
{
  g_return_if_fail((mode & ~0777u) == 0 && (mode & 0600) == 0600);
  unix_mode = mode;
}

/* Bind and listen at @bind_path, publishing at @path by rename when they differ. */
static int
unix_bind_listen(int fd, const char *path, const char *bind_path, GError **error)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };

  strcpy(sun.sun_path, bind_path);
  if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
    return fail(error, "Failed to bind socket to %s: %s", path, g_strerror(errno));
  /* Owner only (unless configured), whatever the umask: connecting needs write permission on
   * the socket, and before listen() nobody can connect, so no client ever sees a wider mode. */
  if (chmod(bind_path, unix_mode) < 0) {
    int err = errno;
    unlink(bind_path);
    return fail(error, "Failed to set the mode of %s: %s", path, g_strerror(err));
  }
  if (listen(fd, SOMAXCONN) < 0 || (bind_path != path && rename(bind_path, path) < 0)) {
    int err = errno;
    unlink(bind_path);
    return fail(error, "Failed to listen on socket: %s", g_strerror(err));
  }
  return 0;
}

static int
unix_listen(const CbtQmpUnixSocketAddress *u, GError **error)
{
  struct sockaddr_un sun;
  socklen_t slen = unix_address(u, &sun);
  struct stat st;
  int fd;

  if (!slen)
    return fail(error, "UNIX socket path '%s' is too long", u->path);
  if ((fd = unix_socket(error)) < 0)
    return -1;
  if (u->abstract) {
    if (bind(fd, (struct sockaddr *)&sun, slen) < 0 || listen(fd, SOMAXCONN) < 0) {
      fail(error, "Failed to bind socket to %s: %s", u->path, g_strerror(errno));
      close(fd);
      return -1;
    }
    return fd;
  }
  g_autofree char *tmp = g_strdup_printf("%s.%d~", u->path, (int)getpid());
  gboolean exists = lstat(u->path, &st) == 0;
  /* Publish by rename only where that cannot clobber a non-socket file or overflow sun_path. */
  const char *bind_path =
    strlen(tmp) < sizeof sun.sun_path && (!exists || S_ISSOCK(st.st_mode)) ? tmp : u->path;
  if (bind_path == u->path && exists && S_ISSOCK(st.st_mode))
    unlink(u->path);
  if (bind_path != u->path)
    unlink(tmp);
  if (unix_bind_listen(fd, u->path, bind_path, error) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int
unix_connect(const CbtQmpUnixSocketAddress *u, GError **error)
{
  struct sockaddr_un sun;
  socklen_t slen = unix_address(u, &sun);
  int fd;

  if (!slen)
    return fail(error, "UNIX socket path '%s' is too long", u->path);
  if ((fd = unix_socket(error)) < 0)
    return -1;
  if (connect(fd, (struct sockaddr *)&sun, slen) < 0) {
    fail(error, "Failed to connect to '%s': %s", u->path, g_strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

/* ---- inet --------------------------------------------------------------------------------- */

static struct addrinfo *
inet_resolve(const CbtQmpInetSocketAddress *a, gboolean passive, GError **error)
{
  struct addrinfo hints = { .ai_flags = passive ? AI_PASSIVE : 0, .ai_socktype = SOCK_STREAM };
  gboolean v4 = a->has_ipv4 && a->ipv4, v6 = a->has_ipv6 && a->ipv6;
  struct addrinfo *res = NULL;

  if (v4 && !v6)
    hints.ai_family = AF_INET;
  else if (v6 && !v4)
    hints.ai_family = AF_INET6;
  if (a->has_numeric && a->numeric)
    hints.ai_flags |= AI_NUMERICHOST;
  int rc = getaddrinfo(*a->host ? a->host : NULL, a->port, &hints, &res);
  if (rc != 0) {
    fail(error, "address resolution failed for %s:%s: %s", a->host, a->port, gai_strerror(rc));
    return NULL;
  }
  return res;
}

/* The first address @res holds that can be bound (@listen) or connected to. */
static int
inet_open(struct addrinfo *res, gboolean listen_on, GError **error)
{
  int saved = 0, one = 1;

  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      saved = errno;
      continue;
    }
    if (listen_on) {
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
        return fd;
    } else if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      return fd;
    }
    saved = errno;
    close(fd);
  }
  return fail(error, listen_on ? "Failed to bind socket: %s" : "Failed to connect socket: %s",
              g_strerror(saved));
}

static int
inet_listen_or_connect(const CbtQmpInetSocketAddress *a, gboolean listen_on, GError **error)
{
  struct addrinfo *res = inet_resolve(a, listen_on, error);

  if (!res)
    return -1;
  int fd = inet_open(res, listen_on, error);
  freeaddrinfo(res);
  if (fd >= 0 && a->has_keep_alive && a->keep_alive) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  }
  return fd;
}

/* ---- vsock, fd ---------------------------------------------------------------------------- */

static int
vsock_listen_or_connect(const CbtQmpVsockSocketAddress *v, gboolean listen_on, GError **error)
{
  struct sockaddr_vm svm = { .svm_family = AF_VSOCK };
  guint64 cid, port;

  if (!g_ascii_string_to_unsigned(v->cid, 10, 0, G_MAXUINT32, &cid, NULL))
    return fail(error, "Invalid CID '%s'", v->cid);
  if (!g_ascii_string_to_unsigned(v->port, 10, 0, G_MAXUINT32, &port, NULL))
    return fail(error, "Invalid port '%s'", v->port);
  svm.svm_cid = cid;
  svm.svm_port = port;
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return fail(error, "Failed to create socket: %s", g_strerror(errno));
  int r = listen_on
            ? bind(fd, (struct sockaddr *)&svm, sizeof svm) == 0 && listen(fd, SOMAXCONN) == 0
            : connect(fd, (struct sockaddr *)&svm, sizeof svm) == 0;
  if (!r) {
    fail(error, listen_on ? "Failed to bind socket: %s" : "Failed to connect socket: %s",
         g_strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

/* A decimal descriptor of a listening stream socket. */
static int
listening_fd(const char *str, GError **error)
{
  guint64 n;
  int type = 0, acc = 0;
  socklen_t l1 = sizeof type, l2 = sizeof acc;

  if (!g_ascii_string_to_unsigned(str, 10, 0, G_MAXINT, &n, NULL))
    return fail(error, "Invalid file descriptor number '%s'", str);
  if (getsockopt((int)n, SOL_SOCKET, SO_TYPE, &type, &l1) < 0 || type != SOCK_STREAM ||
      getsockopt((int)n, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l2) < 0 || !acc)
    return fail(error, "File descriptor %s is not a listening stream socket", str);
  return (int)n;
}

/* ---- the entry points --------------------------------------------------------------------- */

int
cbt_socket_listen(const CbtQmpSocketAddress *addr, CbtSocketFlags flags, GError **error)
{
  switch (addr->type) {
  case CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX:
    return unix_listen(&addr->u.q_unix, error);
  case CBT_QMP_SOCKET_ADDRESS_TYPE_INET:
    return inet_listen_or_connect(&addr->u.inet, TRUE, error);
  case CBT_QMP_SOCKET_ADDRESS_TYPE_VSOCK:
    return vsock_listen_or_connect(&addr->u.vsock, TRUE, error);
  case CBT_QMP_SOCKET_ADDRESS_TYPE_FD:
    if (flags & CBT_SOCKET_ALLOW_FD)
      return listening_fd(addr->u.fd.str, error);
    return fail(error, "only QEMU supports file descriptor passing");
  default:
    return fail(error, "Unknown socket address type");
  }
}

int
cbt_socket_connect(const CbtQmpSocketAddress *addr, GError **error)
{
  switch (addr->type) {
  case CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX:
    return unix_connect(&addr->u.q_unix, error);
  case CBT_QMP_SOCKET_ADDRESS_TYPE_INET:
    return inet_listen_or_connect(&addr->u.inet, FALSE, error);
  case CBT_QMP_SOCKET_ADDRESS_TYPE_VSOCK:
    return vsock_listen_or_connect(&addr->u.vsock, FALSE, error);
  default:
    return fail(error, "only QEMU supports file descriptor passing");
  }
}

int
cbt_socket_connect_unix(const char *path, GError **error)
{
  CbtQmpUnixSocketAddress u = { .path = (char *)path };

  return unix_connect(&u, error);
}

void
cbt_socket_address_from_legacy(const CbtQmpSocketAddressLegacy *legacy, CbtQmpSocketAddress *view)
{
  memset(view, 0, sizeof *view);
  view->type = legacy->type;
  switch (legacy->type) {
  case CBT_QMP_SOCKET_ADDRESS_TYPE_INET:
    view->u.inet = *legacy->u.inet.data;
    break;
  case CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX:
    view->u.q_unix = *legacy->u.q_unix.data;
    break;
  case CBT_QMP_SOCKET_ADDRESS_TYPE_VSOCK:
    view->u.vsock = *legacy->u.vsock.data;
    break;
  case CBT_QMP_SOCKET_ADDRESS_TYPE_FD:
    view->u.fd = *legacy->u.fd.data;
    break;
  default:
    break;
  }
}

CbtQmpSocketAddress *
cbt_socket_address_unix(const char *path)
{
  CbtQmpSocketAddress *addr = g_new0(CbtQmpSocketAddress, 1);

  addr->type = CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX;
  addr->u.q_unix.path = g_strdup(path);
  return addr;
}

const char *
cbt_socket_address_path(const CbtQmpSocketAddress *addr)
{
  if (addr->type != CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX || addr->u.q_unix.abstract)
    return NULL;
  return addr->u.q_unix.path;
}

gboolean
cbt_socket_is_inet(int fd)
{
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;

  return getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
         (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
}

void
cbt_socket_set_nodelay(int fd)
{
  int one = 1;

  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void
cbt_socket_set_send_buffer(int fd, int bytes)
{
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

void
cbt_socket_set_send_timeout(int fd, guint ms)
{
  struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = ms % 1000 * 1000 };

  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}
