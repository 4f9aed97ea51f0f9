/* bitmap/bitmap.c — CbtBitmap, the sparse dirty bitmap.
 *
 * Layout
 *   Chunk i of the device is bit i. Bits live in leaves of 64 words (512 bytes, 4096 bits);
 *   leaves hang off a tree of 64-ary interior nodes. A node at level l >= 1 covers
 *   2^(12 + 6l) bits; the root sits at the least level that covers every bit (0 for up to 4096
 *   bits, 7 for 2^54 bits = 2^63 bytes at 512 B). Next to its 64 child pointers, an interior
 *   node keeps two summary words:
 *     nonempty bit c  child c holds at least one set bit,
 *     full bit c      every bit of the device under child c is set.
 *   A NULL child means "all clear". Nothing is allocated before a bit is set, and clearing frees
 *   what becomes empty, so memory follows the dirty data, not the device size: an empty bitmap
 *   of any size is this struct (~0.7 KiB); each dirty region costs one 512 B leaf (4096
 *   chunks, 256 MiB of device at 64 KiB) plus its share of 528 B nodes. The worst case, every
 *   dirty chunk alone in its leaf and its level-1 node, is ~1.1 KiB per chunk: 16,384 such
 *   chunks on 1 PiB need 17.3 MiB where the flat layout needs 2 GiB.
 *
 *   Why 512 B leaves (bench/bitmap-bench, memory exact, times within the noise of a shared
 *   2-core machine): 256 B leaves need 13.8 MiB instead of 17.3 MiB for the scattered case but
 *   4.6 % more than the flat layout when dense (2.19 vs 2.10 MiB per TiB at 64 KiB), and dense
 *   is where memory is large in absolute terms; 1 KiB leaves need 25.0 MiB scattered for 2.4 %
 *   less when dense. Why not CRoaring: Debian's build indexes 32 bits only, and it offers no
 *   lock-free concurrent set.
 *
 * Complexity (H = tree height <= 7, n = bits touched)
 *   mark_range       O(H + n/64) per leaf touched: atomic OR per word, O(1) amortised per write
 *   get              O(H)
 *   next_dirty/clean O(H + 64): summary words (count-trailing-zeros) skip empty/full subtrees,
 *                    so a nearly empty 1 PiB bitmap is never scanned
 *   count            O(1): 8 striped counters, updated by exactly the bits that change state
 *   clear_range      O(H + leaves touched); freed subtrees cost their size
 *   merge            O(source leaves * (H + 64)) into an equal or coarser granularity (a
 *                    source leaf lands in one destination leaf); O(source runs * H) into a
 *                    finer one
 *   serialize/sha256 O(allocated leaves) calls; zero stretches come as NULL runs (sha256 still
 *                    hashes every byte, zeros from a static buffer)
 *
 * Threads and memory order
 *   Marking only ever sets bits and installs children, so it needs no lock: children are
 *   installed with compare-and-swap (the loser frees its copy), words are ORed atomically
 *   (skipped when already set) and the count grows by the popcount of the bits that were
 *   clear before the OR, in a per-thread stripe of a striped counter. After the
 *   leaf, a marker sets the nonempty bits of every ancestor (bottom-up, each checked before
 *   the atomic OR) before it returns, so a reader that starts after a mark returns sees it.
 *   A nonempty bit may briefly be missing while a concurrent mark is in flight (the reader
 *   then sees the state before that mark); a set nonempty bit is never wrong, so readers only
 *   descend where bits exist. "full" works the other way round: a set full bit is always
 *   right (it is set only after every word below was seen full, and bits are cleared only
 *   under exclusion), a missing one merely costs next_clean a descent. The marker that
 *   completes a word checks its leaf; a full leaf sets its parent's bit with fetch_or, and
 *   only the caller whose fetch_or completes the parent's mask climbs further.
 *   Clearing, merging into, deserializing and freeing need the caller to exclude every other
 *   user (see bitmap.h); they free nodes, which concurrent readers could still hold.
 */
#include "bitmap/bitmap.h"

#include <string.h>

#define WORD_BITS 64
#ifndef CBT_BITMAP_LEAF_SHIFT /* overridable only to measure other leaf sizes */
#define CBT_BITMAP_LEAF_SHIFT 12
#endif
#define LEAF_SHIFT CBT_BITMAP_LEAF_SHIFT /* log2(bits per leaf) */
#define LEAF_BITS (G_GUINT64_CONSTANT(1) << LEAF_SHIFT)
#define LEAF_WORDS (LEAF_BITS / WORD_BITS)
#define NODE_SHIFT 6 /* log2(children per node) */
#define NODE_FANOUT 64
#define MAX_HEIGHT 9 /* path[] entries: levels 1..8 */
#define CACHE_LINE 64
#define COUNT_STRIPES 8

typedef struct {
  guint64 w[LEAF_WORDS];
} Leaf;

typedef struct {
  guint64 nonempty;
  guint64 full;
  gpointer child[NODE_FANOUT];
} Node;

/* The set-bit count is striped over cache lines: with one shared counter, every mark that
 * changes a bit bounces that line between writer threads (two threads, random 4 KiB writes
 * over one 1 TiB bitmap: 69 ns per write with one counter, 46 ns with 8 stripes; on disjoint
 * halves two threads take 12 ns against 22 ns for one). A thread adds to its own stripe; the
 * count is their sum (mod 2^64: clearing subtracts from any stripe). */
typedef struct {
  guint64 n;
} __attribute__((aligned(CACHE_LINE))) Stripe;

struct CbtBitmap {
  /* Read-mostly: never written while marks run, so it stays shared in every cache. */
  guint64 size;
  guint64 nbits;
  guint32 granularity;
  guint gran_shift;
  guint height; /* level of the root: 0 when the root is a leaf */
  gpointer root;
  /* Written by marks. */
  Stripe count[COUNT_STRIPES]; /* set bits (atomic, summed) */
  Stripe nodes;                /* allocated interior nodes (atomic) */
  Stripe leaves;               /* allocated leaves (atomic) */
};

G_STATIC_ASSERT(sizeof(Leaf) * 8 == LEAF_BITS);

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FETCH_OR(p, v) __atomic_fetch_or((p), (v), __ATOMIC_ACQ_REL)
#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)
#define SUB(p, v) __atomic_sub_fetch((p), (v), __ATOMIC_RELAXED)

/* log2 of the bits covered by a node at @level (a leaf at 0). */
static inline guint
level_shift(guint level)
{
  return LEAF_SHIFT + NODE_SHIFT * level;
}

static inline guint
child_index(guint64 bit, guint level)
{
  return (bit >> level_shift(level - 1)) & (NODE_FANOUT - 1);
}

/* Words [c0, c1] of a 64-bit mask, inclusive. */
static inline guint64
range_mask(guint c0, guint c1)
{
  return (G_MAXUINT64 << c0) & (G_MAXUINT64 >> (WORD_BITS - 1 - c1));
}

/* Children of the node at @level based at bit @base that start inside the device. */
static guint64
valid_children(const CbtBitmap *bm, guint level, guint64 base)
{
  guint sh = level_shift(level - 1);
  guint64 n = (bm->nbits - base + (G_GUINT64_CONSTANT(1) << sh) - 1) >> sh;
  return n >= NODE_FANOUT ? G_MAXUINT64 : (G_GUINT64_CONSTANT(1) << n) - 1;
}

static inline guint64 *
my_stripe(CbtBitmap *bm)
{
  static gint next;
  static __thread gint stripe = -1;

  if (G_UNLIKELY(stripe < 0))
    stripe = g_atomic_int_add(&next, 1) % COUNT_STRIPES;
  return &bm->count[stripe].n;
}

/* Without -mpopcnt, popcount is a libgcc call; this is faster than that. */
static inline guint
popcount(guint64 x)
{
  x = x - ((x >> 1) & G_GUINT64_CONSTANT(0x5555555555555555));
  x = (x & G_GUINT64_CONSTANT(0x3333333333333333)) +
      ((x >> 2) & G_GUINT64_CONSTANT(0x3333333333333333));
  x = (x + (x >> 4)) & G_GUINT64_CONSTANT(0x0f0f0f0f0f0f0f0f);
  return (x * G_GUINT64_CONSTANT(0x0101010101010101)) >> 56;
}

/* What glibc's malloc spends on a block of @size bytes (header, 16-byte rounding). */
static inline gsize
alloc_cost(gsize size)
{
  return (size + sizeof(gsize) + 2 * sizeof(gsize) - 1) & ~(2 * sizeof(gsize) - 1);
}

CbtBitmap *
cbt_bitmap_new(guint64 size, guint32 granularity)
{
  g_return_val_if_fail(granularity >= CBT_BITMAP_MIN_GRANULARITY, NULL);
  g_return_val_if_fail(granularity <= CBT_BITMAP_MAX_GRANULARITY, NULL);
  g_return_val_if_fail((granularity & (granularity - 1)) == 0, NULL);
  g_return_val_if_fail(size <= G_GUINT64_CONSTANT(1) << 63, NULL);

  CbtBitmap *bm = g_aligned_alloc0(1, sizeof(CbtBitmap), CACHE_LINE);
  bm->size = size;
  bm->granularity = granularity;
  bm->gran_shift = g_bit_nth_lsf(granularity, -1);
  bm->nbits = (size + granularity - 1) >> bm->gran_shift;
  while (bm->height < MAX_HEIGHT - 1 && level_shift(bm->height) < 64 &&
         (G_GUINT64_CONSTANT(1) << level_shift(bm->height)) < bm->nbits)
    bm->height++;
  return bm;
}

/* Frees the subtree @p at @level; returns how many set bits it held. */
static guint64
free_subtree(CbtBitmap *bm, gpointer p, guint level)
{
  guint64 n = 0;

  if (!p)
    return 0;
  if (level == 0) {
    Leaf *leaf = p;
    for (guint i = 0; i < LEAF_WORDS; i++)
      n += popcount(leaf->w[i]);
    bm->leaves.n--;
  } else {
    Node *node = p;
    for (guint c = 0; c < NODE_FANOUT; c++)
      n += free_subtree(bm, node->child[c], level - 1);
    bm->nodes.n--;
  }
  g_free(p);
  return n;
}

void
cbt_bitmap_free(CbtBitmap *bm)
{
  if (!bm)
    return;
  free_subtree(bm, bm->root, bm->height);
  g_aligned_free(bm);
}

guint64
cbt_bitmap_get_size(const CbtBitmap *bm)
{
  return bm->size;
}

guint32
cbt_bitmap_get_granularity(const CbtBitmap *bm)
{
  return bm->granularity;
}

guint64
cbt_bitmap_get_nbits(const CbtBitmap *bm)
{
  return bm->nbits;
}

guint64
cbt_bitmap_count(const CbtBitmap *bm)
{
  guint64 n = 0;

  for (guint i = 0; i < COUNT_STRIPES; i++)
    n += LOAD(&bm->count[i].n);
  return n;
}

/* Every block with malloc's own overhead (it matches mallinfo2() in the bench), except the
 * alignment slack of the cache-aligned struct itself (~0.1 KiB). */
gsize
cbt_bitmap_get_memory(const CbtBitmap *bm)
{
  return alloc_cost(sizeof(*bm)) + LOAD(&bm->nodes.n) * alloc_cost(sizeof(Node)) +
         LOAD(&bm->leaves.n) * alloc_cost(sizeof(Leaf));
}

/* ---- the write path ---------------------------------------------------------------------- */

static gpointer
install_child(CbtBitmap *bm, gpointer *slot, guint level)
{
  gpointer fresh = level ? g_malloc0(sizeof(Node)) : g_malloc0(sizeof(Leaf));
  gpointer seen = NULL;

  if (__atomic_compare_exchange_n(slot, &seen, fresh, FALSE, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    if (level)
      ADD(&bm->nodes.n, 1);
    else
      ADD(&bm->leaves.n, 1);
    return fresh;
  }
  g_free(fresh);
  return seen;
}

/* The leaf holding @bit, installing what is missing when @create (else NULL when absent).
 * Fills path[l] with the ancestor at level l, 1 <= l <= height. */
static Leaf *
leaf_lookup(const CbtBitmap *bm, guint64 bit, gboolean create, Node **path)
{
  gpointer *slot = (gpointer *)&bm->root;

  for (guint level = bm->height;; level--) {
    gpointer p = LOAD(slot);
    if (!p) {
      if (!create)
        return NULL;
      p = install_child((CbtBitmap *)bm, slot, level);
    }
    if (level == 0)
      return p;
    path[level] = p;
    slot = &((Node *)p)->child[child_index(bit, level)];
  }
}

/* Is every bit of the device under @leaf (based at bit @base) set? */
static gboolean
leaf_is_full(const CbtBitmap *bm, const Leaf *leaf, guint64 base)
{
  guint64 valid = MIN(LEAF_BITS, bm->nbits - base);
  guint whole = valid / WORD_BITS;

  for (guint i = 0; i < whole; i++)
    if (LOAD(&leaf->w[i]) != G_MAXUINT64)
      return FALSE;
  if (valid % WORD_BITS)
    return LOAD(&leaf->w[whole]) == (G_GUINT64_CONSTANT(1) << (valid % WORD_BITS)) - 1;
  return TRUE;
}

/* Bits of the device in word @i (a device-wide word index). */
static inline guint64
word_valid(const CbtBitmap *bm, guint64 i)
{
  guint64 bits = bm->nbits - i * WORD_BITS;
  return bits >= WORD_BITS ? G_MAXUINT64 : (G_GUINT64_CONSTANT(1) << bits) - 1;
}

/* ORs @mask into @word (device-wide index @i); returns how many bits were clear before and
 * sets *@filled when this call completed the word (only then can the leaf have become full,
 * which spares the full check, and its cache misses, on most writes). With @plain (exclusive
 * callers) no atomic instruction is used. */
static inline guint
word_or(const CbtBitmap *bm, guint64 *word, guint64 i, guint64 mask, gboolean plain,
        gboolean *filled)
{
  guint64 old = __atomic_load_n(word, __ATOMIC_RELAXED);

  if ((old & mask) == mask)
    return 0;
  if (plain)
    *word = old | mask;
  else
    old = FETCH_OR(word, mask);
  if ((old | mask) == word_valid(bm, i))
    *filled = TRUE;
  return popcount(mask & ~old);
}

/* After setting bits in the leaf holding @bit: make every ancestor's nonempty bit visible and,
 * when the leaf is full, complete the full bits as far up as they go. */
static void
propagate(CbtBitmap *bm, const Leaf *leaf, guint64 bit, Node **path, gboolean filled)
{
  gboolean full = filled && leaf_is_full(bm, leaf, bit & ~(LEAF_BITS - 1));

  for (guint level = 1; level <= bm->height; level++) {
    Node *node = path[level];
    guint64 cbit = G_GUINT64_CONSTANT(1) << child_index(bit, level);

    if (!(LOAD(&node->nonempty) & cbit))
      FETCH_OR(&node->nonempty, cbit);
    if (full) {
      guint64 old = FETCH_OR(&node->full, cbit);
      guint64 base = bit & ~((G_GUINT64_CONSTANT(1) << level_shift(level)) - 1);
      full = !(old & cbit) && (old | cbit) == valid_children(bm, level, base);
    }
  }
}

/* Sets bits [first, last] (inclusive, inside the device); returns how many were clear. */
static guint64
mark_bits(CbtBitmap *bm, guint64 first, guint64 last)
{
  Node *path[MAX_HEIGHT];
  guint64 changed = 0;

  while (first <= last) {
    guint64 base = first & ~(LEAF_BITS - 1);
    guint64 stop = MIN(last, base + LEAF_BITS - 1);
    Leaf *leaf = leaf_lookup(bm, first, TRUE, path);
    guint wa = (first - base) / WORD_BITS, wb = (stop - base) / WORD_BITS;
    gboolean filled = FALSE;
    guint64 leaf_changed = 0;

    for (guint i = wa; i <= wb; i++) {
      guint lo = i == wa ? (first - base) % WORD_BITS : 0;
      guint hi = i == wb ? (stop - base) % WORD_BITS : WORD_BITS - 1;
      leaf_changed +=
        word_or(bm, &leaf->w[i], base / WORD_BITS + i, range_mask(lo, hi), FALSE, &filled);
    }
    /* Bits that were set already were propagated by whoever set them: a rewrite of a dirty
     * chunk, the common case, touches nothing above its leaf. */
    if (leaf_changed)
      propagate(bm, leaf, first, path, filled);
    changed += leaf_changed;
    first = stop + 1;
  }
  if (changed)
    ADD(my_stripe(bm), changed);
  return changed;
}

void
cbt_bitmap_mark_range(CbtBitmap *bm, guint64 offset, guint64 len)
{
  cbt_bitmap_mark_range_count(bm, offset, len);
}

guint64
cbt_bitmap_mark_range_count(CbtBitmap *bm, guint64 offset, guint64 len)
{
  if (len == 0 || offset >= bm->size)
    return 0;
  guint64 end = len > bm->size - offset ? bm->size : offset + len;
  return mark_bits(bm, offset >> bm->gran_shift, (end - 1) >> bm->gran_shift);
}

void
cbt_bitmap_read_words(const CbtBitmap *bm, guint64 first, guint64 n, guint64 *out)
{
  Node *path[MAX_HEIGHT];
  guint64 nwords = (bm->nbits + WORD_BITS - 1) / WORD_BITS;

  for (guint64 w = first; w < first + n;) {
    guint64 base = (w * WORD_BITS) & ~(LEAF_BITS - 1);
    guint64 stop = MIN(first + n, (base + LEAF_BITS) / WORD_BITS);
    const Leaf *leaf = w < nwords ? leaf_lookup(bm, w * WORD_BITS, FALSE, path) : NULL;
    for (; w < stop; w++)
      out[w - first] =
        GUINT64_TO_LE(leaf ? __atomic_load_n(&leaf->w[w - base / WORD_BITS], __ATOMIC_ACQUIRE) : 0);
  }
}

/* ORs the 64 words @src into the leaf based at bit @base (bits past the device already
 * masked off). The caller excludes every other user of @bm (merge, deserialize), but not of a
 * bitmap @src was read from. */
static void
or_leaf(CbtBitmap *bm, guint64 base, const guint64 *src)
{
  Node *path[MAX_HEIGHT];
  gboolean filled = FALSE;
  guint64 n = 0;
  guint i;

  for (i = 0; i < LEAF_WORDS && !src[i]; i++)
    ;
  if (i == LEAF_WORDS)
    return;
  Leaf *leaf = leaf_lookup(bm, base, TRUE, path);
  for (; i < LEAF_WORDS; i++)
    if (src[i])
      n += word_or(bm, &leaf->w[i], base / WORD_BITS + i, src[i], TRUE, &filled);
  propagate(bm, leaf, base, path, filled);
  if (n)
    ADD(my_stripe(bm), n);
}

/* ---- readers ----------------------------------------------------------------------------- */

gboolean
cbt_bitmap_get(const CbtBitmap *bm, guint64 offset)
{
  Node *path[MAX_HEIGHT];

  if (offset >= bm->size)
    return FALSE;
  guint64 bit = offset >> bm->gran_shift;
  const Leaf *leaf = leaf_lookup(bm, bit, FALSE, path);
  guint i = (bit & (LEAF_BITS - 1)) / WORD_BITS;
  return leaf && (LOAD(&leaf->w[i]) >> (bit % WORD_BITS) & 1);
}

/* First bit in [from, to) of @leaf (based at @base) that is set, or clear when @clean. */
static gint64
leaf_find(const Leaf *leaf, guint64 base, guint64 from, guint64 to, gboolean clean)
{
  guint wa = (from - base) / WORD_BITS, wb = (to - 1 - base) / WORD_BITS;

  for (guint i = wa; i <= wb; i++) {
    guint64 w = LOAD(&leaf->w[i]);
    if (clean)
      w = ~w;
    if (i == wa)
      w &= G_MAXUINT64 << ((from - base) % WORD_BITS);
    if (i == wb)
      w &= G_MAXUINT64 >> (WORD_BITS - 1 - (to - 1 - base) % WORD_BITS);
    if (w)
      return base + (guint64)i * WORD_BITS + __builtin_ctzll(w);
  }
  return -1;
}

/* First set (or clear, when @clean) bit in [from, to) under @p, a node at @level based at
 * @base; [from, to) lies inside that node and inside the device. */
static gint64
find_bit(gconstpointer p, guint level, guint64 base, guint64 from, guint64 to, gboolean clean)
{
  if (!p)
    return clean ? (gint64)from : -1;
  if (level == 0)
    return leaf_find(p, base, from, to, clean);

  const Node *node = p;
  guint sh = level_shift(level - 1);
  guint64 summary = clean ? ~LOAD(&node->full) : LOAD(&node->nonempty);
  guint64 cand = summary & range_mask((from - base) >> sh, (to - 1 - base) >> sh);

  while (cand) {
    guint c = __builtin_ctzll(cand);
    guint64 cbase = base + ((guint64)c << sh);
    guint64 cend = cbase + (G_GUINT64_CONSTANT(1) << sh);
    gint64 r =
      find_bit(LOAD(&node->child[c]), level - 1, cbase, MAX(from, cbase), MIN(to, cend), clean);
    if (r >= 0)
      return r;
    cand &= cand - 1;
  }
  return -1;
}

static gint64
next_offset(const CbtBitmap *bm, guint64 offset, guint64 end, gboolean clean)
{
  end = MIN(end, bm->size);
  if (offset >= end)
    return -1;
  guint64 from = offset >> bm->gran_shift;
  guint64 to = ((end - 1) >> bm->gran_shift) + 1;
  gint64 bit = find_bit(LOAD(&bm->root), bm->height, 0, from, to, clean);
  if (bit < 0)
    return -1;
  return MAX(offset, (guint64)bit << bm->gran_shift);
}

gint64
cbt_bitmap_next_dirty(const CbtBitmap *bm, guint64 offset, guint64 end)
{
  return next_offset(bm, offset, end, FALSE);
}

gint64
cbt_bitmap_next_clean(const CbtBitmap *bm, guint64 offset, guint64 end)
{
  return next_offset(bm, offset, end, TRUE);
}

/* ---- runs: one walk over the tree -------------------------------------------------------- */

/* State of cbt_bitmap_foreach_dirty_run(): a run is open from bit `start` while `in_run`. Each
 * leaf is scanned once, word by word, and whole subtrees are taken from the summaries (a full
 * child continues the run, a missing one ends it), so a run costs a few instructions rather
 * than two searches from the root. */
typedef struct {
  const CbtBitmap *bm;
  guint64 offset, end; /* byte range to report, runs clipped to it */
  CbtBitmapRunFunc fn;
  gpointer user_data;
  gboolean in_run;
  guint64 start;
} RunWalk;

/* Close the open run at bit @stop; FALSE when the caller's function asked to stop. */
static gboolean
run_close(RunWalk *w, guint64 stop)
{
  guint64 a = MAX(w->offset, w->start << w->bm->gran_shift);
  guint64 b = MIN(w->end, stop << w->bm->gran_shift);

  w->in_run = FALSE;
  return w->fn(a, b - a, w->user_data);
}

static void
run_open(RunWalk *w, guint64 bit)
{
  w->in_run = TRUE;
  w->start = bit;
}

/* Leaves lie in memory in the order of the first writes to them, not in bit order, so the
 * walk jumps from one to the next and each would start with a cache miss: the next leaf's lines
 * are asked for while this one is scanned. */
static inline void
prefetch_leaf(const Leaf *leaf)
{
  if (leaf)
    for (guint i = 0; i < LEAF_WORDS; i += CACHE_LINE / sizeof(guint64))
      __builtin_prefetch(&leaf->w[i]);
}

/* Runs in bits [from, to) of @leaf based at @base. A word's transitions are found all at once:
 * bit k of w ^ (w << 1 | carry) is set where bit k differs from the bit before it (the carry
 * being the state at the word's start), so each transition costs a ctz and no search, and a
 * word without one (all clear outside a run, all set inside one) costs a compare. */
static gboolean
leaf_runs(RunWalk *w, const Leaf *leaf, guint64 base, guint64 from, guint64 to)
{
  guint wa = (from - base) / WORD_BITS, wb = (to - 1 - base) / WORD_BITS;
  guint lo = (from - base) % WORD_BITS, hi = (to - base) % WORD_BITS;
  guint64 below = lo ? G_MAXUINT64 >> (WORD_BITS - lo) : 0;
  guint64 last = hi ? G_MAXUINT64 >> (WORD_BITS - hi) : G_MAXUINT64;
  guint64 carry = w->in_run ? 1 : 0; /* the state before the word: a register, not w */

  for (guint i = wa; i <= wb; i++) {
    guint64 word = __atomic_load_n(&leaf->w[i], __ATOMIC_RELAXED);
    if (i == wa) /* bits before @from continue the current state: no transition there */
      word = (word & ~below) | (carry ? below : 0);
    guint64 t = word ^ (word << 1 | carry);
    if (i == wb)
      t &= last;
    carry = word >> (WORD_BITS - 1);
    while (t) {
      guint64 hit = base + (guint64)i * WORD_BITS + __builtin_ctzll(t);
      t &= t - 1;
      if (w->in_run) {
        if (!run_close(w, hit))
          return FALSE;
      } else {
        run_open(w, hit);
      }
    }
  }
  return TRUE;
}

static gboolean subtree_runs(RunWalk *w, gconstpointer p, guint level, guint64 base, guint64 from,
                             guint64 to);

/* Runs in bits [from, to) of @node at @level based at @base. Outside a run, empty children are
 * skipped with one ctz over the summaries. */
static gboolean
node_runs(RunWalk *w, const Node *node, guint level, guint64 base, guint64 from, guint64 to)
{
  guint sh = level_shift(level - 1);
  guint c1 = (to - 1 - base) >> sh;

  for (guint c = (from - base) >> sh; c <= c1; c++) {
    guint64 full = LOAD(&node->full);
    if (!w->in_run) {
      guint64 cand = (LOAD(&node->nonempty) | full) & range_mask(c, c1);
      if (!cand)
        return TRUE;
      c = __builtin_ctzll(cand);
    }
    if (level == 1 && c < c1)
      prefetch_leaf(LOAD(&node->child[c + 1]));
    guint64 cbase = base + ((guint64)c << sh);
    guint64 cfrom = MAX(from, cbase), cto = MIN(to, cbase + (G_GUINT64_CONSTANT(1) << sh));
    if (full >> c & 1) {
      if (!w->in_run)
        run_open(w, cfrom);
    } else if (!subtree_runs(w, LOAD(&node->child[c]), level - 1, cbase, cfrom, cto)) {
      return FALSE;
    }
  }
  return TRUE;
}

static gboolean
subtree_runs(RunWalk *w, gconstpointer p, guint level, guint64 base, guint64 from, guint64 to)
{
  if (!p)
    return !w->in_run || run_close(w, from);
  if (level == 0)
    return leaf_runs(w, p, base, from, to);
  return node_runs(w, p, level, base, from, to);
}

void
cbt_bitmap_foreach_dirty_run(const CbtBitmap *bm, guint64 offset, guint64 len, CbtBitmapRunFunc fn,
                             gpointer user_data)
{
  if (offset >= bm->size || len == 0)
    return;
  guint64 end = len > bm->size - offset ? bm->size : offset + len;
  RunWalk w = { .bm = bm, .offset = offset, .end = end, .fn = fn, .user_data = user_data };
  guint64 from = offset >> bm->gran_shift, to = ((end - 1) >> bm->gran_shift) + 1;

  if (subtree_runs(&w, LOAD(&bm->root), bm->height, 0, from, to) && w.in_run)
    run_close(&w, to);
}

/* ---- exclusive mutators ------------------------------------------------------------------ */

/* Clears bits [from, to) under *@slot (a node at @level based at @base, the range inside it);
 * frees whatever becomes empty. Returns the number of bits that were set. */
static guint64
clear_subtree(CbtBitmap *bm, gpointer *slot, guint level, guint64 base, guint64 from, guint64 to)
{
  gpointer p = *slot;
  guint64 n = 0;

  if (!p)
    return 0;
  if (from == base && to >= MIN(base + (G_GUINT64_CONSTANT(1) << level_shift(level)), bm->nbits)) {
    *slot = NULL;
    return free_subtree(bm, p, level);
  }
  if (level == 0) {
    Leaf *leaf = p;
    guint wa = (from - base) / WORD_BITS, wb = (to - 1 - base) / WORD_BITS;
    guint64 any = 0;
    for (guint i = wa; i <= wb; i++) {
      guint lo = i == wa ? (from - base) % WORD_BITS : 0;
      guint hi = i == wb ? (to - 1 - base) % WORD_BITS : WORD_BITS - 1;
      guint64 m = range_mask(lo, hi);
      n += popcount(leaf->w[i] & m);
      leaf->w[i] &= ~m;
    }
    for (guint i = 0; i < LEAF_WORDS; i++)
      any |= leaf->w[i];
    if (!any) {
      *slot = NULL;
      free_subtree(bm, p, 0);
    }
    return n;
  }

  Node *node = p;
  guint sh = level_shift(level - 1);
  for (guint c = (from - base) >> sh; c <= (to - 1 - base) >> sh; c++) {
    guint64 cbase = base + ((guint64)c << sh);
    guint64 cend = cbase + (G_GUINT64_CONSTANT(1) << sh);
    guint64 k =
      clear_subtree(bm, &node->child[c], level - 1, cbase, MAX(from, cbase), MIN(to, cend));
    if (k)
      node->full &= ~(G_GUINT64_CONSTANT(1) << c);
    if (!node->child[c])
      node->nonempty &= ~(G_GUINT64_CONSTANT(1) << c);
    n += k;
  }
  if (!node->nonempty) {
    *slot = NULL;
    free_subtree(bm, p, level);
  }
  return n;
}

void
cbt_bitmap_clear_range(CbtBitmap *bm, guint64 offset, guint64 len)
{
  if (offset >= bm->size)
    return;
  guint64 end = len > bm->size - offset ? bm->size : offset + len;
  guint64 from = (offset + bm->granularity - 1) >> bm->gran_shift;
  guint64 to = end == bm->size ? bm->nbits : end >> bm->gran_shift;

  if (from >= to)
    return;
  guint64 n = clear_subtree(bm, &bm->root, bm->height, 0, from, to);
  SUB(my_stripe(bm), n);
}

void
cbt_bitmap_clear_all(CbtBitmap *bm)
{
  free_subtree(bm, bm->root, bm->height);
  bm->root = NULL;
  for (guint i = 0; i < COUNT_STRIPES; i++)
    STORE(&bm->count[i].n, 0);
}

/* Merging walks the source's leaves in order; a source leaf maps into one destination leaf
 * (when the destination is at least as coarse), gathered in @buf and flushed when the walk
 * moves on to another destination leaf. */
typedef struct {
  CbtBitmap *dst;
  guint shift;  /* log2(destination granularity / source granularity) */
  guint64 base; /* destination leaf gathered in buf, or G_MAXUINT64 */
  guint64 buf[LEAF_WORDS];
} Merger;

static void
merger_flush(Merger *m)
{
  if (m->base != G_MAXUINT64)
    or_leaf(m->dst, m->base, m->buf);
  m->base = G_MAXUINT64;
}

/* ORs source leaf @words (based at source bit @base) into the destination. */
static void
merger_add(Merger *m, guint64 base, const guint64 *words)
{
  guint64 dbase = (base >> m->shift) & ~(LEAF_BITS - 1);

  if (dbase != m->base) {
    merger_flush(m);
    memset(m->buf, 0, sizeof(m->buf));
    m->base = dbase;
  }
  for (guint i = 0; i < LEAF_WORDS; i++) {
    guint64 w = words[i];
    guint64 bit0 = base + (guint64)i * WORD_BITS;
    while (w) {
      /* One destination bit per group of 2^shift source bits: set it, skip the group. */
      guint64 d = (bit0 + __builtin_ctzll(w)) >> m->shift;
      guint64 next = ((d + 1) << m->shift) - bit0;
      m->buf[(d - dbase) / WORD_BITS] |= G_GUINT64_CONSTANT(1) << (d % WORD_BITS);
      w = next >= WORD_BITS ? 0 : w & (G_MAXUINT64 << next);
    }
  }
}

/* Feeds every leaf under @p (a source node at @level based at @base) to @m. */
static void
merge_subtree(Merger *m, gconstpointer p, guint level, guint64 base)
{
  if (!p)
    return;
  if (level == 0) {
    guint64 words[LEAF_WORDS];
    for (guint i = 0; i < LEAF_WORDS; i++)
      words[i] = LOAD(&((const Leaf *)p)->w[i]);
    if (m->shift == 0)
      or_leaf(m->dst, base, words);
    else
      merger_add(m, base, words);
    return;
  }
  const Node *node = p;
  guint sh = level_shift(level - 1);
  for (guint64 cand = LOAD(&node->nonempty); cand; cand &= cand - 1) {
    guint c = __builtin_ctzll(cand);
    merge_subtree(m, LOAD(&node->child[c]), level - 1, base + ((guint64)c << sh));
  }
}

static gboolean
merge_run(guint64 offset, guint64 len, gpointer dst)
{
  cbt_bitmap_mark_range(dst, offset, len);
  return TRUE;
}

void
cbt_bitmap_merge(CbtBitmap *dst, const CbtBitmap *src)
{
  g_return_if_fail(dst->size == src->size);

  if (dst->granularity < src->granularity) {
    /* Each source chunk spreads over several destination chunks: mark its runs. */
    cbt_bitmap_foreach_dirty_run(src, 0, src->size, merge_run, dst);
    return;
  }
  g_autofree Merger *m = g_new(Merger, 1);
  m->dst = dst;
  m->shift = dst->gran_shift - src->gran_shift;
  m->base = G_MAXUINT64;
  merge_subtree(m, LOAD(&src->root), src->height, 0);
  merger_flush(m);
}

CbtBitmap *
cbt_bitmap_copy(const CbtBitmap *bm)
{
  /* Rebuilt leaf by leaf rather than cloned node by node, so that summaries and count agree
   * with the copied bits even while marks run on @bm. */
  CbtBitmap *copy = cbt_bitmap_new(bm->size, bm->granularity);
  cbt_bitmap_merge(copy, bm);
  return copy;
}

/* ---- serialization ----------------------------------------------------------------------- */

typedef struct {
  CbtBitmapSerializeFunc fn;
  gpointer user_data;
  guint64 zeros; /* pending zero bytes */
} Serializer;

static void
ser_flush(Serializer *s)
{
  while (s->zeros) {
    gsize n = MIN(s->zeros, G_GUINT64_CONSTANT(1) << 30);
    s->fn(NULL, n, s->user_data);
    s->zeros -= n;
  }
}

/* Bytes of serialization for the @bits bits from bit @base on (a multiple of 64), clipped to
 * the end of the stream (the device's bits padded to whole words). */
static guint64
ser_bytes(const CbtBitmap *bm, guint64 base, guint64 bits)
{
  guint64 padded = (bm->nbits + WORD_BITS - 1) & ~(guint64)(WORD_BITS - 1);
  return (MIN(base + bits, padded) - base) / 8;
}

static void
ser_subtree(const CbtBitmap *bm, Serializer *s, gconstpointer p, guint level, guint64 base)
{
  guint64 span = G_GUINT64_CONSTANT(1) << level_shift(level);

  if (!p) {
    s->zeros += ser_bytes(bm, base, span);
    return;
  }
  if (level == 0) {
    guint64 words[LEAF_WORDS];
    for (guint i = 0; i < LEAF_WORDS; i++)
      words[i] = GUINT64_TO_LE(LOAD(&((const Leaf *)p)->w[i]));
    ser_flush(s);
    s->fn((const guint8 *)words, ser_bytes(bm, base, span), s->user_data);
    return;
  }
  const Node *node = p;
  guint sh = level_shift(level - 1);
  for (guint c = 0; c < NODE_FANOUT; c++) {
    guint64 cbase = base + ((guint64)c << sh);
    if (cbase >= bm->nbits)
      break;
    ser_subtree(bm, s, LOAD(&node->child[c]), level - 1, cbase);
  }
}

void
cbt_bitmap_serialize(const CbtBitmap *bm, CbtBitmapSerializeFunc fn, gpointer user_data)
{
  Serializer s = { fn, user_data, 0 };

  /* QEMU's bitmap of a zero-length device still has one (zero) word, so its hash is that of
   * 8 zero bytes; match it. */
  if (bm->nbits == 0) {
    fn(NULL, sizeof(guint64), user_data);
    return;
  }
  ser_subtree(bm, &s, LOAD(&bm->root), bm->height, 0);
  ser_flush(&s);
}

static void
hash_piece(const guint8 *data, gsize len, gpointer checksum)
{
  static const guint8 zeros[64 * 1024];

  if (data) {
    g_checksum_update(checksum, data, len);
    return;
  }
  while (len) {
    gsize n = MIN(len, sizeof(zeros));
    g_checksum_update(checksum, zeros, n);
    len -= n;
  }
}

char *
cbt_bitmap_sha256(const CbtBitmap *bm)
{
  g_autoptr(GChecksum) checksum = g_checksum_new(G_CHECKSUM_SHA256);

  cbt_bitmap_serialize(bm, hash_piece, checksum);
  return g_strdup(g_checksum_get_string(checksum));
}

void
cbt_bitmap_deserialize_part(CbtBitmap *bm, guint64 byte_offset, const guint8 *data, gsize len)
{
  guint64 total = ser_bytes(bm, 0, bm->nbits + WORD_BITS - 1);
  const guint64 leaf_bytes = LEAF_BITS / 8;

  if (byte_offset >= total)
    return;
  len = MIN(len, total - byte_offset);
  while (len) {
    guint64 leaf_start = byte_offset & ~(leaf_bytes - 1);
    gsize at = byte_offset - leaf_start;
    gsize n = MIN(len, leaf_bytes - at);
    guint64 words[LEAF_WORDS] = { 0 };
    guint64 base = leaf_start * 8;

    memcpy((guint8 *)words + at, data, n);
    for (guint i = 0; i < LEAF_WORDS; i++) {
      guint64 bit0 = base + (guint64)i * WORD_BITS;
      words[i] = GUINT64_FROM_LE(words[i]);
      if (bit0 >= bm->nbits)
        words[i] = 0;
      else if (bm->nbits - bit0 < WORD_BITS)
        words[i] &= (G_GUINT64_CONSTANT(1) << (bm->nbits - bit0)) - 1;
    }
    or_leaf(bm, base, words);
    data += n;
    byte_offset += n;
    len -= n;
  }
}
