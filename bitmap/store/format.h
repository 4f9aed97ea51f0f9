/* bitmap/store/format.h — the store file, byte by byte (docs/bitmaps.md, "The store file").
 *
 * All integers are little-endian. The file is sparse; offsets are bytes from its start.
 *
 *   0        header copy 0   (one 4 KiB page; the structure fits in one 512-byte sector)
 *   4096     header copy 1
 *   8192     directory A     (CBT_STORE_DIR_MAX bytes)
 *   +DIR_MAX directory B
 *   then     intent slot 0, intent slot 1 (a page of slot header, then one bit per region)
 *   then     the bitmaps' areas: each the bitmap's serialization (QEMU's: chunk i is bit i % 8
 *            of byte i / 8), mostly holes
 *
 * A header copy is valid when its magic, version and checksum (SHA-256 of the bytes before
 * it) hold; the valid copy with the higher `seq` is the header. Writes alternate between the
 * copies, so a torn write leaves the other one intact. A directory is valid when its magic,
 * checksum and the `dir_seq` the header names agree. Reserved bytes are zero and ignored, so a
 * later version can give them meaning (a bitmap's checkpoint history goes in the entry's
 * reserved words or in an area of its own named there).
 */
#pragma once

#include <glib.h>

G_BEGIN_DECLS

G_STATIC_ASSERT(G_BYTE_ORDER == G_LITTLE_ENDIAN); /* the structures below are read in place */

#define CBT_STORE_MAGIC "CBTSTOR\x01"
#define CBT_STORE_DIR_MAGIC "CBTDIR\x00\x01"
#define CBT_STORE_SLOT_MAGIC "CBTINT\x00\x01"
#define CBT_STORE_VERSION 1u
#define CBT_STORE_PAGE 4096u
#define CBT_STORE_DIR_OFFSET (2 * CBT_STORE_PAGE)
#define CBT_STORE_DIR_MAX (256u << 10)
#define CBT_STORE_SLOTS_OFFSET (CBT_STORE_DIR_OFFSET + 2 * CBT_STORE_DIR_MAX)
/* Areas start at multiples of this, the first one past the slots (which end before it). */
#define CBT_STORE_AREA_ALIGN (G_GUINT64_CONSTANT(1) << 20)

enum {
  CBT_STORE_HDR_IN_USE = 1 << 0,   /* opened for writing and not closed cleanly since */
  CBT_STORE_HDR_DEGRADED = 1 << 1, /* a fine-map write failed: recovery ORs intents always */
};

typedef struct {
  char magic[8];
  guint32 version;
  guint32 header_len;
  guint64 seq;
  guint64 device_size;
  guint32 flags;
  guint32 region_shift; /* an intent region is 1 << region_shift bytes */
  guint64 synced_epoch; /* every mark of an epoch <= this is in the areas, durably */
  guint64 dir_offset;
  guint64 dir_seq;
  guint64 slot_offset[2];
  guint64 slot_len; /* bytes of each slot, its header page included */
  char identity[192];
  char boot_id[48];
  guint8 reserved[152];
  guint8 checksum[32];
} CbtStoreHeader;
G_STATIC_ASSERT(sizeof(CbtStoreHeader) == 512);

typedef struct {
  char magic[8];
  guint64 seq;
  guint32 count;
  guint32 len;        /* bytes of entries after this head */
  char identity[192]; /* the header's, so a store that lost both headers still knows its device */
  guint8 reserved[40];
  guint8 checksum[32]; /* SHA-256 of the head before it and of the entries */
} CbtStoreDirHead;
G_STATIC_ASSERT(sizeof(CbtStoreDirHead) == 288);

enum {
  CBT_STORE_ENTRY_RECORDING = 1 << 0,
  CBT_STORE_ENTRY_INCONSISTENT = 1 << 1, /* the area could not be kept a superset */
  CBT_STORE_ENTRY_SUMMED = 1 << 2,       /* `sum` is the area's checksum (bitmap/store/sum.c) */
};

typedef struct {
  guint32 entry_len; /* this structure, the name and padding to 8 bytes */
  guint32 name_len;
  guint32 granularity;
  guint32 flags;
  guint64 size; /* bytes the bitmap covers */
  guint64 area_offset;
  guint64 area_len;
  guint8 uuid[16]; /* the bitmap's identity, stable across renames of its node */
  guint64 created; /* Unix time */
  guint8 sum[32];  /* with CBT_STORE_ENTRY_SUMMED: written by a clean stop */
  guint32 broken;  /* 0 while the bitmap has recorded without a break since `created`; else
                    * why it broke (CbtDirtyBitmapBreak: bitmap/dirty-bitmap.h) */
  guint32 reserved32;
  guint64 reserved[3];
  /* the name follows, not NUL-terminated */
} CbtStoreDirEntry;
G_STATIC_ASSERT(sizeof(CbtStoreDirEntry) == 128);

typedef struct {
  char magic[8];
  guint64 epoch;
  guint64 nregions;
  guint8 reserved[8];
  guint8 checksum[32];
} CbtStoreSlotHead;
G_STATIC_ASSERT(sizeof(CbtStoreSlotHead) == 64);

G_END_DECLS
