/* tests/fuzz/fuzz-nbd.c — a whole NBD client session on arbitrary bytes: the handshake, its
 * options and, after NBD_OPT_GO, transmission requests, against the real server code of an
 * in-process daemon with a writable export that publishes a dirty bitmap and a read-only one.
 *
 * The bytes are what the client sends; the server's replies go nowhere (a transport double
 * under the connection). Built twice: fuzz-nbd-handshake sees the input from the client's
 * flags on; fuzz-nbd-requests puts a valid handshake in front of it, chosen by the first byte
 * (structured replies or not, which export), so every mutation lands in the request parser.
 * Beyond not crashing, every session must end with its connection freed: one that does not
 * hangs the run, which libFuzzer reports as a timeout.
 */
#include "fuzz-daemon.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbd/nbd-protocol.h"
#include "nbd/nbd.h"
#include "nbd/transport.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
  CbtNbdTransport base;
  int fd;
  GByteArray *in;
  gsize pos;
  gint shut;
} MemTransport;

static GByteArray *next_input; /* the session the next accepted connection reads */
static GMutex done_lock;
static GCond done_cond;
static gboolean done;
static volatile guint8 sink;

static ssize_t
mem_recv(CbtNbdTransport *t, void *buf, gsize len)
{
  MemTransport *m = (MemTransport *)t;
  gsize n = MIN(len, m->in->len - m->pos);

  if (g_atomic_int_get(&m->shut) || n == 0)
    return 0;
  memcpy(buf, m->in->data + m->pos, n);
  m->pos += n;
  return (ssize_t)n;
}

static gsize
mem_pending(CbtNbdTransport *t)
{
  MemTransport *m = (MemTransport *)t;
  return g_atomic_int_get(&m->shut) ? 0 : m->in->len - m->pos;
}

static int
mem_wait_readable(CbtNbdTransport *t, gint64 deadline)
{
  return 0; /* input is always there, or EOF is */
}

/* Reads every byte of a reply, so a reply built past its buffer shows under ASan. */
static int
mem_sendv(CbtNbdTransport *t, struct iovec *iov, int n)
{
  guint8 x = 0;

  for (int i = 0; i < n; i++)
    for (gsize j = 0; j < iov[i].iov_len; j += 64)
      x ^= ((const guint8 *)iov[i].iov_base)[j];
  sink = x;
  return 0;
}

static void
mem_shutdown(CbtNbdTransport *t)
{
  g_atomic_int_set(&((MemTransport *)t)->shut, 1);
}

static void
mem_free(CbtNbdTransport *t)
{
  MemTransport *m = (MemTransport *)t;

  close(m->fd);
  g_byte_array_unref(m->in);
  g_free(m);
  g_mutex_lock(&done_lock);
  done = TRUE;
  g_cond_signal(&done_cond);
  g_mutex_unlock(&done_lock);
}

static const CbtNbdTransportOps mem_ops = {
  .recv = mem_recv,
  .recv_nowait = mem_recv,
  .pending = mem_pending,
  .wait_readable = mem_wait_readable,
  .sendv = mem_sendv,
  .shutdown = mem_shutdown,
  .free = mem_free,
};

static CbtNbdTransport *
mem_new(int fd)
{
  MemTransport *m = g_new0(MemTransport, 1);

  m->base.ops = &mem_ops;
  m->fd = fd;
  m->in = g_steal_pointer(&next_input);
  if (!m->in) /* not ours: a stray connection reads nothing */
    m->in = g_byte_array_new();
  return &m->base;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_daemon_init_standard();
  fuzz_daemon_qmp_ok("block-dirty-bitmap-add",
                     "{\"node\": \"n0\", \"name\": \"b0\", \"granularity\": 65536}");
  fuzz_daemon_qmp_ok(
    "block-export-add",
    "{\"type\": \"nbd\", \"id\": \"e\", \"name\": \"e\", \"node-name\": \"n0\", \"writable\": true,"
    " \"bitmaps\": [\"b0\"], \"allocation-depth\": true,"
    " \"description\": \"fuzz\"}");
  fuzz_daemon_qmp_ok(
    "block-export-add",
    "{\"type\": \"nbd\", \"id\": \"ro\", \"name\": \"ro\", \"node-name\": \"n1\"}");
  cbt_nbd_set_transport_new(mem_new);
  cbt_nbd_set_spare_wait(G_MAXINT64 / 4); /* no thread ends while the fuzzer runs */
  return 0;
}

#ifdef FUZZ_NBD_REQUESTS
static void
put32(GByteArray *b, guint32 v)
{
  v = GUINT32_TO_BE(v);
  g_byte_array_append(b, (const guint8 *)&v, 4);
}

static void
put_str(GByteArray *b, const char *s)
{
  put32(b, (guint32)strlen(s));
  g_byte_array_append(b, (const guint8 *)s, (guint)strlen(s));
}

static void
put_option(GByteArray *b, guint32 opt, const GByteArray *data)
{
  guint64 magic = GUINT64_TO_BE(NBD_IHAVEOPT);

  g_byte_array_append(b, (const guint8 *)&magic, 8);
  put32(b, opt);
  put32(b, data ? data->len : 0);
  if (data)
    g_byte_array_append(b, data->data, data->len);
}

/* The handshake of fuzz-nbd-requests: bit 0 of @how asks for simple replies only, bit 1 for
 * the read-only export. */
static void
put_handshake(GByteArray *b, guint8 how)
{
  const char *name = how & 2 ? "ro" : "e";
  g_autoptr(GByteArray) meta = g_byte_array_new();
  g_autoptr(GByteArray) go = g_byte_array_new();

  put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  if (!(how & 1)) {
    put_option(b, NBD_OPT_STRUCTURED_REPLY, NULL);
    put_str(meta, name);
    put32(meta, 3);
    put_str(meta, "base:allocation");
    put_str(meta, "qemu:dirty-bitmap:b0");
    put_str(meta, "qemu:allocation-depth");
    put_option(b, NBD_OPT_SET_META_CONTEXT, meta);
  }
  put_str(go, name);
  g_byte_array_append(go, (const guint8 *)"\0\0", 2);
  put_option(b, NBD_OPT_GO, go);
}
#endif

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };

#ifdef FUZZ_NBD_REQUESTS
  if (size == 0)
    return 0;
#endif
  GByteArray *in = g_byte_array_new();
#ifdef FUZZ_NBD_REQUESTS
  put_handshake(in, data[0]);
  data++, size--;
#endif
  g_byte_array_append(in, data, (guint)size);
  next_input = in;
  done = FALSE;

  /* The real listener accepts it; the transport double then serves @in instead of the socket. */
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  g_strlcpy(sa.sun_path, fuzz_daemon.sock, sizeof sa.sun_path);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
    abort();
  g_mutex_lock(&done_lock);
  while (!done) {
    g_mutex_unlock(&done_lock);
    fuzz_daemon_spin();
    g_mutex_lock(&done_lock);
    if (!done)
      g_cond_wait_until(&done_cond, &done_lock, g_get_monotonic_time() + 1000);
  }
  g_mutex_unlock(&done_lock);
  close(fd);
  fuzz_daemon_spin();
  return 0;
}
