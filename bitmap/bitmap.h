/* bitmap/ — the sparse dirty bitmap: one bit per granularity-sized chunk of a device of up to
 * 2^63 bytes, with memory that follows the dirty data rather than the device size.
 *
 * Offsets and lengths are in bytes; a range marks or clears every chunk it overlaps (outward
 * rounding), except cbt_bitmap_clear_range(), which rounds as documented there.
 *
 * Threads: cbt_bitmap_mark_range() is lock-free and may run on any number of threads at once,
 * concurrently with the read-only calls (get, next, count, iterate, serialize). Every other
 * mutating call (clear, merge, deserialize, free) needs the caller to exclude all other users of
 * the bitmap (the device is drained around them).
 */
#pragma once

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef struct CbtBitmap CbtBitmap;

#define CBT_BITMAP_MIN_GRANULARITY 512u
#define CBT_BITMAP_MAX_GRANULARITY (1u << 31)

/* @size: bytes covered; @granularity: power of two in [MIN, MAX]. */
CbtBitmap *cbt_bitmap_new(guint64 size, guint32 granularity);
void cbt_bitmap_free(CbtBitmap *bm);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtBitmap, cbt_bitmap_free)

guint64 cbt_bitmap_get_size(const CbtBitmap *bm);
guint32 cbt_bitmap_get_granularity(const CbtBitmap *bm);
/* Number of chunks: ceil(size / granularity). */
guint64 cbt_bitmap_get_nbits(const CbtBitmap *bm);

/* Set every chunk overlapping [offset, offset + len), clipped to the size. */
void cbt_bitmap_mark_range(CbtBitmap *bm, guint64 offset, guint64 len);
/* The same, returning how many chunks were clear before (0: nothing changed). Lock-free. */
guint64 cbt_bitmap_mark_range_count(CbtBitmap *bm, guint64 offset, guint64 len);
/* Words [first, first + n) of the serialization (chunk i is bit i % 64 of word i / 64), as
 * little-endian 64-bit values; words past the end read as zero. Safe beside marks: a word
 * reflects at least every mark that returned before the call. */
void cbt_bitmap_read_words(const CbtBitmap *bm, guint64 first, guint64 n, guint64 *out);
/* Is the chunk holding byte @offset set? */
gboolean cbt_bitmap_get(const CbtBitmap *bm, guint64 offset);
/* Byte offset of the first set (dirty) / clear chunk at or after the chunk holding @offset and
 * before @end (clipped to the size), or -1 when there is none. The result is @offset itself when
 * its chunk qualifies, otherwise a chunk boundary. */
gint64 cbt_bitmap_next_dirty(const CbtBitmap *bm, guint64 offset, guint64 end);
gint64 cbt_bitmap_next_clean(const CbtBitmap *bm, guint64 offset, guint64 end);
/* Number of set chunks. */
guint64 cbt_bitmap_count(const CbtBitmap *bm);

/* Call @fn for each maximal run of set chunks that overlaps [offset, offset + len), clipped to
 * that range, in order; stop early when @fn returns FALSE. */
typedef gboolean (*CbtBitmapRunFunc)(guint64 offset, guint64 len, gpointer user_data);
void cbt_bitmap_foreach_dirty_run(const CbtBitmap *bm, guint64 offset, guint64 len,
                                  CbtBitmapRunFunc fn, gpointer user_data);

/* Clear every chunk that lies wholly inside [offset, offset + len), plus the last partial chunk
 * when the range reaches the end of the device. */
void cbt_bitmap_clear_range(CbtBitmap *bm, guint64 offset, guint64 len);
void cbt_bitmap_clear_all(CbtBitmap *bm);

/* dst |= src. Sizes must be equal (checked by the caller, as QEMU's error text needs them);
 * granularities may differ: a set source chunk sets every destination chunk it overlaps. */
void cbt_bitmap_merge(CbtBitmap *dst, const CbtBitmap *src);
/* A deep copy (for transactions' undo). */
CbtBitmap *cbt_bitmap_copy(const CbtBitmap *bm);

/* QEMU's serialization: the bits as little-endian 64-bit words, chunk i is bit (i % 8) of byte
 * (i / 8), padded with zero bits to a multiple of 8 bytes, at least one word (as QEMU). Calls
 * @fn with consecutive pieces of that byte stream (so a 1 PiB bitmap never needs a flat buffer);
 * all-zero stretches may be passed as @data == NULL with their length. */
typedef void (*CbtBitmapSerializeFunc)(const guint8 *data, gsize len, gpointer user_data);
void cbt_bitmap_serialize(const CbtBitmap *bm, CbtBitmapSerializeFunc fn, gpointer user_data);
/* SHA-256 (lower-case hex, transfer full) of that serialization, as
 * x-debug-block-dirty-bitmap-sha256 reports it. */
char *cbt_bitmap_sha256(const CbtBitmap *bm);
/* OR the serialized bytes [byte_offset, byte_offset + len) into the bitmap. */
void cbt_bitmap_deserialize_part(CbtBitmap *bm, guint64 byte_offset, const guint8 *data, gsize len);

/* Bytes of memory the bitmap holds now (for benchmarks and the memory targets). */
gsize cbt_bitmap_get_memory(const CbtBitmap *bm);

G_END_DECLS
