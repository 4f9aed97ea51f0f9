/* bitmap/store/sum.c — a checksum of a bitmap's bits that memory and the store file can both
 * compute in time proportional to the dirty data, not to the device: SHA-256 over every
 * maximal run of non-zero 64-bit words as (index of its first word, the words, its length).
 * Holes, zero words and how the bits happen to be split into pieces do not change it.
 *
 * A clean stop records it per bitmap; the next open compares it with the area it reads, so bit
 * rot in an area is caught instead of loading a bitmap that misses marks (store.c, (5)).
 */
#include "bitmap/store/store-internal.h"

#include <string.h>

void
cbt_store_sum_init(CbtStoreSum *sum)
{
  memset(sum, 0, sizeof *sum);
  sum->c = g_checksum_new(G_CHECKSUM_SHA256);
}

static void
end_run(CbtStoreSum *sum)
{
  if (sum->run_len) {
    guint64 le = GUINT64_TO_LE(sum->run_len);
    g_checksum_update(sum->c, (const guint8 *)&le, sizeof le);
    sum->run_len = 0;
  }
}

void
cbt_store_sum_feed(CbtStoreSum *sum, guint64 index, const guint64 *words, gsize n)
{
  for (gsize i = 0; i < n; i++, index++) {
    if (!words[i]) {
      end_run(sum);
      continue;
    }
    if (sum->run_len && index != sum->next) /* a gap: zeros in between */
      end_run(sum);
    if (!sum->run_len) {
      guint64 le = GUINT64_TO_LE(index);
      g_checksum_update(sum->c, (const guint8 *)&le, sizeof le);
    }
    g_checksum_update(sum->c, (const guint8 *)&words[i], sizeof words[i]);
    sum->run_len++;
    sum->next = index + 1;
  }
}

void
cbt_store_sum_finish(CbtStoreSum *sum, guint8 out[32])
{
  gsize len = 32;

  end_run(sum);
  g_checksum_get_digest(sum->c, out, &len);
  g_checksum_free(sum->c);
  sum->c = NULL;
}

typedef struct {
  CbtStoreSum sum;
  guint64 pos; /* bytes */
} MemSum;

static void
mem_piece(const guint8 *data, gsize len, gpointer p)
{
  MemSum *m = p;

  if (data) {
    g_autofree guint64 *w = g_memdup2(data, len);
    cbt_store_sum_feed(&m->sum, m->pos / 8, w, len / 8);
  }
  m->pos += len;
}

void
cbt_store_sum_bitmap(const CbtBitmap *bm, guint8 out[32])
{
  MemSum m;

  cbt_store_sum_init(&m.sum);
  m.pos = 0;
  cbt_bitmap_serialize(bm, mem_piece, &m);
  cbt_store_sum_finish(&m.sum, out);
}
