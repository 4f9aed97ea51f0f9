/* common/sockets: listening and connecting for every SocketAddress kind, the atomic unix bind,
 * and the errors, with QEMU's texts. */
#include <errno.h>
#include <glib/gstdio.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/sockets.h"

static char *dir;

static char *
tmp(const char *name)
{
  return g_build_filename(dir, name, NULL);
}

/* Accept one client on @lfd and check a byte goes through. */
static void
assert_talks(int lfd, int cfd)
{
  int afd = accept(lfd, NULL, NULL);
  char b = 0;

  g_assert_cmpint(afd, >=, 0);
  g_assert_cmpint(write(cfd, "x", 1), ==, 1);
  g_assert_cmpint(read(afd, &b, 1), ==, 1);
  g_assert_cmpint(b, ==, 'x');
  close(afd);
}

static void
test_unix(void)
{
  g_autofree char *path = tmp("a.sock");
  g_autoptr(CbtQmpSocketAddress) addr = cbt_socket_address_unix(path);
  g_autoptr(GError) error = NULL;
  struct stat st;

  g_assert_cmpstr(cbt_socket_address_path(addr), ==, path);
  int lfd = cbt_socket_listen(addr, 0, &error);
  g_assert_no_error(error);
  g_assert_cmpint(lstat(path, &st), ==, 0);
  g_assert_true(S_ISSOCK(st.st_mode));
  /* Only the path is left: the temporary name it was bound under is gone. */
  g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
  g_assert_cmpstr(g_dir_read_name(d), ==, "a.sock");
  g_assert_null(g_dir_read_name(d));
  int cfd = cbt_socket_connect_unix(path, &error);
  g_assert_no_error(error);
  assert_talks(lfd, cfd);
  g_assert_false(cbt_socket_is_inet(lfd));
  close(cfd);
  close(lfd);

  /* The socket file is left behind (a crash): the next listener replaces it. */
  lfd = cbt_socket_listen(addr, 0, &error);
  g_assert_no_error(error);
  close(lfd);
  g_unlink(path);
  g_assert_cmpint(cbt_socket_connect_unix(path, &error), ==, -1);
  g_assert_true(g_str_has_prefix(error->message, "Failed to connect to '"));
}

static void
test_unix_errors(void)
{
  g_autofree char *file = tmp("data");
  g_autoptr(GError) error = NULL;

  /* Any other kind of file is left alone. */
  g_assert_true(g_file_set_contents(file, "keep", -1, NULL));
  g_autoptr(CbtQmpSocketAddress) on_file = cbt_socket_address_unix(file);
  g_assert_cmpint(cbt_socket_listen(on_file, 0, &error), ==, -1);
  g_autofree char *want =
    g_strdup_printf("Failed to bind socket to %s: Address already in use", file);
  g_assert_cmpstr(error->message, ==, want);
  g_autofree char *kept = NULL;
  g_assert_true(g_file_get_contents(file, &kept, NULL, NULL));
  g_assert_cmpstr(kept, ==, "keep");
  g_clear_error(&error);

  g_autoptr(CbtQmpSocketAddress) nodir = cbt_socket_address_unix("/nonexistent/dir/x.sock");
  g_assert_cmpint(cbt_socket_listen(nodir, 0, &error), ==, -1);
  g_assert_cmpstr(error->message, ==,
                  "Failed to bind socket to /nonexistent/dir/x.sock: "
                  "No such file or directory");
  g_clear_error(&error);

  g_autofree char *longname = g_strnfill(120, 'l');
  g_autoptr(CbtQmpSocketAddress) toolong = cbt_socket_address_unix(longname);
  g_assert_cmpint(cbt_socket_listen(toolong, 0, &error), ==, -1);
  g_autofree char *want2 = g_strdup_printf("UNIX socket path '%s' is too long", longname);
  g_assert_cmpstr(error->message, ==, want2);
}

static void
test_abstract(void)
{
  g_autofree char *name = g_strdup_printf("cbt-test-%d", (int)getpid());
  g_autoptr(CbtQmpSocketAddress) addr = cbt_socket_address_unix(name);
  g_autoptr(GError) error = NULL;

  addr->u.q_unix.has_abstract = addr->u.q_unix.abstract = TRUE;
  g_assert_null(cbt_socket_address_path(addr)); /* no file to remove */
  int lfd = cbt_socket_listen(addr, 0, &error);
  g_assert_no_error(error);
  int cfd = cbt_socket_connect(addr, &error);
  g_assert_no_error(error);
  assert_talks(lfd, cfd);
  close(cfd);
  close(lfd);
  g_assert_false(g_file_test(name, G_FILE_TEST_EXISTS));
}

/* Port 0 on @host: bind, read the port back, connect to it. */
static void
check_inet(const char *host, gboolean v6)
{
  CbtQmpSocketAddress addr = { .type = CBT_QMP_SOCKET_ADDRESS_TYPE_INET };
  g_autoptr(GError) error = NULL;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;

  addr.u.inet.host = (char *)host;
  addr.u.inet.port = (char *)"0";
  addr.u.inet.has_numeric = addr.u.inet.numeric = TRUE;
  int lfd = cbt_socket_listen(&addr, 0, &error);
  g_assert_no_error(error);
  g_assert_true(cbt_socket_is_inet(lfd));
  g_assert_cmpint(getsockname(lfd, (struct sockaddr *)&ss, &sl), ==, 0);
  g_assert_cmpint(ss.ss_family, ==, v6 ? AF_INET6 : AF_INET);
  guint16 port = v6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                    : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  g_autofree char *p = g_strdup_printf("%u", port);
  addr.u.inet.port = p;
  int cfd = cbt_socket_connect(&addr, &error);
  g_assert_no_error(error);
  assert_talks(lfd, cfd);
  close(cfd);
  close(lfd);
}

static void
test_inet(void)
{
  check_inet("127.0.0.1", FALSE);
  check_inet("::1", TRUE);

  CbtQmpSocketAddress bad = { .type = CBT_QMP_SOCKET_ADDRESS_TYPE_INET };
  g_autoptr(GError) error = NULL;
  bad.u.inet.host = (char *)"no such host";
  bad.u.inet.port = (char *)"1";
  bad.u.inet.has_numeric = bad.u.inet.numeric = TRUE;
  g_assert_cmpint(cbt_socket_listen(&bad, 0, &error), ==, -1);
  g_assert_true(g_str_has_prefix(error->message, "address resolution failed for no such host:1: "));
}

static void
test_fd_and_vsock(void)
{
  g_autofree char *path = tmp("fd.sock");
  g_autoptr(CbtQmpSocketAddress) u = cbt_socket_address_unix(path);
  g_autoptr(GError) error = NULL;
  int lfd = cbt_socket_listen(u, 0, &error);
  g_autofree char *num = g_strdup_printf("%d", lfd);
  CbtQmpSocketAddress fd = { .type = CBT_QMP_SOCKET_ADDRESS_TYPE_FD, .u.fd.str = num };

  /* Over QMP an inherited descriptor is refused, as qemu-storage-daemon refuses it there. */
  g_assert_cmpint(cbt_socket_listen(&fd, 0, &error), ==, -1);
  g_assert_cmpstr(error->message, ==, "only QEMU supports file descriptor passing");
  g_clear_error(&error);
  g_assert_cmpint(cbt_socket_listen(&fd, CBT_SOCKET_ALLOW_FD, &error), ==, lfd);
  int cfd = socket(AF_UNIX, SOCK_STREAM, 0);
  CbtQmpSocketAddress notlistening = fd;
  g_autofree char *cnum = g_strdup_printf("%d", cfd);
  notlistening.u.fd.str = cnum;
  g_assert_cmpint(cbt_socket_listen(&notlistening, CBT_SOCKET_ALLOW_FD, &error), ==, -1);
  g_autofree char *want =
    g_strdup_printf("File descriptor %d is not a listening stream socket", cfd);
  g_assert_cmpstr(error->message, ==, want);
  g_clear_error(&error);
  notlistening.u.fd.str = (char *)"x";
  g_assert_cmpint(cbt_socket_listen(&notlistening, CBT_SOCKET_ALLOW_FD, &error), ==, -1);
  g_assert_cmpstr(error->message, ==, "Invalid file descriptor number 'x'");
  g_clear_error(&error);
  close(cfd);
  close(lfd);
  g_unlink(path);

  CbtQmpSocketAddress vs = { .type = CBT_QMP_SOCKET_ADDRESS_TYPE_VSOCK };
  vs.u.vsock.cid = (char *)"not-a-cid";
  vs.u.vsock.port = (char *)"1";
  g_assert_cmpint(cbt_socket_listen(&vs, 0, &error), ==, -1);
  g_assert_cmpstr(error->message, ==, "Invalid CID 'not-a-cid'");
}

/* The legacy {type, data} address is seen as the flat one without a copy. */
static void
test_legacy(void)
{
  CbtQmpUnixSocketAddress u = { .path = (char *)"/x.sock" };
  CbtQmpSocketAddressLegacy legacy = { .type = CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX };
  CbtQmpSocketAddress view;

  legacy.u.q_unix.data = &u;
  cbt_socket_address_from_legacy(&legacy, &view);
  g_assert_cmpint(view.type, ==, CBT_QMP_SOCKET_ADDRESS_TYPE_UNIX);
  g_assert_true(view.u.q_unix.path == u.path);
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;

  g_test_init(&argc, &argv, NULL);
  dir = g_dir_make_tmp("cbt-sockets-XXXXXX", &error);
  g_assert_no_error(error);
  g_test_add_func("/sockets/unix", test_unix);
  g_test_add_func("/sockets/unix-errors", test_unix_errors);
  g_test_add_func("/sockets/abstract", test_abstract);
  g_test_add_func("/sockets/inet", test_inet);
  g_test_add_func("/sockets/fd-and-vsock", test_fd_and_vsock);
  g_test_add_func("/sockets/legacy", test_legacy);
  int ret = g_test_run();
  g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
  for (const char *n; d && (n = g_dir_read_name(d));) {
    g_autofree char *p = tmp(n);
    g_unlink(p);
  }
  g_rmdir(dir);
  g_free(dir);
  return ret;
}
