/* tests/nbd/test-nbd-transport.c — the transport seam. Every connection runs over a test
 * transport that wraps the plain one and counts what passes through it; one flavour offers
 * sendfile, the other cannot (as TLS cannot). Without sendfile, long reads (past the zero-copy
 * threshold) go through a buffer and still bring the right bytes and hole chunks; with it, long
 * reads of cached data do go zero-copy; a hard export delete and the handshake deadline both act
 * through the transport (shutdown, wait_readable).
 */
#include <errno.h>
#include <libnbd.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "nbd/nbd.h"
#include "nbd/transport.h"

#define KiB G_GUINT64_CONSTANT(1024)
#define MiB (KiB * 1024)

/* "lay": 4 MiB, 0xAA at [0, 192K), 0x55 at [1M, 1M + 320K), holes elsewhere. */
static const guint64 lay_ranges[] = { 0, 192 * KiB, 0xAA, 1 * MiB, 320 * KiB, 0x55, 0, 0, 0 };

static guint8
lay_byte(guint64 off)
{
  if (off < 192 * KiB)
    return 0xAA;
  if (off >= 1 * MiB && off < 1 * MiB + 320 * KiB)
    return 0x55;
  return 0;
}

/* --- the test transport ---------------------------------------------------------------------- */

typedef struct {
  CbtNbdTransport base;
  CbtNbdTransport *inner;
} Wrap;

static gboolean offer_sendfile;
static gint n_new, n_sendfile, n_shutdown, n_wait;

static CbtNbdTransport *
inner(CbtNbdTransport *t)
{
  return ((Wrap *)t)->inner;
}

static ssize_t
wrap_recv(CbtNbdTransport *t, void *buf, gsize len)
{
  return inner(t)->ops->recv(inner(t), buf, len);
}

static ssize_t
wrap_recv_nowait(CbtNbdTransport *t, void *buf, gsize len)
{
  return inner(t)->ops->recv_nowait(inner(t), buf, len);
}

static gsize
wrap_pending(CbtNbdTransport *t)
{
  return inner(t)->ops->pending(inner(t));
}

static int
wrap_wait_readable(CbtNbdTransport *t, gint64 deadline)
{
  g_atomic_int_inc(&n_wait);
  return inner(t)->ops->wait_readable(inner(t), deadline);
}

static int
wrap_sendv(CbtNbdTransport *t, struct iovec *iov, int n)
{
  return inner(t)->ops->sendv(inner(t), iov, n);
}

static int
wrap_sendfile(CbtNbdTransport *t, int fd, guint64 offset, gsize len)
{
  g_atomic_int_inc(&n_sendfile);
  return inner(t)->ops->sendfile(inner(t), fd, offset, len);
}

static void
wrap_shutdown(CbtNbdTransport *t)
{
  g_atomic_int_inc(&n_shutdown);
  inner(t)->ops->shutdown(inner(t));
}

static void
wrap_free(CbtNbdTransport *t)
{
  inner(t)->ops->free(inner(t));
  g_free(t);
}

static const CbtNbdTransportOps copy_ops = {
  .recv = wrap_recv,
  .recv_nowait = wrap_recv_nowait,
  .pending = wrap_pending,
  .wait_readable = wrap_wait_readable,
  .sendv = wrap_sendv,
  .sendfile = NULL,
  .shutdown = wrap_shutdown,
  .free = wrap_free,
};

static const CbtNbdTransportOps zero_copy_ops = {
  .recv = wrap_recv,
  .recv_nowait = wrap_recv_nowait,
  .pending = wrap_pending,
  .wait_readable = wrap_wait_readable,
  .sendv = wrap_sendv,
  .sendfile = wrap_sendfile,
  .shutdown = wrap_shutdown,
  .free = wrap_free,
};

static CbtNbdTransport *
wrap_new(int fd)
{
  Wrap *w = g_new0(Wrap, 1);

  w->base.ops = offer_sendfile ? &zero_copy_ops : &copy_ops;
  w->inner = cbt_nbd_transport_plain_new(fd);
  g_atomic_int_inc(&n_new);
  return &w->base;
}

/* --- clients --------------------------------------------------------------------------------- */

static struct nbd_handle *
open_export(const char *name, gboolean structured)
{
  struct nbd_handle *h = nbd_create();
  g_assert_nonnull(h);
  g_assert_cmpint(nbd_set_export_name(h, name), ==, 0);
  g_assert_cmpint(nbd_set_request_structured_replies(h, structured), ==, 0);
  if (nbd_connect_unix(h, harness.sock) < 0)
    g_error("connect to '%s': %s", name, nbd_get_error());
  return h;
}

static void
close_handle(struct nbd_handle *h)
{
  nbd_shutdown(h, 0);
  nbd_close(h);
}

typedef struct {
  guint64 offset;
  guint64 len;
  unsigned status;
} Chunk;

static int
chunk_cb(void *user_data, const void *subbuf, size_t count, uint64_t offset, unsigned status,
         int *error)
{
  Chunk c = { offset, count, status };
  g_array_append_val((GArray *)user_data, c);
  return 0;
}

/* Bytes of [off, off + len) that are holes of the layout. */
static guint64
hole_bytes(guint64 off, guint64 len)
{
  guint64 n = 0;
  for (guint64 i = off; i < off + len; i += 4 * KiB)
    n += lay_byte(i) == 0 ? MIN(4 * KiB, off + len - i) : 0;
  return n;
}

/* A structured READ of "lay": the bytes are the layout's, every hole chunk lies over zeroes and,
 * unless @df, the hole chunks cover every hole (the layout's holes are 4 KiB-aligned). */
static void
check_read(struct nbd_handle *h, guint64 off, guint64 len, gboolean df)
{
  g_autofree guint8 *buf = g_malloc(len);
  g_autoptr(GArray) chunks = g_array_new(FALSE, FALSE, sizeof(Chunk));
  guint64 holes = 0;

  memset(buf, 0xEE, len);
  if (nbd_pread_structured(h, buf, len, off,
                           (nbd_chunk_callback){ .callback = chunk_cb, .user_data = chunks },
                           df ? LIBNBD_CMD_FLAG_DF : 0) < 0)
    g_error("read %" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT ": %s", off, len, nbd_get_error());
  for (guint64 i = 0; i < len; i++)
    if (buf[i] != lay_byte(off + i))
      g_error("byte %" G_GUINT64_FORMAT ": 0x%02x", off + i, buf[i]);
  for (guint i = 0; i < chunks->len; i++) {
    Chunk *c = &g_array_index(chunks, Chunk, i);
    g_assert_cmpuint(c->status, !=, LIBNBD_READ_ERROR);
    if (c->status != LIBNBD_READ_HOLE)
      continue;
    g_assert_cmpuint(hole_bytes(c->offset, c->len), ==, c->len);
    holes += c->len;
  }
  if (df)
    g_assert_cmpuint(chunks->len, ==, 1);
  g_assert_cmpuint(holes, ==, df ? 0 : hole_bytes(off, len));
}

/* Long reads (all > CBT_NBD_COPY_MAX, 64 KiB) over data, holes and both; then the same without
 * structured replies. */
static gpointer
client_long_reads(gpointer data)
{
  struct nbd_handle *h = open_export("lay", TRUE);
  check_read(h, 0, 1 * MiB, FALSE);
  check_read(h, 128 * KiB, 1536 * KiB, FALSE);
  check_read(h, 1 * MiB, 320 * KiB, FALSE);
  check_read(h, 0, 4 * MiB, FALSE);
  check_read(h, 0, 1 * MiB, TRUE);
  close_handle(h);

  h = open_export("lay", FALSE);
  g_autofree guint8 *buf = g_malloc(2 * MiB);
  g_assert_cmpint(nbd_pread(h, buf, 2 * MiB, 64 * KiB, 0), ==, 0);
  for (guint64 i = 0; i < 2 * MiB; i++)
    if (buf[i] != lay_byte(64 * KiB + i))
      g_error("simple reply, byte %" G_GUINT64_FORMAT ": 0x%02x", 64 * KiB + i, buf[i]);
  close_handle(h);
  return NULL;
}

static void
test_long_reads_without_sendfile(void)
{
  offer_sendfile = FALSE;
  n_new = n_sendfile = 0;
  harness_run_client(client_long_reads, NULL);
  g_assert_cmpint(g_atomic_int_get(&n_new), ==, 2);
  g_assert_cmpint(g_atomic_int_get(&n_sendfile), ==, 0);
}

/* The same reads where the transport can: the zero-copy path is really taken (only for data in
 * the page cache, which the first round leaves there). */
static void
test_long_reads_with_sendfile(void)
{
  offer_sendfile = TRUE;
  n_new = n_sendfile = 0;
  harness_run_client(client_long_reads, NULL);
  harness_run_client(client_long_reads, NULL);
  g_assert_cmpint(g_atomic_int_get(&n_new), ==, 4);
  g_assert_cmpint(g_atomic_int_get(&n_sendfile), >, 0);
}

static gpointer
client_hold(gpointer data)
{
  struct nbd_handle **hp = data;
  guint8 b[512];

  *hp = open_export("del", TRUE);
  g_assert_cmpint(nbd_pread(*hp, b, sizeof b, 0, 0), ==, 0);
  return NULL;
}

static gpointer
client_after_delete(gpointer data)
{
  struct nbd_handle *h = data;
  guint8 b[512];

  g_assert_cmpint(nbd_pread(h, b, sizeof b, 0, 0), ==, -1);
  nbd_close(h);
  return NULL;
}

static void
test_hard_delete(void)
{
  struct nbd_handle *h = NULL;

  offer_sendfile = FALSE;
  harness_export("del", 1 * MiB, NULL, NULL);
  harness_run_client(client_hold, &h);
  gint before = g_atomic_int_get(&n_shutdown);
  harness_qmp_ok("block-export-del", "{\"id\": \"del\", \"mode\": \"hard\"}");
  g_assert_cmpint(g_atomic_int_get(&n_shutdown), >, before);
  harness_run_client(client_after_delete, h);
  harness_spin(50);
  harness_qmp_ok("blockdev-del", "{\"node-name\": \"n-del\"}");
}

/* A client that connects and says nothing is dropped at the handshake deadline, which the
 * reader keeps by waiting through the transport. */
static gpointer
client_silent(gpointer data)
{
  int fd = harness_connect_raw();
  guint8 greeting[18], more;
  gsize got = 0;

  g_assert_cmpint(fd, >=, 0);
  while (got < sizeof greeting) {
    ssize_t r = recv(fd, greeting + got, sizeof greeting - got, 0);
    g_assert_cmpint(r, >, 0);
    got += r;
  }
  gint64 t0 = g_get_monotonic_time();
  g_assert_cmpint(recv(fd, &more, 1, 0), ==, 0);
  g_assert_cmpint(g_get_monotonic_time() - t0, <, 5 * G_USEC_PER_SEC);
  close(fd);
  return NULL;
}

static void
test_handshake_deadline(void)
{
  n_wait = 0;
  cbt_nbd_set_handshake_timeout(200);
  harness_run_client(client_silent, NULL);
  cbt_nbd_set_handshake_timeout(10000);
  g_assert_cmpint(g_atomic_int_get(&n_wait), >, 0);
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  harness_init();
  cbt_nbd_set_transport_new(wrap_new);
  harness_export("lay", 4 * MiB, lay_ranges, NULL);

  g_test_add_func("/nbd/transport/long-reads-without-sendfile", test_long_reads_without_sendfile);
  g_test_add_func("/nbd/transport/long-reads-with-sendfile", test_long_reads_with_sendfile);
  g_test_add_func("/nbd/transport/hard-delete", test_hard_delete);
  g_test_add_func("/nbd/transport/handshake-deadline", test_handshake_deadline);
  int ret = g_test_run();
  cbt_nbd_set_transport_new(NULL);
  harness_fini();
  return ret;
}
