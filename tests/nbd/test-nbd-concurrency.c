/* tests/nbd/test-nbd-concurrency.c — many requests in flight on one connection: out-of-order
 * completion checked per request against a shadow copy, FLUSH ordering, DISC with requests in
 * flight, and hard export deletion and server shutdown during heavy I/O.
 */
#include <errno.h>
#include <libnbd.h>
#include <poll.h>
#include <string.h>

#include "harness.h"
#include "nbd/nbd.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define BLOCK (64 * KiB)
#define SIZE (64 * MiB)
#define NBLOCKS (SIZE / BLOCK)
#define INFLIGHT 64

static struct nbd_handle *
open_export(const char *name)
{
  struct nbd_handle *h = nbd_create();
  g_assert_nonnull(h);
  g_assert_cmpint(nbd_set_export_name(h, name), ==, 0);
  if (nbd_connect_unix(h, harness.sock) < 0)
    g_error("connect to '%s': %s", name, nbd_get_error());
  return h;
}

/* --- 64 in flight, verified against a shadow ------------------------------------------------ */

typedef struct Mix Mix;
typedef struct {
  Mix *mix;
  guint64 seq; /* submission order */
  guint block;
  gboolean write;
  gsize len;
  guint8 *buf;
} Op;

struct Mix {
  guint8 *shadow;
  gboolean busy[NBLOCKS]; /* a block with a request in flight is not touched again */
  guint64 submitted, completed, last_done_seq, out_of_order;
  guint inflight;
  GRand *rand;
};

static int
op_done(void *data, int *error)
{
  Op *op = data;
  Mix *m = op->mix;

  g_assert_cmpint(*error, ==, 0);
  if (!op->write)
    g_assert_cmpmem(op->buf, op->len, m->shadow + op->block * BLOCK, op->len);
  if (op->seq < m->last_done_seq)
    m->out_of_order++;
  m->last_done_seq = MAX(m->last_done_seq, op->seq);
  m->busy[op->block] = FALSE;
  m->completed++;
  m->inflight--;
  g_free(op->buf);
  g_free(op);
  return 1;
}

static void
submit_one(struct nbd_handle *h, Mix *m)
{
  Op *op = g_new0(Op, 1);
  guint block;

  do
    block = g_rand_int_range(m->rand, 0, NBLOCKS);
  while (m->busy[block]);
  op->mix = m;
  op->seq = m->submitted++;
  op->block = block;
  op->write = g_rand_boolean(m->rand);
  /* Sizes on both sides of the copy / zero-copy and inline limits. */
  static const gsize lens[] = { 512, 4096, 60 * KiB, 64 * KiB };
  op->len = lens[g_rand_int_range(m->rand, 0, G_N_ELEMENTS(lens))];
  op->buf = g_malloc(op->len);
  m->busy[block] = TRUE;
  m->inflight++;
  nbd_completion_callback cb = { .callback = op_done, .user_data = op };
  int64_t cookie;
  if (op->write) {
    for (gsize i = 0; i < op->len; i++)
      op->buf[i] = (guint8)g_rand_int(m->rand);
    memcpy(m->shadow + block * BLOCK, op->buf, op->len);
    /* Some FUA writes: slower, served by workers, so later requests overtake them. */
    guint32 flags = g_rand_int_range(m->rand, 0, 8) == 0 ? LIBNBD_CMD_FLAG_FUA : 0;
    cookie = nbd_aio_pwrite(h, op->buf, op->len, block * BLOCK, cb, flags);
  } else {
    cookie = nbd_aio_pread(h, op->buf, op->len, block * BLOCK, cb, 0);
  }
  g_assert_cmpint(cookie, >, 0);
}

static gpointer
client_inflight(gpointer data)
{
  struct nbd_handle *h = open_export("conc");
  Mix m = { .shadow = g_malloc0(SIZE), .rand = g_rand_new_with_seed(42) };
  const guint64 total = 20000;

  while (m.completed < total) {
    while (m.inflight < INFLIGHT && m.submitted < total)
      submit_one(h, &m);
    g_assert_cmpint(nbd_aio_in_flight(h), <=, INFLIGHT);
    g_assert_cmpint(nbd_poll(h, -1), >=, 0);
  }
  /* Whole-disk readback with long (zero-copy) reads. */
  g_autofree guint8 *buf = g_malloc(4 * MiB);
  for (guint64 off = 0; off < SIZE; off += 4 * MiB) {
    g_assert_cmpint(nbd_pread(h, buf, 4 * MiB, off, 0), ==, 0);
    g_assert_cmpmem(buf, 4 * MiB, m.shadow + off, 4 * MiB);
  }
  g_test_message("%" G_GUINT64_FORMAT " requests, %" G_GUINT64_FORMAT " completed out of order",
                 m.completed, m.out_of_order);
  g_assert_cmpuint(m.out_of_order, >, 0);
  nbd_shutdown(h, 0);
  nbd_close(h);
  g_rand_free(m.rand);
  g_free(m.shadow);
  return NULL;
}

static void
test_inflight(void)
{
  harness_export("conc", SIZE, NULL, "\"writable\": true");
  harness_run_client(client_inflight, NULL);
  harness_unexport("conc");
}

/* --- FLUSH after writes ---------------------------------------------------------------------- */

typedef struct {
  guint writes_done;
  guint writes_done_at_flush;
  gboolean flushed;
} FlushState;

static int
write_done(void *data, int *error)
{
  FlushState *s = data;
  g_assert_cmpint(*error, ==, 0);
  g_assert_false(s->flushed);
  s->writes_done++;
  return 1;
}

static int
flush_done(void *data, int *error)
{
  FlushState *s = data;
  g_assert_cmpint(*error, ==, 0);
  s->writes_done_at_flush = s->writes_done;
  s->flushed = TRUE;
  return 1;
}

/* A FLUSH answers only after every write sent before it on the connection has been answered. */
static gpointer
client_flush(gpointer data)
{
  struct nbd_handle *h = open_export("conc");
  g_autofree guint8 *buf = g_malloc(256 * KiB);

  memset(buf, 0x5a, 256 * KiB);
  for (guint round = 0; round < 20; round++) {
    FlushState s = { 0 };
    const guint n = 48;
    for (guint i = 0; i < n; i++) {
      /* Long and FUA writes go to workers and finish late. */
      gsize len = i % 3 == 0 ? 256 * KiB : 4 * KiB;
      guint32 flags = i % 5 == 0 ? LIBNBD_CMD_FLAG_FUA : 0;
      nbd_completion_callback cb = { .callback = write_done, .user_data = &s };
      g_assert_cmpint(nbd_aio_pwrite(h, buf, len, (guint64)i * 256 * KiB, cb, flags), >, 0);
    }
    nbd_completion_callback fcb = { .callback = flush_done, .user_data = &s };
    g_assert_cmpint(nbd_aio_flush(h, fcb, 0), >, 0);
    while (!s.flushed)
      g_assert_cmpint(nbd_poll(h, -1), >=, 0);
    g_assert_cmpuint(s.writes_done_at_flush, ==, n);
  }
  nbd_shutdown(h, 0);
  nbd_close(h);
  return NULL;
}

static void
test_flush(void)
{
  harness_export("conc", SIZE, NULL, "\"writable\": true");
  harness_run_client(client_flush, NULL);
  harness_unexport("conc");
}

/* --- DISC with requests in flight ------------------------------------------------------------ */

static int
count_ok(void *data, int *error)
{
  if (*error == 0)
    (*(guint *)data)++;
  return 1;
}

static gpointer
client_disc(gpointer data)
{
  for (guint round = 0; round < 10; round++) {
    struct nbd_handle *h = open_export("conc");
    guint ok = 0;
    g_autofree guint8 *buf = g_malloc(64 * 256 * KiB);
    for (guint i = 0; i < 64; i++) {
      nbd_completion_callback cb = { .callback = count_ok, .user_data = &ok };
      guint8 *b = buf + i * 256 * KiB;
      gsize len = i % 2 ? 256 * KiB : 4 * KiB;
      int64_t c = i % 4 == 3 ? nbd_aio_pwrite(h, b, len, i * 256 * KiB, cb, LIBNBD_CMD_FLAG_FUA)
                             : nbd_aio_pread(h, b, len, i * 256 * KiB, cb, 0);
      g_assert_cmpint(c, >, 0);
    }
    /* DISC goes out behind the 64 requests; the server must answer all of them first. */
    g_assert_cmpint(nbd_aio_disconnect(h, 0), ==, 0);
    while (!nbd_aio_is_closed(h) && !nbd_aio_is_dead(h))
      g_assert_cmpint(nbd_poll(h, -1), >=, 0);
    g_assert_cmpint(nbd_aio_is_closed(h), ==, 1);
    g_assert_cmpuint(ok, ==, 64);
    nbd_close(h);
  }
  return NULL;
}

static void
test_disc(void)
{
  harness_export("conc", SIZE, NULL, "\"writable\": true");
  harness_run_client(client_disc, NULL);
  harness_unexport("conc");
}

/* --- hard delete and shutdown under load ----------------------------------------------------- */

#define LOADERS 4

typedef struct {
  const char *export;
  gint *done;
  gint ops; /* submitted (atomic) */
} Loader;

static int
load_done(void *data, int *error)
{
  (*(guint *)data)--;
  return 1;
}

/* 64 in flight until the server drops the connection. */
static gpointer
loader(gpointer data)
{
  Loader *l = data;
  struct nbd_handle *h = open_export(l->export);
  g_autofree guint8 *buf = g_malloc0(INFLIGHT * 128 * KiB);
  guint inflight = 0;
  GRand *rand = g_rand_new_with_seed(7);

  for (;;) {
    while (inflight < INFLIGHT) {
      guint i = g_rand_int_range(rand, 0, INFLIGHT);
      guint64 off = g_rand_int_range(rand, 0, SIZE / (128 * KiB)) * 128 * KiB;
      gsize len = g_rand_boolean(rand) ? 128 * KiB : 4 * KiB;
      nbd_completion_callback cb = { .callback = load_done, .user_data = &inflight };
      int64_t c = g_rand_boolean(rand) ? nbd_aio_pwrite(h, buf + i * 128 * KiB, len, off, cb, 0)
                                       : nbd_aio_pread(h, buf + i * 128 * KiB, len, off, cb, 0);
      if (c < 0)
        goto out;
      inflight++;
      g_atomic_int_inc(&l->ops);
    }
    if (nbd_poll(h, -1) < 0 || nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
      break;
  }
out:
  nbd_close(h);
  g_rand_free(rand);
  g_atomic_int_inc(l->done);
  g_main_context_wakeup(NULL);
  return NULL;
}

static void
run_loaders(const char *export, void (*stop)(const char *export))
{
  gint done = 0;
  Loader l[LOADERS];
  GThread *t[LOADERS];

  for (guint i = 0; i < LOADERS; i++) {
    l[i] = (Loader){ .export = export, .done = &done };
    t[i] = g_thread_new("loader", loader, &l[i]);
  }
  /* Stop only once every client has a full queue going (slow under sanitizers). */
  for (guint i = 0; i < LOADERS; i++) {
    while (g_atomic_int_get(&l[i].ops) < 4 * INFLIGHT)
      harness_spin(10);
  }
  stop(export);
  while (g_atomic_int_get(&done) < LOADERS)
    g_main_context_iteration(NULL, TRUE);
  for (guint i = 0; i < LOADERS; i++) {
    g_thread_join(t[i]);
    g_assert_cmpint(g_atomic_int_get(&l[i].ops), >=, 4 * INFLIGHT);
  }
}

static void
hard_delete(const char *export)
{
  g_autofree char *args = g_strdup_printf("{\"id\": \"%s\", \"mode\": \"hard\"}", export);
  harness_qmp_ok("block-export-del", args);
}

static void
test_hard_delete(void)
{
  for (guint round = 0; round < 3; round++) {
    harness_export("load", SIZE, NULL, "\"writable\": true");
    run_loaders("load", hard_delete);
    /* Gone for good: the node is free again and the id reusable. */
    harness_spin(50);
    g_autoptr(JsonNode) q = harness_qmp("query-block-exports", NULL, NULL);
    g_autofree char *text = json_to_string(q, FALSE);
    g_assert_null(strstr(text, "\"load\""));
    harness_qmp_ok("blockdev-del", "{\"node-name\": \"n-load\"}");
  }
}

static void
shutdown_server(const char *export)
{
  cbt_nbd_shutdown();
}

static void
test_shutdown(void)
{
  harness_export("last", SIZE, NULL, "\"writable\": true");
  run_loaders("last", shutdown_server);
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  harness_init();
  g_test_add_func("/nbd-concurrency/inflight-64", test_inflight);
  g_test_add_func("/nbd-concurrency/flush-after-writes", test_flush);
  g_test_add_func("/nbd-concurrency/disc-in-flight", test_disc);
  g_test_add_func("/nbd-concurrency/hard-delete-under-load", test_hard_delete);
  g_test_add_func("/nbd-concurrency/shutdown-under-load", test_shutdown);
  int r = g_test_run();
  harness_fini();
  return r;
}
