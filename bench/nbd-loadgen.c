/* nbd-loadgen: drive an NBD server with fixed-size requests on libnbd's asynchronous API.
 *
 *   nbd-loadgen URI [--op read|write] [--bs N] [--depth N] [--seconds S | --count N]
 *               [--spread N] [--verify] [--seed N]
 *   nbd-loadgen URI --connect-cycles N
 *
 * Offsets are random blocks of the export, or with --spread N one block in each of N equal
 * stripes (the k-th request goes to a permuted stripe, so N requests touch N distinct
 * 64 KiB chunks). --verify writes --count spread blocks with a pattern derived from the
 * offset, reads them all back and checks every byte: it is how the tool is tested.
 * One result line on stdout, key=value pairs, so bench/run can parse it.
 */
#include <glib.h>
#include <libnbd.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHUNK (64 * 1024)

typedef struct Loadgen Loadgen;

typedef struct {
  Loadgen *lg;
  guint64 offset;
  guchar *buf;
} Slot;

struct Loadgen {
  struct nbd_handle *h;
  guint64 size;
  gboolean write;
  gboolean checking; /* reads compare against the pattern */
  guint bs;
  guint depth;
  guint64 seed;
  guint64 rng;
  guint64 spread, stride, step; /* stripes, their size, the permutation's multiplier */
  Slot *slots;
  guint *free_slots;
  guint n_free;
  guint64 issued, completed, errors, mismatches;
};

static gchar *opt_op = "read";
static gint opt_bs = 4096;
static gint opt_depth = 1;
static gdouble opt_seconds = 0;
static gint64 opt_count = 0;
static gint64 opt_spread = 0;
static gint64 opt_seed = 1;
static gboolean opt_verify = FALSE;
static gint opt_cycles = 0;

static GOptionEntry entries[] = {
  { "op", 0, 0, G_OPTION_ARG_STRING, &opt_op, "read or write", "OP" },
  { "bs", 0, 0, G_OPTION_ARG_INT, &opt_bs, "request size in bytes(4096)", "N" },
  { "depth", 0, 0, G_OPTION_ARG_INT, &opt_depth, "requests in flight(1)", "N" },
  { "seconds", 0, 0, G_OPTION_ARG_DOUBLE, &opt_seconds, "run for this long", "S" },
  { "count", 0, 0, G_OPTION_ARG_INT64, &opt_count, "run this many requests", "N" },
  { "spread", 0, 0, G_OPTION_ARG_INT64, &opt_spread, "one block in each of N stripes", "N" },
  { "seed", 0, 0, G_OPTION_ARG_INT64, &opt_seed, "random seed(1)", "N" },
  { "verify", 0, 0, G_OPTION_ARG_NONE, &opt_verify, "write --count blocks, read back, check",
    NULL },
  { "connect-cycles", 0, 0, G_OPTION_ARG_INT, &opt_cycles, "time N connect/GO/disconnect", "N" },
  { NULL },
};

static double
now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static guint64
mix(guint64 x)
{
  /* splitmix64 finaliser: a cheap, well-spread hash for offsets and patterns. */
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static void
die_nbd(const char *what)
{
  g_printerr("nbd-loadgen: %s: %s\n", what, nbd_get_error());
  exit(1);
}

static void
fill_pattern(const Loadgen *lg, guint64 offset, guchar *buf)
{
  for (guint i = 0; i < lg->bs; i += 8) {
    guint64 w = mix(offset + i + lg->seed * 0x100000001b3ULL);
    memcpy(buf + i, &w, MIN(8u, lg->bs - i));
  }
}

static gboolean
check_pattern(const Loadgen *lg, guint64 offset, const guchar *buf)
{
  guchar want[8];
  for (guint i = 0; i < lg->bs; i += 8) {
    guint64 w = mix(offset + i + lg->seed * 0x100000001b3ULL);
    memcpy(want, &w, 8);
    if (memcmp(buf + i, want, MIN(8u, lg->bs - i)) != 0)
      return FALSE;
  }
  return TRUE;
}

/* Offset of the k-th request: stripe (k * step) mod spread, a block inside it chosen by hash. */
static guint64
next_offset(Loadgen *lg, guint64 k)
{
  if (lg->spread) {
    guint64 stripe = (k % lg->spread) * lg->step % lg->spread;
    guint64 blocks = lg->stride / lg->bs;
    return stripe * lg->stride + (mix(stripe ^ lg->seed) % blocks) * lg->bs;
  }
  lg->rng ^= lg->rng << 13;
  lg->rng ^= lg->rng >> 7;
  lg->rng ^= lg->rng << 17;
  return (lg->rng % (lg->size / lg->bs)) * lg->bs;
}

static int
on_complete(void *opaque, int *error)
{
  Slot *s = opaque;
  Loadgen *lg = s->lg;

  if (*error) {
    if (lg->errors++ == 0)
      g_printerr("nbd-loadgen: request at %" PRIu64 " failed: %s\n", s->offset, g_strerror(*error));
  } else if (lg->checking && !check_pattern(lg, s->offset, s->buf)) {
    if (lg->mismatches++ == 0)
      g_printerr("nbd-loadgen: data mismatch at offset %" PRIu64 "\n", s->offset);
  }
  lg->completed++;
  lg->free_slots[lg->n_free++] = s - lg->slots;
  return 1;
}

static void
issue(Loadgen *lg)
{
  Slot *s = &lg->slots[lg->free_slots[--lg->n_free]];
  nbd_completion_callback cb = { .callback = on_complete, .user_data = s };
  int64_t r;

  s->offset = next_offset(lg, lg->issued++);
  if (lg->write) {
    fill_pattern(lg, s->offset, s->buf);
    r = nbd_aio_pwrite(lg->h, s->buf, lg->bs, s->offset, cb, 0);
  } else {
    r = nbd_aio_pread(lg->h, s->buf, lg->bs, s->offset, cb, 0);
  }
  if (r == -1)
    die_nbd(lg->write ? "nbd_aio_pwrite" : "nbd_aio_pread");
}

/* Keep `depth` requests in flight until `count` were issued or `seconds` passed. */
static double
run_phase(Loadgen *lg, guint64 count, double seconds)
{
  double start = now();
  double deadline = start + seconds;

  lg->issued = lg->completed = 0;
  for (;;) {
    while (lg->n_free > 0 && (count ? lg->issued < count : now() < deadline))
      issue(lg);
    if (lg->completed == lg->issued)
      break;
    if (nbd_poll(lg->h, -1) == -1)
      die_nbd("nbd_poll");
  }
  return now() - start;
}

/* The URI is our own command line, so the files it names are the caller's choice: libnbd
 * refuses tls-certificates=DIR (and tls-psk-file=) unless local file access is allowed. */
static struct nbd_handle *
connect_uri(const char *uri)
{
  struct nbd_handle *h = nbd_create();

  if (!h || nbd_set_uri_allow_local_file(h, true) == -1 || nbd_connect_uri(h, uri) == -1)
    die_nbd("nbd_connect_uri");
  return h;
}

static int
connect_cycles(const char *uri, int cycles)
{
  double start = now();

  for (int i = 0; i < cycles; i++) {
    struct nbd_handle *h = connect_uri(uri);
    if (nbd_shutdown(h, 0) == -1)
      die_nbd("nbd_shutdown");
    nbd_close(h);
  }
  double secs = now() - start;
  printf("cycles=%d seconds=%.6f per_cycle_us=%.1f\n", cycles, secs, secs * 1e6 / cycles);
  return 0;
}

static void
setup_spread(Loadgen *lg, guint64 spread)
{
  lg->spread = spread;
  lg->stride = lg->size / spread;
  /* Stripes of whole chunks keep N requests in N distinct bitmap chunks. */
  lg->stride -= lg->stride % (lg->stride >= CHUNK ? CHUNK : lg->bs);
  if (lg->stride < lg->bs) {
    g_printerr("nbd-loadgen: export too small for --spread %" PRIu64 "\n", spread);
    exit(2);
  }
  /* Any step coprime with spread is a permutation; search upward from the golden ratio. */
  for (lg->step = MAX(2654435761ULL % spread, 1);; lg->step++) {
    guint64 a = lg->step, b = spread;
    while (b) {
      guint64 t = a % b;
      a = b;
      b = t;
    }
    if (a == 1)
      break;
  }
}

static Loadgen *
loadgen_new(const char *uri)
{
  Loadgen *lg = g_new0(Loadgen, 1);
  int64_t size;

  lg->h = connect_uri(uri);
  if ((size = nbd_get_size(lg->h)) == -1)
    die_nbd("nbd_get_size");
  lg->size = size;
  lg->bs = opt_bs;
  lg->depth = opt_depth;
  lg->seed = opt_seed;
  lg->rng = mix(opt_seed) | 1;
  lg->slots = g_new0(Slot, lg->depth);
  lg->free_slots = g_new(guint, lg->depth);
  for (guint i = 0; i < lg->depth; i++) {
    lg->slots[i].lg = lg;
    lg->slots[i].buf = g_malloc(lg->bs);
    lg->free_slots[lg->n_free++] = i;
  }
  if (lg->size < lg->bs) {
    g_printerr("nbd-loadgen: export smaller than one request\n");
    exit(2);
  }
  return lg;
}

static void
loadgen_free(Loadgen *lg)
{
  for (guint i = 0; i < lg->depth; i++)
    g_free(lg->slots[i].buf);
  g_free(lg->slots);
  g_free(lg->free_slots);
  if (lg->h)
    nbd_close(lg->h);
  g_free(lg);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Loadgen, loadgen_free)

static void
report(const char *what, guint64 ops, double secs)
{
  printf("%s ops=%" PRIu64 " seconds=%.6f iops=%.0f\n", what, ops, secs, ops / secs);
}

int
main(int argc, char **argv)
{
  g_autoptr(GOptionContext) ctx = g_option_context_new("URI");
  g_autoptr(GError) err = NULL;

  g_option_context_add_main_entries(ctx, entries, NULL);
  if (!g_option_context_parse(ctx, &argc, &argv, &err) || argc != 2) {
    g_printerr("nbd-loadgen: %s\n", err ? err->message : "exactly one URI expected");
    return 2;
  }
  if (opt_cycles > 0)
    return connect_cycles(argv[1], opt_cycles);
  if (opt_bs <= 0 || opt_bs % 8 || opt_depth <= 0 || opt_depth > 1024 ||
      (opt_seconds <= 0 && opt_count <= 0) || (opt_verify && opt_count <= 0) || opt_spread < 0 ||
      (strcmp(opt_op, "read") && strcmp(opt_op, "write"))) {
    g_printerr("nbd-loadgen: bad options(see --help)\n");
    return 2;
  }

  g_autoptr(Loadgen) lg = loadgen_new(argv[1]);
  if (opt_verify)
    setup_spread(lg, opt_spread ? opt_spread : opt_count);
  else if (opt_spread)
    setup_spread(lg, opt_spread);

  lg->write = opt_verify || strcmp(opt_op, "write") == 0;
  double secs = run_phase(lg, opt_count, opt_seconds);
  guint64 ops = lg->completed;
  report(lg->write ? "write" : "read", ops, secs);
  if (opt_verify) {
    lg->write = FALSE;
    lg->checking = TRUE;
    secs = run_phase(lg, opt_count, 0);
    report("verify", lg->completed, secs);
    printf("verified=%" PRIu64 " mismatches=%" PRIu64 "\n",
           lg->completed - lg->mismatches - lg->errors, lg->mismatches);
  }
  if (nbd_shutdown(lg->h, 0) == -1)
    die_nbd("nbd_shutdown");
  return lg->errors || lg->mismatches ? 1 : 0;
}
