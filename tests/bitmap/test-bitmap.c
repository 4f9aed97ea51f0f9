/* tests/bitmap/test-bitmap.c — CbtBitmap against a naive shadow under random operations.
 *
 * The shadow is a plain bit array for small bitmaps and a hash set of chunk indices for huge
 * ones (only touched windows of the device are used there). After every operation the count is
 * compared; get/next_dirty/next_clean are probed at random points; every few operations the
 * whole bitmap is compared (dirty runs and the serialized stream). Fixed seeds plus one random
 * seed, printed, so a failure can be replayed with CBT_TEST_SEED.
 */
#include <string.h>

#include "bitmap/bitmap.h"

#define KiB (G_GUINT64_CONSTANT(1) << 10)
#define MiB (G_GUINT64_CONSTANT(1) << 20)
#define GiB (G_GUINT64_CONSTANT(1) << 30)
#define TiB (G_GUINT64_CONSTANT(1) << 40)
#define PiB (G_GUINT64_CONSTANT(1) << 50)

/* A flat shadow is used up to this many chunks. */
#define FLAT_LIMIT (G_GUINT64_CONSTANT(1) << 20)
/* Huge bitmaps are exercised inside windows of this many chunks. */
#define WINDOW (G_GUINT64_CONSTANT(1) << 14)
#define NWINDOWS 5

typedef struct {
  guint64 size;
  guint32 gran;
  guint64 nbits;
  guint8 *flat;    /* one bit per chunk, or NULL */
  GHashTable *set; /* guint64 chunk indices, when not flat */
  guint64 count;
  guint64 win[NWINDOWS]; /* first chunk of each window */
  guint nwin;
} Shadow;

static void
shadow_init(Shadow *s, guint64 size, guint32 gran, GRand *r)
{
  memset(s, 0, sizeof(*s));
  s->size = size;
  s->gran = gran;
  s->nbits = (size + gran - 1) / gran;
  if (s->nbits <= FLAT_LIMIT) {
    s->flat = g_malloc0((s->nbits + 63) / 64 * 8 + 8);
    s->win[0] = 0;
    s->nwin = 1;
    return;
  }
  s->set = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free, NULL);
  /* The first and last chunks, a leaf/node boundary, and random places. */
  s->win[0] = 0;
  s->win[1] = s->nbits - WINDOW;
  s->win[2] = (s->nbits / 2) & ~(G_GUINT64_CONSTANT(4096) - 1);
  s->win[2] -= MIN(s->win[2], WINDOW / 2);
  for (guint i = 3; i < NWINDOWS; i++) {
    guint64 hi = (guint64)g_rand_int(r) << 32 | g_rand_int(r);
    s->win[i] = hi % (s->nbits - WINDOW);
  }
  s->nwin = NWINDOWS;
}

static void
shadow_destroy(Shadow *s)
{
  g_free(s->flat);
  if (s->set)
    g_hash_table_destroy(s->set);
}

static gboolean
shadow_get(const Shadow *s, guint64 i)
{
  if (s->flat)
    return s->flat[i / 8] >> (i % 8) & 1;
  return g_hash_table_contains(s->set, &i);
}

static void
shadow_put(Shadow *s, guint64 i, gboolean v)
{
  if (shadow_get(s, i) == v)
    return;
  s->count += v ? 1 : -1;
  if (s->flat) {
    s->flat[i / 8] ^= 1u << (i % 8);
  } else if (v) {
    g_hash_table_add(s->set, g_memdup2(&i, sizeof(i)));
  } else {
    g_hash_table_remove(s->set, &i);
  }
}

/* Chunks overlapping [offset, offset + len) clipped to the size: [*a, *b). */
static gboolean
outward(const Shadow *s, guint64 offset, guint64 len, guint64 *a, guint64 *b)
{
  if (len == 0 || offset >= s->size)
    return FALSE;
  guint64 end = len > s->size - offset ? s->size : offset + len;
  *a = offset / s->gran;
  *b = (end - 1) / s->gran + 1;
  return TRUE;
}

static void
shadow_mark(Shadow *s, guint64 offset, guint64 len)
{
  guint64 a, b;
  if (outward(s, offset, len, &a, &b))
    for (guint64 i = a; i < b; i++)
      shadow_put(s, i, TRUE);
}

static void
shadow_clear(Shadow *s, guint64 offset, guint64 len)
{
  if (offset >= s->size)
    return;
  guint64 end = len > s->size - offset ? s->size : offset + len;
  guint64 a = (offset + s->gran - 1) / s->gran;
  guint64 b = end == s->size ? s->nbits : end / s->gran;
  if (s->set && b > a + 4 * WINDOW) {
    GHashTableIter it;
    gpointer key;
    g_hash_table_iter_init(&it, s->set);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
      guint64 k = *(guint64 *)key;
      if (k >= a && k < b) {
        g_hash_table_iter_remove(&it);
        s->count--;
      }
    }
    return;
  }
  for (guint64 i = a; i < b; i++)
    shadow_put(s, i, FALSE);
}

/* Next chunk >= @i and < @to that is set (or clear), else -1. */
static gint64
shadow_next(const Shadow *s, guint64 i, guint64 to, gboolean clean)
{
  if (s->flat) {
    while (i < to) {
      guint64 w;
      memcpy(&w, s->flat + i / 64 * 8, 8);
      w = GUINT64_FROM_LE(w);
      if (clean)
        w = ~w;
      w &= G_MAXUINT64 << (i % 64);
      if (w) {
        guint64 bit = i / 64 * 64 + __builtin_ctzll(w);
        return bit < to ? (gint64)bit : -1;
      }
      i = i / 64 * 64 + 64;
    }
    return -1;
  }
  if (clean) {
    for (; i < to; i++)
      if (!shadow_get(s, i))
        return i;
    return -1;
  }
  GHashTableIter it;
  gpointer key;
  guint64 best = G_MAXUINT64;
  g_hash_table_iter_init(&it, s->set);
  while (g_hash_table_iter_next(&it, &key, NULL)) {
    guint64 k = *(guint64 *)key;
    if (k >= i && k < to && k < best)
      best = k;
  }
  return best == G_MAXUINT64 ? -1 : (gint64)best;
}

static guint64
rand64(GRand *r)
{
  return (guint64)g_rand_int(r) << 32 | g_rand_int(r);
}

/* A random chunk in one of the windows. */
static guint64
rand_chunk(const Shadow *s, GRand *r)
{
  if (s->flat)
    return rand64(r) % s->nbits;
  return s->win[g_rand_int_range(r, 0, s->nwin)] + g_rand_int_range(r, 0, WINDOW);
}

/* A random byte offset inside (or, rarely, past) the device, near the windows. */
static guint64
rand_offset(const Shadow *s, GRand *r)
{
  if (g_rand_int_range(r, 0, 50) == 0)
    return s->size + g_rand_int_range(r, 0, 3);
  guint64 off = rand_chunk(s, r) * s->gran + rand64(r) % s->gran;
  return MIN(off, s->size - 1);
}

/* A random length: mostly small, sometimes up to the window or the whole device. */
static guint64
rand_len(const Shadow *s, GRand *r)
{
  switch (g_rand_int_range(r, 0, 8)) {
  case 0:
    return 0;
  case 1:
    return g_rand_int_range(r, 1, 4096);
  case 2:
    return s->flat ? s->size : (guint64)g_rand_int_range(r, 1, 64) * s->gran;
  case 3:
    return G_MAXUINT64 - g_rand_int_range(r, 0, 3); /* overflows offset + len */
  default:
    return (rand64(r) % (s->flat ? s->nbits : WINDOW / 4) + 1) * s->gran - rand64(r) % s->gran;
  }
}

/* ---- whole-bitmap comparisons ---- */

typedef struct {
  const Shadow *s;
  guint64 chunks;
  guint64 last_end;
  guint64 lo, hi; /* the range iterated */
} RunCheck;

static gboolean
check_run(guint64 offset, guint64 len, gpointer data)
{
  RunCheck *rc = data;
  const Shadow *s = rc->s;

  g_assert_cmpuint(len, >, 0);
  g_assert_cmpuint(offset, >=, rc->lo);
  g_assert_cmpuint(offset + len, <=, rc->hi);
  if (rc->last_end) /* maximal runs: a clean chunk between any two */
    g_assert_cmpuint(offset, >, rc->last_end);
  guint64 a = offset / s->gran, b = (offset + len - 1) / s->gran + 1;
  for (guint64 i = a; i < b; i++)
    g_assert_true(shadow_get(s, i));
  if (offset > rc->lo && offset % s->gran == 0)
    g_assert_false(shadow_get(s, a - 1));
  if (offset + len < rc->hi)
    g_assert_false(shadow_get(s, b));
  rc->chunks += b - a;
  rc->last_end = offset + len;
  return TRUE;
}

static void
check_runs(const CbtBitmap *bm, const Shadow *s)
{
  RunCheck rc = { s, 0, 0, 0, s->size };
  cbt_bitmap_foreach_dirty_run(bm, 0, s->size, check_run, &rc);
  g_assert_cmpuint(rc.chunks, ==, s->count);
}

/* Runs over a random part of the device: clipped to it, and covering exactly its set chunks
 * (a chunk straddling either end counts once). */
static void
check_runs_in(const CbtBitmap *bm, const Shadow *s, GRand *r)
{
  guint64 lo = rand_offset(s, r), len = rand_len(s, r);
  if (lo >= s->size || len == 0)
    return;
  guint64 hi = len > s->size - lo ? s->size : lo + len;
  RunCheck rc = { s, 0, 0, lo, hi };
  guint64 want = 0, a = lo / s->gran, b = (hi - 1) / s->gran + 1;
  if (s->flat) {
    for (gint64 i = shadow_next(s, a, b, FALSE); i >= 0; i = shadow_next(s, i + 1, b, FALSE))
      want++;
  } else {
    GHashTableIter it;
    gpointer key;
    g_hash_table_iter_init(&it, s->set);
    while (g_hash_table_iter_next(&it, &key, NULL))
      want += *(guint64 *)key >= a && *(guint64 *)key < b;
  }
  cbt_bitmap_foreach_dirty_run(bm, lo, len, check_run, &rc);
  g_assert_cmpuint(rc.chunks, ==, want);
}

typedef struct {
  const Shadow *s;
  guint64 pos;    /* bytes so far */
  guint64 ones;   /* set bits seen */
  GChecksum *sum; /* independent hash, for flat shadows */
} StreamCheck;

static void
check_piece(const guint8 *data, gsize len, gpointer user_data)
{
  StreamCheck *sc = user_data;
  const Shadow *s = sc->s;
  static const guint8 zeros[4096];

  g_assert_cmpuint(len, >, 0);
  if (!data && !s->flat) {
    sc->pos += len; /* a zero run of a huge bitmap: only its length matters */
    return;
  }
  for (gsize i = 0; i < len; i++) {
    guint8 byte = data ? data[i] : 0;
    guint64 bit0 = (sc->pos + i) * 8;
    if (s->flat) {
      guint8 want = bit0 < s->nbits ? s->flat[bit0 / 8] : 0;
      if (bit0 + 8 > s->nbits && bit0 < s->nbits)
        want &= (1u << (s->nbits - bit0)) - 1;
      g_assert_cmphex(byte, ==, want);
    } else if (data) {
      for (guint b = 0; b < 8; b++)
        if (byte >> b & 1)
          g_assert_true(shadow_get(s, bit0 + b));
    }
    sc->ones += __builtin_popcount(byte);
  }
  if (sc->sum) {
    if (data) {
      g_checksum_update(sc->sum, data, len);
    } else {
      for (gsize left = len; left;) {
        gsize n = MIN(left, sizeof(zeros));
        g_checksum_update(sc->sum, zeros, n);
        left -= n;
      }
    }
  }
  sc->pos += len;
}

/* The serialized stream equals the shadow's; for small bitmaps also its hash. */
static void
check_stream(const CbtBitmap *bm, const Shadow *s)
{
  StreamCheck sc = { s, 0, 0, NULL };

  if (s->flat)
    sc.sum = g_checksum_new(G_CHECKSUM_SHA256);
  cbt_bitmap_serialize(bm, check_piece, &sc);
  g_assert_cmpuint(sc.pos, ==, (s->nbits + 63) / 64 * 8);
  g_assert_cmpuint(sc.ones, ==, s->count);
  if (sc.sum) {
    /* Independently: hash the shadow's bytes directly. */
    gsize n = (s->nbits + 63) / 64 * 8;
    g_autofree guint8 *bytes = g_malloc0(n + 1);
    memcpy(bytes, s->flat, n);
    if (s->nbits % 8)
      bytes[s->nbits / 8] &= (1u << (s->nbits % 8)) - 1;
    g_autofree char *want = g_compute_checksum_for_data(G_CHECKSUM_SHA256, bytes, n);
    g_autofree char *got = cbt_bitmap_sha256(bm);
    g_assert_cmpstr(got, ==, want);
    g_assert_cmpstr(got, ==, g_checksum_get_string(sc.sum));
    g_checksum_free(sc.sum);
  }
}

/* Random probes of get/next_dirty/next_clean. */
static void
check_probes(const CbtBitmap *bm, const Shadow *s, GRand *r)
{
  for (int k = 0; k < 8; k++) {
    guint64 off = rand_offset(s, r);
    guint64 end = g_rand_boolean(r) ? G_MAXUINT64 : off + rand_len(s, r) / 2;
    if (end < off)
      end = G_MAXUINT64;
    guint64 cend = MIN(end, s->size);
    gboolean in = off < s->size;

    g_assert_cmpint(cbt_bitmap_get(bm, off), ==, in && shadow_get(s, off / s->gran));
    for (int clean = 0; clean < 2; clean++) {
      gint64 got =
        clean ? cbt_bitmap_next_clean(bm, off, end) : cbt_bitmap_next_dirty(bm, off, end);
      gint64 want = -1;
      if (in && off < cend) {
        guint64 to = (cend - 1) / s->gran + 1;
        /* Bounded search for clean chunks in a hash shadow: runs are window-sized at most. */
        gint64 bit = shadow_next(s, off / s->gran, to, clean);
        if (bit >= 0)
          want = MAX(off, (guint64)bit * s->gran);
      }
      g_assert_cmpint(got, ==, want);
    }
  }
}

/* ---- the random test ---- */

typedef struct {
  guint64 size;
  guint32 gran;
} Geometry;

static void
append_piece(const guint8 *data, gsize len, gpointer ba)
{
  if (data) {
    g_byte_array_append(ba, data, len);
  } else {
    guint old = ((GByteArray *)ba)->len;
    g_byte_array_set_size(ba, old + len);
    memset(((GByteArray *)ba)->data + old, 0, len);
  }
}

typedef struct {
  Shadow *s;
  guint32 g2;
} MergeShadow;

/* A set source chunk of granularity g2 marks every destination chunk it overlaps. */
static gboolean
merge_shadow_run(guint64 o, guint64 l, gpointer data)
{
  MergeShadow *m = data;
  guint64 first = o / m->g2 * m->g2, last = (o + l - 1) / m->g2 * m->g2;
  shadow_mark(m->s, first, last - first + m->g2);
  return TRUE;
}

static void
deserialize_copy(CbtBitmap *dst, const CbtBitmap *src, GRand *r)
{
  /* Serialize src into a flat buffer (small sizes only), then feed it back in random pieces,
   * skipping some all-zero pieces as a real stream reader may. */
  guint64 n = (cbt_bitmap_get_nbits(src) + 63) / 64 * 8;
  g_autoptr(GByteArray) buf = g_byte_array_new();
  cbt_bitmap_serialize(src, append_piece, buf);
  g_assert_cmpuint(buf->len, ==, n);
  for (guint64 at = 0; at < n;) {
    gsize len = g_rand_int_range(r, 1, 3000);
    len = MIN(n - at, len);
    cbt_bitmap_deserialize_part(dst, at, buf->data + at, len);
    at += len;
  }
}

static void
run_random(guint64 size, guint32 gran, guint32 seed, guint ops)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(seed);
  Shadow s;
  shadow_init(&s, size, gran, r);
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(size, gran);
  gsize empty_mem = cbt_bitmap_get_memory(bm);

  g_assert_cmpuint(cbt_bitmap_get_nbits(bm), ==, s.nbits);
  g_assert_cmpuint(cbt_bitmap_get_size(bm), ==, size);
  g_assert_cmpuint(cbt_bitmap_get_granularity(bm), ==, gran);
  for (guint op = 0; op < ops; op++) {
    guint64 off = rand_offset(&s, r), len = rand_len(&s, r);
    int kind = g_rand_int_range(r, 0, 100);

    guint64 ca, cb;
    if (kind < 55 && s.set && outward(&s, off, len, &ca, &cb) && cb - ca > 2 * WINDOW)
      len = WINDOW / 2 * gran; /* the shadow could not hold it */
    if (kind < 55) {
      cbt_bitmap_mark_range(bm, off, len);
      shadow_mark(&s, off, len);
    } else if (kind < 80) {
      cbt_bitmap_clear_range(bm, off, len);
      shadow_clear(&s, off, len);
    } else if (kind < 82) {
      cbt_bitmap_clear_all(bm);
      g_assert_cmpuint(cbt_bitmap_get_memory(bm), ==, empty_mem);
      shadow_destroy(&s);
      shadow_init(&s, size, gran, r);
    } else if (kind < 88) {
      /* Merge from a bitmap of another granularity with a few random marks. */
      gint top = s.set ? MIN(32, g_bit_nth_lsf(gran, -1) + 7) : 32;
      guint32 g2 = 1u << g_rand_int_range(r, 9, top);
      g_autoptr(CbtBitmap) src = cbt_bitmap_new(size, g2);
      for (int k = 0; k < 3; k++) {
        guint64 o = rand_offset(&s, r), l = rand_len(&s, r);
        l = MIN(l, 8 * (guint64)gran);
        cbt_bitmap_mark_range(src, o, l);
      }
      cbt_bitmap_merge(bm, src);
      cbt_bitmap_merge(bm, bm); /* a target may be its own source */
      MergeShadow m = { &s, g2 };
      cbt_bitmap_foreach_dirty_run(src, 0, size, merge_shadow_run, &m);
    } else if (kind < 92) {
      /* Copy: equal now, independent afterwards. */
      g_autoptr(CbtBitmap) copy = cbt_bitmap_copy(bm);
      g_assert_cmpuint(cbt_bitmap_count(copy), ==, s.count);
      check_runs(copy, &s);
      cbt_bitmap_clear_all(bm);
      g_assert_cmpuint(cbt_bitmap_count(copy), ==, s.count);
      cbt_bitmap_merge(bm, copy);
      check_stream(copy, &s);
    } else if (kind < 95 && s.flat) {
      g_autoptr(CbtBitmap) round = cbt_bitmap_new(size, gran);
      deserialize_copy(round, bm, r);
      g_assert_cmpuint(cbt_bitmap_count(round), ==, s.count);
      check_runs(round, &s);
      g_autofree char *a = cbt_bitmap_sha256(bm);
      g_autofree char *b = cbt_bitmap_sha256(round);
      g_assert_cmpstr(a, ==, b);
    } else {
      /* OR raw bytes at a random place of the stream. */
      guint8 bytes[24];
      guint64 total = (s.nbits + 63) / 64 * 8;
      guint64 at = (rand_chunk(&s, r) / 8) % total;
      gsize n = g_rand_int_range(r, 1, sizeof(bytes) + 1);
      for (gsize i = 0; i < n; i++)
        bytes[i] = g_rand_int_range(r, 0, 8) ? 0 : g_rand_int(r);
      cbt_bitmap_deserialize_part(bm, at, bytes, n);
      for (gsize i = 0; i < n && at + i < total; i++)
        for (guint b = 0; b < 8; b++)
          if ((bytes[i] >> b & 1) && (at + i) * 8 + b < s.nbits)
            shadow_put(&s, (at + i) * 8 + b, TRUE);
    }
    g_assert_cmpuint(cbt_bitmap_count(bm), ==, s.count);
    check_probes(bm, &s, r);
    check_runs_in(bm, &s, r);
    if (op % 16 == 0 || op == ops - 1) {
      check_runs(bm, &s);
      check_stream(bm, &s);
    }
  }
  cbt_bitmap_clear_range(bm, 0, G_MAXUINT64);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 0);
  g_assert_cmpuint(cbt_bitmap_get_memory(bm), ==, empty_mem);
  shadow_destroy(&s);
}

static const Geometry geometries[] = {
  { 1, 512 },
  { 511, 512 },
  { 512, 512 },
  { 513, 512 },
  { 100000, 65536 },
  { 4096 * 512, 512 },            /* exactly one leaf */
  { 4096 * 512 + 1, 512 },        /* one leaf and a bit */
  { 64 * 4096 * 512 - 512, 512 }, /* a level-1 node short of one chunk */
  { GiB, 65536 },
  { GiB, 1u << 31 },
  { GiB + 12345, 4096 },
  { 3 * GiB, 1u << 31 },
  { 64 * GiB + 777, 65536 },
  { TiB, 65536 },
  { PiB, 65536 },
  { PiB + 4095, 4096 },
  { G_GUINT64_CONSTANT(1) << 63, 512 },
  { (G_GUINT64_CONSTANT(1) << 63) - 1, 1u << 31 },
};

static guint32 random_seed;

static void
test_random_fixed(gconstpointer data)
{
  const Geometry *g = data;
  guint ops = g->size / g->gran + 1 > FLAT_LIMIT ? 150 : 400;
  for (guint32 seed = 1; seed <= 3; seed++)
    run_random(g->size, g->gran, seed * 7919 + g->gran, ops);
}

static void
test_random_seed(void)
{
  g_autoptr(GRand) r = g_rand_new_with_seed(random_seed);
  for (int k = 0; k < 12; k++) {
    guint32 gran = 1u << g_rand_int_range(r, 9, 32);
    guint64 size;
    switch (k % 3) {
    case 0:
      size = g_rand_int_range(r, 1, 1 << 20) * (guint64)g_rand_int_range(r, 1, 64);
      break;
    case 1:
      size = rand64(r) % (64 * GiB) + 1;
      break;
    default:
      size = rand64(r) % (G_GUINT64_CONSTANT(1) << 63) + 1;
      break;
    }
    g_test_message("random geometry %d: size %" G_GUINT64_FORMAT " granularity %u", k, size, gran);
    run_random(size, gran, g_rand_int(r), 200);
  }
}

/* ---- targeted tests ---- */

static void
test_sha256_known(void)
{
  static const guint8 zeros[2048];
  g_autoptr(CbtBitmap) a = cbt_bitmap_new(GiB, 65536);
  g_autoptr(CbtBitmap) b = cbt_bitmap_new(GiB, 1u << 31);
  g_autofree char *ha = cbt_bitmap_sha256(a);
  g_autofree char *hb = cbt_bitmap_sha256(b);
  g_autofree char *wa = g_compute_checksum_for_data(G_CHECKSUM_SHA256, zeros, 2048);
  g_autofree char *wb = g_compute_checksum_for_data(G_CHECKSUM_SHA256, zeros, 8);

  /* The values qemu-storage-daemon 7.2 reports (docs/bitmaps.md, "Granularity, count,
   * checksum"). */
  g_assert_cmpstr(ha, ==, wa);
  g_assert_true(g_str_has_prefix(ha, "e5a00aa9") && g_str_has_suffix(ha, "b183ad"));
  g_assert_cmpstr(hb, ==, wb);
  g_assert_true(g_str_has_prefix(hb, "af5570f5") && g_str_has_suffix(hb, "e83dfc"));

  /* Non-empty: chunks 0, 9, 63, 64 and 16383 of 1 GiB / 64 KiB, built by hand. */
  guint8 bytes[2048] = { 0 };
  bytes[0] = 0x01;
  bytes[1] = 0x02;
  bytes[7] = 0x80;
  bytes[8] = 0x01;
  bytes[2047] = 0x80;
  cbt_bitmap_mark_range(a, 0, 1);
  cbt_bitmap_mark_range(a, 9 * 65536 + 100, 1);
  cbt_bitmap_mark_range(a, 63 * 65536 + 65535, 2);
  cbt_bitmap_mark_range(a, GiB - 1, 1);
  g_autofree char *hn = cbt_bitmap_sha256(a);
  g_autofree char *wn = g_compute_checksum_for_data(G_CHECKSUM_SHA256, bytes, sizeof(bytes));
  g_assert_cmpstr(hn, ==, wn);
  g_assert_cmpuint(cbt_bitmap_count(a), ==, 5);

  /* An empty 1 PiB bitmap hashes 256 MiB of zeros; only check it ends up as that. */
  if (g_test_slow()) {
    g_autoptr(CbtBitmap) p = cbt_bitmap_new(PiB, 65536);
    g_autoptr(GChecksum) c = g_checksum_new(G_CHECKSUM_SHA256);
    static const guint8 z[1 << 16];
    for (int i = 0; i < 4096; i++)
      g_checksum_update(c, z, sizeof(z));
    g_autofree char *hp = cbt_bitmap_sha256(p);
    g_assert_cmpstr(hp, ==, g_checksum_get_string(c));
  }
}

static void
test_memory_bounds(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(PiB, 65536);
  gsize empty = cbt_bitmap_get_memory(bm);

  g_test_message("1 PiB / 64 KiB empty: %" G_GSIZE_FORMAT " bytes", empty);
  g_assert_cmpuint(empty, <, 4 * MiB);

  /* 16,384 chunks spread evenly: 64 GiB apart, each alone in its leaf and level-1 node. */
  guint64 step = PiB / 16384;
  for (guint64 i = 0; i < 16384; i++)
    cbt_bitmap_mark_range(bm, i * step + (i % 7) * 65536, 65536);
  gsize scattered = cbt_bitmap_get_memory(bm);
  g_test_message("1 PiB / 64 KiB, 16384 scattered chunks: %" G_GSIZE_FORMAT " bytes", scattered);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 16384);
  g_assert_cmpuint(scattered, <, 64 * MiB);

  /* Clearing gives the memory back. */
  cbt_bitmap_clear_range(bm, 0, PiB / 2);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 8192);
  g_assert_cmpuint(cbt_bitmap_get_memory(bm), <, scattered / 2 + 64 * KiB);
  cbt_bitmap_clear_all(bm);
  g_assert_cmpuint(cbt_bitmap_get_memory(bm), ==, empty);

  /* A whole-device mark fills leaves; next_clean then skips full subtrees. */
  g_autoptr(CbtBitmap) full = cbt_bitmap_new(64 * GiB, 65536);
  cbt_bitmap_mark_range(full, 0, 64 * GiB);
  g_assert_cmpuint(cbt_bitmap_count(full), ==, MiB);
  g_assert_cmpint(cbt_bitmap_next_clean(full, 0, G_MAXUINT64), ==, -1);
  cbt_bitmap_clear_range(full, 40 * GiB, 65536);
  g_assert_cmpint(cbt_bitmap_next_clean(full, 0, G_MAXUINT64), ==, 40 * GiB);
  g_assert_cmpint(cbt_bitmap_next_clean(full, 40 * GiB + 65536, G_MAXUINT64), ==, -1);
}

/* next_dirty over a nearly empty 1 PiB bitmap must not scan. No timed assertion (speed lives in
 * bench/): a scan of 2^34 bits per call, 4,000 calls, would run far past the test's timeout. */
static void
test_next_sparse(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(PiB, 65536);
  guint64 where[] = { 0, 5 * TiB + 65536 * 3, PiB / 2, PiB - 65536 };

  g_assert_cmpint(cbt_bitmap_next_dirty(bm, 0, G_MAXUINT64), ==, -1);
  g_assert_cmpint(cbt_bitmap_next_clean(bm, 123, G_MAXUINT64), ==, 123);
  for (guint i = 0; i < G_N_ELEMENTS(where); i++)
    cbt_bitmap_mark_range(bm, where[i], 1);
  gint64 t0 = g_get_monotonic_time();
  for (int rep = 0; rep < 1000; rep++) {
    guint64 at = 1; /* inside dirty chunk 0: found at once */
    g_assert_cmpint(cbt_bitmap_next_dirty(bm, at, G_MAXUINT64), ==, 1);
    at = 65536;
    for (guint i = 1; i < G_N_ELEMENTS(where); i++) {
      gint64 got = cbt_bitmap_next_dirty(bm, at, G_MAXUINT64);
      g_assert_cmpint(got, ==, where[i]);
      at = got + 65536;
    }
    g_assert_cmpint(cbt_bitmap_next_dirty(bm, at, G_MAXUINT64), ==, -1);
  }
  gint64 us = g_get_monotonic_time() - t0;
  g_test_message("4000 next_dirty over 1 PiB: %" G_GINT64_FORMAT " us", us);
}

/* A zero-length device: every query answers "nothing"; the stream is one zero word, as QEMU's
 * (x-debug-block-dirty-bitmap-sha256 of a 0-byte node is the hash of 8 zero bytes there). */
static void
test_empty_device(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(0, 65536);
  static const guint8 zero_word[8];
  g_autofree char *want = g_compute_checksum_for_data(G_CHECKSUM_SHA256, zero_word, 8);
  guint8 byte = 0xff;

  g_assert_cmpuint(cbt_bitmap_get_nbits(bm), ==, 0);
  cbt_bitmap_mark_range(bm, 0, G_MAXUINT64);
  cbt_bitmap_deserialize_part(bm, 0, &byte, 1);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 0);
  g_assert_false(cbt_bitmap_get(bm, 0));
  g_assert_cmpint(cbt_bitmap_next_dirty(bm, 0, G_MAXUINT64), ==, -1);
  g_assert_cmpint(cbt_bitmap_next_clean(bm, 0, G_MAXUINT64), ==, -1);
  g_autofree char *got = cbt_bitmap_sha256(bm);
  g_assert_cmpstr(got, ==, want);
  cbt_bitmap_clear_range(bm, 0, 1);
  cbt_bitmap_clear_all(bm);
}

/* Bits past the end of the device never get set, whatever the stream says. */
static void
test_deserialize_tail(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(100000, 65536); /* 2 chunks, 8 stream bytes */
  guint8 ones[16];

  memset(ones, 0xff, sizeof(ones));
  cbt_bitmap_deserialize_part(bm, 0, ones, sizeof(ones));
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 2);
  cbt_bitmap_deserialize_part(bm, 8, ones, 8);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 2);
  g_assert_cmpint(cbt_bitmap_next_clean(bm, 0, G_MAXUINT64), ==, -1);
  /* clear_range: only whole chunks, plus the partial last one when the range reaches the end. */
  cbt_bitmap_clear_range(bm, 1, 99999 - 1);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 2);
  cbt_bitmap_clear_range(bm, 65536, 1);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 2);
  cbt_bitmap_clear_range(bm, 65536, 100000 - 65536);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  cbt_bitmap_clear_range(bm, 0, 65535);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 1);
  cbt_bitmap_clear_range(bm, 0, 65536);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 0);
}

/* ---- concurrency ---- */

typedef struct {
  CbtBitmap *bm;
  guint32 seed;
  guint64 base, span; /* the byte range this writer writes into */
  GArray *marked;     /* chunk indices */
  gint *stop;
} Writer;

#define CONC_SIZE TiB
#define CONC_GRAN 65536u

static gpointer
writer_main(gpointer data)
{
  Writer *w = data;
  g_autoptr(GRand) r = g_rand_new_with_seed(w->seed);

  for (int i = 0; i < 200000; i++) {
    guint64 off = w->base + rand64(r) % w->span;
    guint64 len = g_rand_int_range(r, 0, 8) ? 4096 : g_rand_int_range(r, 1, 64) * 65536;
    cbt_bitmap_mark_range(w->bm, off, len);
    guint64 end = MIN(off + len, CONC_SIZE);
    for (guint64 c = off / CONC_GRAN; c <= (end - 1) / CONC_GRAN; c++)
      g_array_append_val(w->marked, c);
  }
  return NULL;
}

static gpointer
reader_main(gpointer data)
{
  Writer *w = data;
  guint64 passes = 0;

  while (!g_atomic_int_get(w->stop)) {
    guint64 at = 0;
    guint64 seen = 0;
    for (;;) {
      gint64 d = cbt_bitmap_next_dirty(w->bm, at, G_MAXUINT64);
      if (d < 0)
        break;
      /* Bits are never cleared here: what was found dirty stays dirty. */
      g_assert_cmpuint(d, >=, at);
      g_assert_true(cbt_bitmap_get(w->bm, d));
      gint64 c = cbt_bitmap_next_clean(w->bm, d, G_MAXUINT64);
      g_assert_true(c < 0 || c > d);
      if (c < 0)
        break;
      seen += c - d;
      at = c;
    }
    g_assert_cmpuint(seen % CONC_GRAN, ==, 0);
    passes++;
  }
  g_test_message("reader: %" G_GUINT64_FORMAT " passes", passes);
  return NULL;
}

static gboolean
sum_run(guint64 offset, guint64 len, gpointer acc)
{
  *(guint64 *)acc += len / CONC_GRAN;
  return TRUE;
}

static void
test_concurrent(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(CONC_SIZE, CONC_GRAN);
  gint stop = 0;
  Writer w[4] = {
    { bm, 11, 0, CONC_SIZE / 4, NULL, &stop },                 /* disjoint */
    { bm, 12, CONC_SIZE / 4, CONC_SIZE / 4, NULL, &stop },     /* disjoint */
    { bm, 13, CONC_SIZE / 2, CONC_SIZE / 2, NULL, &stop },     /* overlapping ... */
    { bm, 14, CONC_SIZE / 2, CONC_SIZE / 2 - 1, NULL, &stop }, /* ... each other */
  };
  Writer reader = { bm, 0, 0, 0, NULL, &stop };
  GThread *t[4];

  GThread *rt = g_thread_new("reader", reader_main, &reader);
  for (int i = 0; i < 4; i++) {
    w[i].marked = g_array_new(FALSE, FALSE, sizeof(guint64));
    t[i] = g_thread_new("writer", writer_main, &w[i]);
  }
  for (int i = 0; i < 4; i++)
    g_thread_join(t[i]);
  g_atomic_int_set(&stop, 1);
  g_thread_join(rt);

  g_autoptr(GHashTable) all = g_hash_table_new(g_int64_hash, g_int64_equal);
  for (int i = 0; i < 4; i++) {
    for (guint k = 0; k < w[i].marked->len; k++) {
      guint64 *c = &g_array_index(w[i].marked, guint64, k);
      g_assert_true(cbt_bitmap_get(bm, *c * CONC_GRAN));
      g_hash_table_add(all, c);
    }
  }
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, g_hash_table_size(all));
  guint64 runs_chunks = 0;
  cbt_bitmap_foreach_dirty_run(bm, 0, CONC_SIZE, sum_run, &runs_chunks);
  g_assert_cmpuint(runs_chunks, ==, g_hash_table_size(all));
  for (int i = 0; i < 4; i++)
    g_array_free(w[i].marked, TRUE);
}

/* Four threads fill the same region in interleaved pieces: the full summaries must end up
 * exact, so next_clean jumps straight past the region. */
typedef struct {
  CbtBitmap *bm;
  int id;
} Filler;

static gpointer
filler_main(gpointer data)
{
  Filler *f = data;
  /* Chunk j (j % 4 == id) and its right neighbour: every chunk is set by two threads. */
  for (guint64 j = f->id; j < 8 * GiB / 512; j += 4)
    cbt_bitmap_mark_range(f->bm, j * 512 + 100, 1024 - 100);
  return NULL;
}

static void
test_concurrent_fill(void)
{
  g_autoptr(CbtBitmap) bm = cbt_bitmap_new(16 * GiB, 512);
  Filler f[4];
  GThread *t[4];

  for (int i = 0; i < 4; i++) {
    f[i] = (Filler){ bm, i };
    t[i] = g_thread_new("filler", filler_main, &f[i]);
  }
  for (int i = 0; i < 4; i++)
    g_thread_join(t[i]);
  g_assert_cmpuint(cbt_bitmap_count(bm), ==, 8 * GiB / 512 + 1);
  g_assert_cmpint(cbt_bitmap_next_clean(bm, 0, G_MAXUINT64), ==, 8 * GiB + 512);
  g_assert_cmpint(cbt_bitmap_next_dirty(bm, 8 * GiB + 512, G_MAXUINT64), ==, -1);
}

/* Threads install different children of the same fresh node at the same moment: no summary
 * bit may be lost (next_dirty must find every leaf). Many rounds to hit the race. */
typedef struct {
  CbtBitmap *bm;
  gint *go;
  int id;
} Racer;

static gpointer
racer_main(gpointer data)
{
  Racer *rc = data;
  while (!g_atomic_int_get(rc->go))
    ;
  for (guint64 leaf = rc->id; leaf < 64; leaf += 4)
    cbt_bitmap_mark_range(rc->bm, leaf * 4096 * 512 + rc->id * 512, 1);
  return NULL;
}

static void
test_concurrent_summary(void)
{
  for (int round = 0; round < 400; round++) {
    g_autoptr(CbtBitmap) bm = cbt_bitmap_new(TiB, 512);
    gint go = 0;
    Racer rc[4];
    GThread *t[4];
    for (int i = 0; i < 4; i++) {
      rc[i] = (Racer){ bm, &go, i };
      t[i] = g_thread_new("racer", racer_main, &rc[i]);
    }
    g_atomic_int_set(&go, 1);
    for (int i = 0; i < 4; i++)
      g_thread_join(t[i]);
    guint found = 0;
    for (gint64 at = 0; (at = cbt_bitmap_next_dirty(bm, at, G_MAXUINT64)) >= 0; at += 512)
      found++;
    g_assert_cmpuint(found, ==, 64);
    g_assert_cmpuint(cbt_bitmap_count(bm), ==, 64);
  }
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);

  /* CBT_TEST_SEED=N replays a failure of /bitmap/random/seeded. */
  const char *seed = g_getenv("CBT_TEST_SEED");
  random_seed = seed ? (guint32)g_ascii_strtoull(seed, NULL, 10) : g_random_int();
  g_test_message("random seed for /bitmap/random/seeded: %u (replay: CBT_TEST_SEED=%u)",
                 random_seed, random_seed);
  for (guint i = 0; i < G_N_ELEMENTS(geometries); i++) {
    g_autofree char *path = g_strdup_printf("/bitmap/random/%" G_GUINT64_FORMAT "-%u",
                                            geometries[i].size, geometries[i].gran);
    g_test_add_data_func(path, &geometries[i], test_random_fixed);
  }
  g_test_add_func("/bitmap/random/seeded", test_random_seed);
  g_test_add_func("/bitmap/sha256", test_sha256_known);
  g_test_add_func("/bitmap/memory", test_memory_bounds);
  g_test_add_func("/bitmap/next-sparse", test_next_sparse);
  g_test_add_func("/bitmap/empty-device", test_empty_device);
  g_test_add_func("/bitmap/deserialize-tail", test_deserialize_tail);
  g_test_add_func("/bitmap/concurrent", test_concurrent);
  g_test_add_func("/bitmap/concurrent-fill", test_concurrent_fill);
  g_test_add_func("/bitmap/concurrent-summary", test_concurrent_summary);
  return g_test_run();
}
