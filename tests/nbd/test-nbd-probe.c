/* tests/nbd/test-nbd-probe.c — raw-socket probes for what libnbd refuses to send: malformed
 * handshakes and options, unknown commands and flags, oversized payloads, clients vanishing
 * mid-handshake and mid-request, the handshake timeout, max-connections, and a stress run.
 * After each, a fresh client must be served correctly.
 *
 * Expected answers are docs/nbd-server.md's (the handshake table's "cbtd" column).
 */
#include <errno.h>
#include <libnbd.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "nbd/nbd.h"
#include "nbd/nbd-protocol.h"

#define KiB 1024u
#define MiB (1024u * 1024)

typedef struct {
  guint32 opt;
  guint32 type;
  guint32 len;
  guint8 data[65536];
} OptReply;

static void
put32(guint8 *p, guint32 v)
{
  v = GUINT32_TO_BE(v);
  memcpy(p, &v, 4);
}

static void
put64(guint8 *p, guint64 v)
{
  v = GUINT64_TO_BE(v);
  memcpy(p, &v, 8);
}

static guint32
get32(const guint8 *p)
{
  guint32 v;
  memcpy(&v, p, 4);
  return GUINT32_FROM_BE(v);
}

static guint64
get64(const guint8 *p)
{
  guint64 v;
  memcpy(&v, p, 8);
  return GUINT64_FROM_BE(v);
}

static gboolean
read_all(int fd, void *buf, gsize len)
{
  guint8 *p = buf;
  while (len) {
    ssize_t r = recv(fd, p, len, 0);
    if (r <= 0)
      return FALSE;
    p += r;
    len -= r;
  }
  return TRUE;
}

static void
write_all(int fd, const void *buf, gsize len)
{
  const guint8 *p = buf;
  while (len) {
    ssize_t r = send(fd, p, len, MSG_NOSIGNAL);
    if (r <= 0)
      return; /* the server may have hung up: the caller checks for that */
    p += r;
    len -= r;
  }
}

/* TRUE when the server has closed the connection (EOF, not a timeout). */
static gboolean
closed_by_server(int fd)
{
  guint8 b;
  ssize_t r = recv(fd, &b, 1, 0);
  return r == 0 || (r < 0 && errno == ECONNRESET);
}

/* Connect, check the greeting, send client flags. */
static int
hello(guint32 cflags)
{
  int fd = harness_connect_raw();
  guint8 g[18];
  g_assert_cmpint(fd, >=, 0);
  g_assert_true(read_all(fd, g, sizeof g));
  g_assert_cmpuint(get64(g), ==, NBD_MAGIC);
  g_assert_cmpuint(get64(g + 8), ==, NBD_IHAVEOPT);
  g_assert_cmpuint((g[16] << 8) | g[17], ==, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  guint8 f[4];
  put32(f, cflags);
  write_all(fd, f, 4);
  return fd;
}

static void
send_opt(int fd, guint32 opt, const void *data, guint32 len)
{
  guint8 h[16];
  put64(h, NBD_IHAVEOPT);
  put32(h + 8, opt);
  put32(h + 12, len);
  write_all(fd, h, 16);
  if (len)
    write_all(fd, data, len);
}

static gboolean
recv_reply(int fd, OptReply *r)
{
  guint8 h[20];
  if (!read_all(fd, h, 20))
    return FALSE;
  g_assert_cmpuint(get64(h), ==, NBD_REP_MAGIC);
  r->opt = get32(h + 8);
  r->type = get32(h + 12);
  r->len = get32(h + 16);
  g_assert_cmpuint(r->len, <=, sizeof r->data);
  return read_all(fd, r->data, r->len);
}

/* Send @opt and expect exactly one reply of @type. */
static void
expect(int fd, guint32 opt, const void *data, guint32 len, guint32 type)
{
  OptReply r;
  send_opt(fd, opt, data, len);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmpuint(r.opt, ==, opt);
  g_assert_cmphex(r.type, ==, type);
}

/* An INFO/GO payload. */
static guint8 *
info_payload(const char *name, const guint16 *infos, guint n, guint32 *len)
{
  gsize nl = strlen(name);
  *len = 4 + nl + 2 + 2 * n;
  guint8 *p = g_malloc(*len);
  put32(p, nl);
  memcpy(p + 4, name, nl);
  p[4 + nl] = n >> 8;
  p[5 + nl] = n;
  for (guint i = 0; i < n; i++) {
    p[6 + nl + 2 * i] = infos[i] >> 8;
    p[7 + nl + 2 * i] = infos[i];
  }
  return p;
}

/* A LIST/SET_META payload. */
static guint8 *
meta_payload(const char *name, const char *const *queries, guint32 *len)
{
  GByteArray *b = g_byte_array_new();
  guint8 w[4];
  guint n = queries ? g_strv_length((char **)queries) : 0;
  put32(w, strlen(name));
  g_byte_array_append(b, w, 4);
  g_byte_array_append(b, (const guint8 *)name, strlen(name));
  put32(w, n);
  g_byte_array_append(b, w, 4);
  for (guint i = 0; i < n; i++) {
    put32(w, strlen(queries[i]));
    g_byte_array_append(b, w, 4);
    g_byte_array_append(b, (const guint8 *)queries[i], strlen(queries[i]));
  }
  *len = b->len;
  return g_byte_array_free(b, FALSE);
}

/* SR + GO on @name; returns the transmission flags. */
static guint16
go(int fd, const char *name, gboolean structured, const char *const *contexts)
{
  OptReply r;
  guint16 eflags = 0;
  guint32 len;

  if (structured)
    expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ACK);
  if (contexts) {
    g_autofree guint8 *m = meta_payload(name, contexts, &len);
    send_opt(fd, NBD_OPT_SET_META_CONTEXT, m, len);
    do
      g_assert_true(recv_reply(fd, &r));
    while (r.type == NBD_REP_META_CONTEXT);
    g_assert_cmphex(r.type, ==, NBD_REP_ACK);
  }
  g_autofree guint8 *p = info_payload(name, NULL, 0, &len);
  send_opt(fd, NBD_OPT_GO, p, len);
  for (;;) {
    g_assert_true(recv_reply(fd, &r));
    if (r.type == NBD_REP_ACK)
      break;
    g_assert_cmphex(r.type, ==, NBD_REP_INFO);
    if (r.data[1] == NBD_INFO_EXPORT)
      eflags = (r.data[10] << 8) | r.data[11];
  }
  return eflags;
}

static void
send_request(int fd, guint16 flags, guint16 type, guint64 cookie, guint64 off, guint32 len)
{
  guint8 h[28];
  put32(h, NBD_REQUEST_MAGIC);
  h[4] = flags >> 8;
  h[5] = flags;
  h[6] = type >> 8;
  h[7] = type;
  put64(h + 8, cookie);
  put64(h + 16, off);
  put32(h + 24, len);
  write_all(fd, h, 28);
}

/* Read one structured reply made of a single chunk; returns its type and the error if any. */
static guint16
recv_chunk(int fd, guint64 cookie, guint32 *err, guint8 *payload, guint32 *plen)
{
  guint8 h[20];
  g_assert_true(read_all(fd, h, 20));
  g_assert_cmphex(get32(h), ==, NBD_STRUCTURED_REPLY_MAGIC);
  g_assert_cmpuint(get64(h + 8), ==, cookie);
  guint16 type = (h[6] << 8) | h[7];
  guint32 len = get32(h + 16);
  g_autofree guint8 *buf = g_malloc(len + 1);
  g_assert_true(read_all(fd, buf, len));
  if (err)
    *err = (type & 0x8000) ? get32(buf) : 0;
  if (payload)
    memcpy(payload, buf, len);
  if (plen)
    *plen = len;
  return type;
}

/* A structured error with DONE for @cookie. */
static void
expect_error(int fd, guint64 cookie, guint32 want)
{
  guint32 err;
  g_assert_cmphex(recv_chunk(fd, cookie, &err, NULL, NULL), ==, NBD_REPLY_TYPE_ERROR);
  g_assert_cmpuint(err, ==, want);
}

static guint32
recv_simple(int fd, guint64 cookie)
{
  guint8 h[16];
  g_assert_true(read_all(fd, h, 16));
  g_assert_cmphex(get32(h), ==, NBD_SIMPLE_REPLY_MAGIC);
  g_assert_cmpuint(get64(h + 8), ==, cookie);
  return get32(h + 4);
}

/* A fresh libnbd client reads the export correctly: the server survived the probe. */
static gpointer
client_check(gpointer data)
{
  struct nbd_handle *h = nbd_create();
  guint8 buf[4096];
  nbd_set_export_name(h, "p");
  nbd_add_meta_context(h, "base:allocation");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_pread(h, buf, sizeof buf, 128 * KiB, 0), ==, 0);
  for (guint i = 0; i < sizeof buf; i++)
    g_assert_cmpint(buf[i], ==, 0xC3);
  nbd_shutdown(h, 0);
  nbd_close(h);
  return NULL;
}

static void
check_served(void)
{
  harness_run_client(client_check, NULL);
}

/* --- probes -------------------------------------------------------------------------------- */

static gpointer
probe_options(gpointer data)
{
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  guint32 len;
  OptReply r;

  expect(fd, 99, "abc", 3, NBD_REP_ERR_UNSUP);
  expect(fd, NBD_OPT_EXTENDED_HEADERS, NULL, 0, NBD_REP_ERR_UNSUP);
  expect(fd, NBD_OPT_PEEK_EXPORT, NULL, 0, NBD_REP_ERR_UNSUP);
  expect(fd, NBD_OPT_STARTTLS, NULL, 0, NBD_REP_ERR_POLICY);
  expect(fd, NBD_OPT_STARTTLS, "x", 1, NBD_REP_ERR_INVALID);
  expect(fd, NBD_OPT_LIST, "x", 1, NBD_REP_ERR_INVALID);
  expect(fd, NBD_OPT_STRUCTURED_REPLY, "x", 1, NBD_REP_ERR_INVALID);

  /* SET_META before SR: INVALID; LIST_META before SR is answered. */
  const char *q[] = { "base:allocation", NULL };
  g_autofree guint8 *m = meta_payload("p", q, &len);
  expect(fd, NBD_OPT_SET_META_CONTEXT, m, len, NBD_REP_ERR_INVALID);
  send_opt(fd, NBD_OPT_LIST_META_CONTEXT, m, len);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_META_CONTEXT);
  g_assert_cmpuint(get32(r.data), ==, 0);
  g_assert_cmpmem(r.data + 4, r.len - 4, "base:allocation", 15);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_ACK);

  expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ACK);
  expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ERR_INVALID);

  /* Truncated SET_META: INVALID before any context; wrong export: UNKNOWN. */
  expect(fd, NBD_OPT_SET_META_CONTEXT, m, len - 3, NBD_REP_ERR_INVALID);
  g_autofree guint8 *m2 = meta_payload("nosuch", q, &len);
  expect(fd, NBD_OPT_SET_META_CONTEXT, m2, len, NBD_REP_ERR_UNKNOWN);
  /* Names without a colon or in unknown namespaces select nothing. */
  const char *junk[] = { "nocolon", "x-foo:bar", "base:", "qemu:", NULL };
  g_autofree guint8 *m3 = meta_payload("p", junk, &len);
  expect(fd, NBD_OPT_SET_META_CONTEXT, m3, len, NBD_REP_ACK);

  /* Malformed INFO: short, bad name length, wrong info count. */
  expect(fd, NBD_OPT_INFO, "abc", 3, NBD_REP_ERR_INVALID);
  guint8 bad[10] = { 0, 0, 0, 200, 'p', 0, 0 };
  expect(fd, NBD_OPT_INFO, bad, 7, NBD_REP_ERR_INVALID);
  guint16 one = NBD_INFO_NAME;
  g_autofree guint8 *ip = info_payload("p", &one, 1, &len);
  expect(fd, NBD_OPT_INFO, ip, len - 1, NBD_REP_ERR_INVALID);
  g_autofree guint8 *unk = info_payload("nosuch", NULL, 0, &len);
  expect(fd, NBD_OPT_INFO, unk, len, NBD_REP_ERR_UNKNOWN);

  /* INFO with NAME, DESCRIPTION, BLOCK_SIZE and an unknown request: all known ones + EXPORT. */
  guint16 infos[] = { NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE, 99 };
  g_autofree guint8 *full = info_payload("p", infos, 4, &len);
  send_opt(fd, NBD_OPT_INFO, full, len);
  guint seen = 0;
  for (;;) {
    g_assert_true(recv_reply(fd, &r));
    if (r.type == NBD_REP_ACK)
      break;
    g_assert_cmphex(r.type, ==, NBD_REP_INFO);
    guint16 t = (r.data[0] << 8) | r.data[1];
    seen |= 1u << t;
    if (t == NBD_INFO_NAME)
      g_assert_cmpmem(r.data + 2, r.len - 2, "p", 1);
    if (t == NBD_INFO_DESCRIPTION)
      g_assert_cmpmem(r.data + 2, r.len - 2, "probe export", 12);
    if (t == NBD_INFO_BLOCK_SIZE) {
      g_assert_cmpuint(r.len, ==, 14);
      g_assert_cmpuint(get32(r.data + 2), ==, 1);
      g_assert_cmpuint(get32(r.data + 6), ==, 4096);
      g_assert_cmpuint(get32(r.data + 10), ==, 32 * MiB);
    }
    if (t == NBD_INFO_EXPORT) {
      g_assert_cmpuint(r.len, ==, 12);
      g_assert_cmpuint(get64(r.data + 2), ==, 1 * MiB);
    }
  }
  g_assert_cmphex(seen, ==, 0xf);

  /* An oversized option is discarded unread and refused; the session goes on. */
  g_autofree guint8 *big = g_malloc0(2 * MiB);
  expect(fd, 99, big, 2 * MiB, NBD_REP_ERR_TOO_BIG);
  expect(fd, NBD_OPT_SET_META_CONTEXT, big, 2 * MiB, NBD_REP_ERR_TOO_BIG);

  /* LIST then GO works after all that. */
  send_opt(fd, NBD_OPT_LIST, NULL, 0);
  do
    g_assert_true(recv_reply(fd, &r));
  while (r.type == NBD_REP_SERVER);
  g_assert_cmphex(r.type, ==, NBD_REP_ACK);
  guint16 eflags = go(fd, "p", FALSE, NULL);
  g_assert_cmphex(eflags, ==, 0x058f); /* read-only: as qemu-nbd 7.2 with multi-conn */
  send_request(fd, 0, NBD_CMD_DISC, 1, 0, 0);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* ABORT: ACK, then the server closes. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  expect(fd, NBD_OPT_ABORT, NULL, 0, NBD_REP_ACK);
  g_assert_true(closed_by_server(fd));
  close(fd);
  return NULL;
}

static void
test_options(void)
{
  harness_run_client(probe_options, NULL);
  check_served();
}

static gpointer
probe_drops(gpointer data)
{
  /* Unknown client flag bits: dropped before any option. */
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* Bad option magic. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  guint8 h[16] = "IHAVEOPX";
  write_all(fd, h, 16);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* An option too big even to discard. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  send_opt(fd, 99, NULL, 0);
  OptReply r;
  g_assert_true(recv_reply(fd, &r));
  put64(h, NBD_IHAVEOPT);
  put32(h + 8, 99);
  put32(h + 12, 0xFFFFFFF0u);
  write_all(fd, h, 16);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* The option budget: a client that never ends negotiation is dropped. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  guint answered = 0;
  for (guint i = 0; i < 200; i++) {
    send_opt(fd, 99, NULL, 0);
    if (!recv_reply(fd, &r))
      break;
    answered++;
  }
  g_assert_cmpuint(answered, ==, 64);
  close(fd);

  /* EXPORT_NAME of an unknown export: no way to refuse but hanging up. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  send_opt(fd, NBD_OPT_EXPORT_NAME, "nosuch", 6);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* EXPORT_NAME: 134 bytes, or 10 with NO_ZEROES. */
  for (int nz = 0; nz < 2; nz++) {
    fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | (nz ? NBD_FLAG_C_NO_ZEROES : 0));
    send_opt(fd, NBD_OPT_EXPORT_NAME, "p", 1);
    guint8 reply[134];
    gsize want = nz ? 10 : 134;
    g_assert_true(read_all(fd, reply, want));
    g_assert_cmpuint(get64(reply), ==, 1 * MiB);
    g_assert_cmphex((reply[8] << 8) | reply[9], ==, 0x050f); /* no DF without SR */
    send_request(fd, 0, NBD_CMD_READ, 7, 128 * KiB, 16);
    g_assert_cmpuint(recv_simple(fd, 7), ==, 0);
    guint8 d[16];
    g_assert_true(read_all(fd, d, 16));
    g_assert_cmpint(d[0], ==, 0xC3);
    close(fd);
  }

  /* A client without FIXED_NEWSTYLE gets INVALID for anything but EXPORT_NAME. */
  fd = hello(0);
  expect(fd, NBD_OPT_LIST, NULL, 0, NBD_REP_ERR_INVALID);
  close(fd);
  return NULL;
}

static void
test_drops(void)
{
  harness_run_client(probe_drops, NULL);
  check_served();
}

static gpointer
probe_requests(gpointer data)
{
  const char *ctx[] = { "base:allocation", NULL };
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  go(fd, "p", TRUE, NULL);
  guint8 buf[64];

  send_request(fd, 0, 42, 1, 0, 512);
  expect_error(fd, 1, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_RESIZE, 2, 0, 0);
  expect_error(fd, 2, NBD_EINVAL);
  send_request(fd, 0x80, NBD_CMD_READ, 3, 0, 512);
  expect_error(fd, 3, NBD_EINVAL);
  send_request(fd, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 4, 0, 512);
  expect_error(fd, 4, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_READ, 5, 1 * MiB - 10, 20);
  expect_error(fd, 5, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_READ, 6, 2 * MiB, 1);
  expect_error(fd, 6, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_READ, 7, UINT64_MAX - 10, 100);
  expect_error(fd, 7, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_READ, 8, 0, 0);
  expect_error(fd, 8, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_READ, 9, 0, 33 * MiB);
  expect_error(fd, 9, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 10, 0, 512);
  expect_error(fd, 10, NBD_EINVAL); /* no context selected */
  /* A write to a read-only export: EPERM after the payload was consumed. */
  send_request(fd, 0, NBD_CMD_WRITE, 11, 0, 64);
  memset(buf, 'W', sizeof buf);
  write_all(fd, buf, sizeof buf);
  expect_error(fd, 11, NBD_EPERM);
  send_request(fd, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 12, 0, 512);
  expect_error(fd, 12, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_TRIM, 13, 0, 512);
  expect_error(fd, 13, NBD_EPERM);
  /* Still in sync: a good read. */
  send_request(fd, NBD_CMD_FLAG_DF, NBD_CMD_READ, 14, 128 * KiB, 64);
  guint32 plen;
  guint8 payload[128];
  g_assert_cmphex(recv_chunk(fd, 14, NULL, payload, &plen), ==, NBD_REPLY_TYPE_OFFSET_DATA);
  g_assert_cmpuint(plen, ==, 8 + 64);
  g_assert_cmpuint(get64(payload), ==, 128 * KiB);
  g_assert_cmpint(payload[8], ==, 0xC3);
  /* FLUSH with a non-zero offset is tolerated; FLUSH replies simply on success. */
  send_request(fd, 0, NBD_CMD_FLUSH, 15, 4096, 0);
  g_assert_cmpuint(recv_simple(fd, 15), ==, 0);
  /* Bad request magic: the stream is lost, the server hangs up. */
  guint8 junk[28] = { 0x25, 0x60, 0x95, 0x14 };
  write_all(fd, junk, sizeof junk);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* Block status with a context: REQ_ONE gives one extent no longer than asked. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  go(fd, "p", TRUE, ctx);
  send_request(fd, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 20, 100, 1000);
  g_assert_cmphex(recv_chunk(fd, 20, NULL, payload, &plen), ==, NBD_REPLY_TYPE_BLOCK_STATUS);
  g_assert_cmpuint(plen, ==, 12);
  g_assert_cmpuint(get32(payload + 4), ==, 1000);
  g_assert_cmpuint(get32(payload + 8), ==, NBD_STATE_HOLE | NBD_STATE_ZERO);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 21, 0, 0);
  expect_error(fd, 21, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 22, 1 * MiB, 1);
  expect_error(fd, 22, NBD_EINVAL);
  /* The longest answer ends 4 KiB-aligned, never at 0xFFFFFFFF. */
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 23, 0, 0xFFFFFFFFu);
  expect_error(fd, 23, NBD_EINVAL); /* past the end of a 1 MiB export */
  send_request(fd, 0, NBD_CMD_DISC, 24, 0, 0);
  g_assert_true(closed_by_server(fd));
  close(fd);

  /* Simple replies: errors come as simple replies. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  go(fd, "p", FALSE, NULL);
  send_request(fd, 0, NBD_CMD_READ, 30, 1 * MiB, 512);
  g_assert_cmpuint(recv_simple(fd, 30), ==, NBD_EINVAL);
  send_request(fd, NBD_CMD_FLAG_DF, NBD_CMD_READ, 31, 0, 512);
  g_assert_cmpuint(recv_simple(fd, 31), ==, NBD_EINVAL); /* DF not advertised without SR */
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 32, 0, 512);
  g_assert_cmpuint(recv_simple(fd, 32), ==, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_WRITE, 33, 0, 64);
  write_all(fd, buf, 64);
  g_assert_cmpuint(recv_simple(fd, 33), ==, NBD_EPERM);
  close(fd);
  return NULL;
}

static void
test_requests(void)
{
  harness_run_client(probe_requests, NULL);
  check_served();
}

/* A selection belongs to the export it was made for, and every SET replaces the last one. */
static gpointer
probe_meta_selection(gpointer data)
{
  const char *ctx[] = { "base:allocation", NULL };
  guint32 len;
  OptReply r;

  /* SET on "p", GO on "pw": no context in transmission. */
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ACK);
  g_autofree guint8 *m = meta_payload("p", ctx, &len);
  send_opt(fd, NBD_OPT_SET_META_CONTEXT, m, len);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_META_CONTEXT);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_ACK);
  go(fd, "pw", FALSE, NULL);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 1, 0, 4096);
  expect_error(fd, 1, NBD_EINVAL);
  close(fd);

  /* A failing SET (unknown export) wipes the earlier selection for the same export. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ACK);
  send_opt(fd, NBD_OPT_SET_META_CONTEXT, m, len);
  g_assert_true(recv_reply(fd, &r));
  g_assert_true(recv_reply(fd, &r));
  g_autofree guint8 *bad = meta_payload("nosuch", ctx, &len);
  expect(fd, NBD_OPT_SET_META_CONTEXT, bad, len, NBD_REP_ERR_UNKNOWN);
  go(fd, "p", FALSE, NULL);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 2, 0, 4096);
  expect_error(fd, 2, NBD_EINVAL);
  close(fd);

  /* Duplicates select once; ids are distinct and the status chunk carries the SET's id. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  expect(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0, NBD_REP_ACK);
  const char *twice[] = { "base:allocation", "base:allocation", NULL };
  g_autofree guint8 *m2 = meta_payload("p", twice, &len);
  send_opt(fd, NBD_OPT_SET_META_CONTEXT, m2, len);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_META_CONTEXT);
  guint32 id = get32(r.data);
  g_assert_true(recv_reply(fd, &r));
  g_assert_cmphex(r.type, ==, NBD_REP_ACK);
  go(fd, "p", FALSE, NULL);
  send_request(fd, 0, NBD_CMD_BLOCK_STATUS, 3, 0, 1 * MiB);
  guint8 payload[64];
  guint32 plen;
  g_assert_cmphex(recv_chunk(fd, 3, NULL, payload, &plen), ==, NBD_REPLY_TYPE_BLOCK_STATUS);
  g_assert_cmpuint(get32(payload), ==, id);
  g_assert_cmpuint(plen, ==, 4 + 3 * 8); /* hole, data, hole */
  close(fd);
  return NULL;
}

static void
test_meta_selection(void)
{
  harness_run_client(probe_meta_selection, NULL);
  check_served();
}

/* On an 8 GiB hole the longest answer ends 4 KiB-aligned, never at 0xFFFFFFFF (docs/nbd-server.md,
 * "Block status"). */
static gpointer
probe_status_cap(gpointer data)
{
  const char *ctx[] = { "base:allocation", NULL };
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  guint8 payload[64];
  guint32 plen;

  go(fd, "huge", TRUE, ctx);
  const guint64 offsets[] = { 0, 100, 4096, 0xFFFFF000ull };
  for (guint i = 0; i < G_N_ELEMENTS(offsets); i++) {
    send_request(fd, 0, NBD_CMD_BLOCK_STATUS, i, offsets[i], 0xFFFFFFFFu);
    g_assert_cmphex(recv_chunk(fd, i, NULL, payload, &plen), ==, NBD_REPLY_TYPE_BLOCK_STATUS);
    g_assert_cmpuint(plen, ==, 12);
    guint64 end = offsets[i] + get32(payload + 4);
    g_assert_cmpuint(end % 4096, ==, 0);
    g_assert_cmpuint(end, >, offsets[i] + 0xFFFFE000u);
  }
  send_request(fd, 0, NBD_CMD_DISC, 9, 0, 0);
  close(fd);
  return NULL;
}

static void
test_status_cap(void)
{
  harness_export("huge", 8ull << 30, NULL, NULL);
  harness_run_client(probe_status_cap, NULL);
  harness_unexport("huge");
}

static gpointer
probe_oversized_write(gpointer data)
{
  int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  go(fd, "pbig", TRUE, NULL);
  g_autofree guint8 *big = g_malloc0(33 * MiB);

  /* 33 MiB: refused with EINVAL, payload skipped without buffering, stream intact. */
  send_request(fd, 0, NBD_CMD_WRITE, 1, 0, 33 * MiB);
  write_all(fd, big, 33 * MiB);
  expect_error(fd, 1, NBD_EINVAL);
  /* Past the end: ENOSPC, payload skipped. */
  send_request(fd, 0, NBD_CMD_WRITE, 2, 64 * MiB - 10, 100);
  write_all(fd, big, 100);
  expect_error(fd, 2, NBD_ENOSPC);
  send_request(fd, 0, NBD_CMD_WRITE, 3, 0, 0);
  expect_error(fd, 3, NBD_EINVAL);
  send_request(fd, 0, NBD_CMD_FLUSH, 4, 0, 0);
  g_assert_cmpuint(recv_simple(fd, 4), ==, 0);
  /* Above twice the maximum: disconnected without reading it. */
  send_request(fd, 0, NBD_CMD_WRITE, 5, 0, 100 * MiB);
  g_assert_true(closed_by_server(fd));
  close(fd);
  return NULL;
}

static void
test_oversized_write(void)
{
  harness_export("pbig", 64 * MiB, NULL, "\"writable\": true");
  harness_run_client(probe_oversized_write, NULL);
  check_served();
  harness_unexport("pbig");
}

/* Clients that vanish part-way. */
static gpointer
probe_vanish(gpointer data)
{
  guint8 buf[4096] = { 0 };
  for (int i = 0; i < 6; i++) {
    int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    switch (i) {
    case 0: /* half an option header */
      write_all(fd, "IHAVEOPT\0\0", 10);
      break;
    case 1: /* an option header promising a payload */
      send_opt(fd, NBD_OPT_GO, NULL, 0);
      write_all(fd, buf, 0);
      {
        guint8 h[16];
        put64(h, NBD_IHAVEOPT);
        put32(h + 8, NBD_OPT_GO);
        put32(h + 12, 1000);
        write_all(fd, h, 16);
        write_all(fd, buf, 10);
      }
      break;
    case 2: /* half a request header */
      go(fd, "pw", TRUE, NULL);
      write_all(fd, "\x25\x60\x95\x13\0\0", 6);
      break;
    case 3: /* a write with half its payload */
      go(fd, "pw", TRUE, NULL);
      send_request(fd, 0, NBD_CMD_WRITE, 1, 0, 4096);
      write_all(fd, buf, 1000);
      break;
    case 4: /* a big read, gone before the reply */
      go(fd, "pw", TRUE, NULL);
      send_request(fd, 0, NBD_CMD_READ, 1, 0, 2 * MiB);
      break;
    case 5: /* nothing at all after the flags */
      break;
    }
    close(fd);
  }
  return NULL;
}

static void
test_vanish(void)
{
  harness_run_client(probe_vanish, NULL);
  harness_spin(50);
  check_served();
}

static gpointer
probe_timeout(gpointer data)
{
  int fd = harness_connect_raw();
  guint8 g[18];
  gint64 t0 = g_get_monotonic_time();
  g_assert_true(read_all(fd, g, sizeof g));
  g_assert_true(closed_by_server(fd)); /* never sent client flags */
  gint64 waited = g_get_monotonic_time() - t0;
  g_assert_cmpint(waited, >=, 250 * 1000);
  g_assert_cmpint(waited, <, 5 * G_USEC_PER_SEC);
  close(fd);

  /* Slow options also count: the deadline covers the whole handshake. */
  fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  OptReply r;
  gboolean dropped = FALSE;
  for (int i = 0; i < 20 && !dropped; i++) {
    g_usleep(50 * 1000);
    send_opt(fd, 99, NULL, 0);
    dropped = !recv_reply(fd, &r);
  }
  g_assert_true(dropped);
  close(fd);
  return NULL;
}

static void
test_handshake_timeout(void)
{
  cbt_nbd_set_handshake_timeout(300);
  harness_run_client(probe_timeout, NULL);
  cbt_nbd_set_handshake_timeout(10000);
  check_served();
}

/* 10,000 malformed requests, 300 clients vanishing mid-request, bounded memory growth. */
static gpointer
probe_stress(gpointer data)
{
  guint8 buf[512] = { 0 };
  for (int c = 0; c < 10; c++) {
    int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    go(fd, "pw", TRUE, NULL);
    for (guint i = 0; i < 1000; i++) {
      switch (i % 5) {
      case 0:
        send_request(fd, 0, 100 + i % 50, i, 0, 512);
        break;
      case 1:
        send_request(fd, 0x8000, NBD_CMD_READ, i, 0, 512);
        break;
      case 2:
        send_request(fd, 0, NBD_CMD_READ, i, 3 * MiB, 512);
        break;
      case 3:
        send_request(fd, 0, NBD_CMD_READ, i, 0, 0);
        break;
      case 4:
        send_request(fd, 0, NBD_CMD_WRITE, i, 2 * MiB, 512);
        write_all(fd, buf, sizeof buf);
        break;
      }
      expect_error(fd, i, i % 5 == 4 ? NBD_ENOSPC : NBD_EINVAL);
    }
    close(fd);
  }
  for (int c = 0; c < 300; c++) {
    int fd = hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    go(fd, "pw", TRUE, NULL);
    send_request(fd, 0, NBD_CMD_WRITE, 1, 0, 65536);
    write_all(fd, buf, c % 2 ? 100 : 0);
    close(fd);
  }
  return NULL;
}

static void
test_stress(void)
{
  harness_run_client(probe_stress, NULL); /* warm-up: thread stacks, allocator arenas */
  harness_spin(200);
  guint64 before = harness_rss_kib();
  harness_run_client(probe_stress, NULL);
  harness_spin(200);
  guint64 after = harness_rss_kib();
  g_test_message("RSS %" G_GUINT64_FORMAT " KiB -> %" G_GUINT64_FORMAT " KiB", before, after);
  g_assert_cmpuint(after, <, before + 16 * 1024); /* < 16 MiB growth for a repeat run */
  check_served();
}

static gpointer
probe_max_conn(gpointer data)
{
  /* With max-connections 1 a second client waits in the backlog until the first leaves. */
  int a = hello(NBD_FLAG_C_FIXED_NEWSTYLE);
  int b = harness_connect_raw();
  g_assert_cmpint(b, >=, 0);
  struct timeval tv = { .tv_sec = 0, .tv_usec = 300 * 1000 };
  setsockopt(b, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  guint8 g[18];
  g_assert_cmpint(recv(b, g, sizeof g, 0), ==, -1); /* no greeting yet */
  g_assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
  close(a);
  tv.tv_sec = 5;
  setsockopt(b, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  g_assert_true(read_all(b, g, sizeof g));
  g_assert_cmpuint(get64(g), ==, NBD_MAGIC);
  close(b);
  return NULL;
}

static gpointer
client_single_conn_flags(gpointer data)
{
  struct nbd_handle *h = nbd_create();
  nbd_set_export_name(h, "p");
  g_assert_cmpint(nbd_connect_unix(h, harness.sock), ==, 0);
  g_assert_cmpint(nbd_can_multi_conn(h), ==, 0);
  nbd_shutdown(h, 0);
  nbd_close(h);
  return NULL;
}

static void
test_max_connections(void)
{
  harness_qmp_ok("nbd-server-stop", NULL);
  harness_qmp_fails("nbd-server-stop", NULL, "NBD server not running");
  harness_qmp_fails("block-export-add",
                    "{\"type\": \"nbd\", \"id\": \"p\", \"node-name\": "
                    "\"n-p\"}",
                    "NBD server not running");
  g_autofree char *args = g_strdup_printf(
    "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}, \"max-connections\": 1}",
    harness.sock);
  harness_qmp_ok("nbd-server-start", args);
  harness_qmp_ok("block-export-add",
                 "{\"type\": \"nbd\", \"id\": \"p\", \"node-name\": "
                 "\"n-p\", \"name\": \"p\", \"description\": \"probe export\"}");
  harness_run_client(probe_max_conn, NULL);
  harness_spin(50);
  harness_run_client(client_single_conn_flags, NULL);
}

static void
test_server_start_errors(void)
{
  harness_qmp_ok("nbd-server-stop", NULL);
  harness_qmp_fails("nbd-server-start",
                    "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": "
                    "\"/nonexistent/dir/x.sock\"}}}",
                    "Failed to bind socket to /nonexistent/dir/x.sock: No such file or directory");
  harness_qmp_fails("nbd-server-start",
                    "{\"addr\": {\"type\": \"fd\", \"data\": {\"str\": "
                    "\"3\"}}}",
                    "only QEMU supports file descriptor passing");
  harness_qmp_fails("nbd-server-start",
                    "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": "
                    "\"/tmp/x\"}}, \"tls-creds\": \"nope\"}",
                    "No TLS credentials with id 'nope'");
  harness_qmp_fails("nbd-server-start", "{\"addr\": {\"type\": \"unix\", \"path\": \"/tmp/x\"}}",
                    "Parameter 'addr.data' is missing");
  harness_qmp_fails("nbd-server-start",
                    "{\"addr\": {\"type\": \"inet\", \"data\": {\"host\": "
                    "\"127.0.0.1\", \"port\": \"10809\"}}, \"max-connections\": -1}",
                    "Parameter 'max-connections' expects uint32_t");
  /* inet on loopback works, and the server can be stopped and started again. */
  harness_qmp_ok("nbd-server-start", "{\"addr\": {\"type\": \"inet\", \"data\": {\"host\": "
                                     "\"127.0.0.1\", \"port\": \"0\"}}}");
  harness_qmp_ok("nbd-server-stop", NULL);
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  harness_init();

  const guint64 data[] = { 128 * KiB, 64 * KiB, 0xC3, 0, 0, 0 };
  g_autofree char *img = harness_image("p.img", 1 * MiB, data);
  harness_add_node("n-p", img, FALSE);
  harness_qmp_ok("block-export-add", "{\"type\": \"nbd\", \"id\": \"p\", \"node-name\": \"n-p\", "
                                     "\"name\": \"p\", \"description\": \"probe export\"}");
  harness_export("pw", 2 * MiB, NULL, "\"writable\": true");

  g_test_add_func("/nbd-probe/options", test_options);
  g_test_add_func("/nbd-probe/drops", test_drops);
  g_test_add_func("/nbd-probe/requests", test_requests);
  g_test_add_func("/nbd-probe/meta-selection", test_meta_selection);
  g_test_add_func("/nbd-probe/status-cap", test_status_cap);
  g_test_add_func("/nbd-probe/oversized-write", test_oversized_write);
  g_test_add_func("/nbd-probe/vanish", test_vanish);
  g_test_add_func("/nbd-probe/handshake-timeout", test_handshake_timeout);
  g_test_add_func("/nbd-probe/stress", test_stress);
  g_test_add_func("/nbd-probe/max-connections", test_max_connections);
  g_test_add_func("/nbd-probe/server-start-errors", test_server_start_errors);
  int ret = g_test_run();
  harness_fini();
  return ret;
}
