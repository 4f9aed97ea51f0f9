/* bitmap/dirty-bitmap.h — CbtDirtyBitmap, a named dirty bitmap of one block node, and QEMU's
 * rules for it as pure functions (name and granularity checks, default granularity, state
 * checks with QEMU 7.2's error texts).
 *
 * State (QEMU's model; docs/bitmaps.md, "States"):
 *   recording     !disabled: writes to the node set bits
 *   busy          busy count > 0: bound to an export/job; only queries and sha256 work
 *   read-only     loaded from a read-only qcow2: no clear, remove, merge-into
 *   persistent    stored in the qcow2 at close
 *   inconsistent  found in use at open: never recording, count 0, only remove/query/sha256
 *
 * Operation matrix (✓ allowed, ✗ refused; flags for cbt_dirty_bitmap_check()):
 *                 busy  read-only  inconsistent   flags
 *   remove         ✗       ✗           ✓          BUSY | READ_ONLY
 *   clear          ✗       ✗           ✗          ALL
 *   enable/disable ✗       ✓           ✗          BUSY | INCONSISTENT
 *   merge target   ✗       ✗           ✗          ALL
 *   merge source   ✗       ✓           ✗          BUSY | INCONSISTENT
 *   export         ✗       ✓           ✗          BUSY | INCONSISTENT
 *   sha256         ✓       ✓           ✓          0
 *
 * Threads: the object's flags belong to the control plane (main thread). Only its CbtBitmap is
 * touched from the write path (cbt_bitmap_mark_range(), lock-free); blockdev/ decides whether
 * to mark from the recording flag it reads when the device is drained.
 */
#pragma once

#include <glib.h>

#include "bitmap/bitmap.h"

G_BEGIN_DECLS

#define CBT_BITMAP_ERROR (cbt_bitmap_error_quark())
GQuark cbt_bitmap_error_quark(void);
/* Every bitmap error is a QMP GenericError. */
typedef enum {
  CBT_BITMAP_ERROR_FAILED,
} CbtBitmapError;

/* QEMU's limit on bitmap names (qcow2 stores at most 1023 bytes). */
#define CBT_DIRTY_BITMAP_MAX_NAME 1023
/* The default granularity when the node has no cluster size (raw, file, null). */
#define CBT_DIRTY_BITMAP_DEFAULT_GRANULARITY 65536u

typedef enum {
  CBT_DIRTY_BITMAP_CHECK_BUSY = 1 << 0,
  CBT_DIRTY_BITMAP_CHECK_READ_ONLY = 1 << 1,
  CBT_DIRTY_BITMAP_CHECK_INCONSISTENT = 1 << 2,
  CBT_DIRTY_BITMAP_CHECK_ALL = 0x7,
  CBT_DIRTY_BITMAP_CHECK_ALLOW_RO =
    CBT_DIRTY_BITMAP_CHECK_BUSY | CBT_DIRTY_BITMAP_CHECK_INCONSISTENT,
} CbtDirtyBitmapCheckFlags;

/* "Bitmap name cannot be empty" for NULL or "" (QEMU checks this first of all). */
gboolean cbt_dirty_bitmap_check_name_present(const char *name, GError **error);
/* "Bitmap name too long: NAME" past 1023 bytes (QEMU checks this last, after "exists"). */
gboolean cbt_dirty_bitmap_check_name_length(const char *name, GError **error);
/* "Granularity must be power of 2 and at least 512" (the uint32 parse bounds it above). */
gboolean cbt_dirty_bitmap_check_granularity(guint64 granularity, GError **error);
/* QEMU's default: @cluster_size clamped to [4 KiB, 64 KiB]; 0 (no clusters) gives 64 KiB. */
guint32 cbt_dirty_bitmap_default_granularity(guint64 cluster_size);

typedef struct CbtDirtyBitmap CbtDirtyBitmap;

/* A new, empty, recording bitmap over @size bytes. @name may be NULL for an anonymous bitmap
 * (a job's internal one); names are not checked here (see the check functions). */
CbtDirtyBitmap *cbt_dirty_bitmap_new(const char *name, guint64 size, guint32 granularity);
/* Frees the object and its CbtBitmap; whoever made it busy must be gone. */
void cbt_dirty_bitmap_free(CbtDirtyBitmap *dbm);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CbtDirtyBitmap, cbt_dirty_bitmap_free)

/* NULL for an anonymous bitmap. Owned by @dbm. */
const char *cbt_dirty_bitmap_get_name(const CbtDirtyBitmap *dbm);
guint32 cbt_dirty_bitmap_get_granularity(const CbtDirtyBitmap *dbm);
guint64 cbt_dirty_bitmap_get_size(const CbtDirtyBitmap *dbm);
/* The bits (owned by @dbm): mark it from the write path while recording. */
CbtBitmap *cbt_dirty_bitmap_get_bitmap(const CbtDirtyBitmap *dbm);
/* Replaces the bits with @bm (transfer full, same size and granularity) and returns the old
 * ones (transfer full): for transactions' undo of clear and merge. */
CbtBitmap *cbt_dirty_bitmap_swap_bitmap(CbtDirtyBitmap *dbm, CbtBitmap *bm);
/* QEMU's bdrv_dirty_bitmap_truncate(): the bitmap now covers @size bytes; growing keeps every
 * bit and leaves the new area clean, shrinking drops the chunks that start past the end.
 * Returns the old bits (transfer full) for the caller to free once nothing uses them (the node
 * is drained around it). */
CbtBitmap *cbt_dirty_bitmap_truncate(CbtDirtyBitmap *dbm, guint64 size);
/* Bytes: set bits x granularity, not clipped to the device (QEMU's "count"). */
guint64 cbt_dirty_bitmap_get_count(const CbtDirtyBitmap *dbm);

gboolean cbt_dirty_bitmap_is_recording(const CbtDirtyBitmap *dbm);
void cbt_dirty_bitmap_set_recording(CbtDirtyBitmap *dbm, gboolean recording);
gboolean cbt_dirty_bitmap_is_busy(const CbtDirtyBitmap *dbm);
/* Busy is a count: each export or job holding the bitmap takes one reference. */
void cbt_dirty_bitmap_busy_ref(CbtDirtyBitmap *dbm);
void cbt_dirty_bitmap_busy_unref(CbtDirtyBitmap *dbm);
gboolean cbt_dirty_bitmap_is_persistent(const CbtDirtyBitmap *dbm);
void cbt_dirty_bitmap_set_persistent(CbtDirtyBitmap *dbm, gboolean persistent);
gboolean cbt_dirty_bitmap_is_read_only(const CbtDirtyBitmap *dbm);
void cbt_dirty_bitmap_set_read_only(CbtDirtyBitmap *dbm, gboolean read_only);
gboolean cbt_dirty_bitmap_is_inconsistent(const CbtDirtyBitmap *dbm);
/* Marks the bitmap inconsistent: it stops recording and its bits are dropped (count 0). */
void cbt_dirty_bitmap_set_inconsistent(CbtDirtyBitmap *dbm);

/* Identity (docs/bitmaps.md, "Identity"): a random UUID and a creation time given at
 * creation, kept by a persistent bitmap's store, and whether the bitmap has recorded every
 * write since then. A break is for good (re-enabling does not heal it): */
typedef enum {
  CBT_DIRTY_BITMAP_UNBROKEN = 0,
  CBT_DIRTY_BITMAP_BROKEN_CREATED_DISABLED = 1, /* it never recorded from the start */
  CBT_DIRTY_BITMAP_BROKEN_CLEARED = 2,
  CBT_DIRTY_BITMAP_BROKEN_DISABLED = 3,
  CBT_DIRTY_BITMAP_BROKEN_INCONSISTENT = 4, /* its bits could not be read back */
} CbtDirtyBitmapBreak;

const guint8 *cbt_dirty_bitmap_get_uuid(const CbtDirtyBitmap *dbm);
/* The UUID as text, 8-4-4-4-12 lower-case hex (transfer full). */
char *cbt_dirty_bitmap_get_uuid_string(const CbtDirtyBitmap *dbm);
guint64 cbt_dirty_bitmap_get_created(const CbtDirtyBitmap *dbm);
CbtDirtyBitmapBreak cbt_dirty_bitmap_get_break(const CbtDirtyBitmap *dbm);
/* What a break code says, for the query (NULL for CBT_DIRTY_BITMAP_UNBROKEN or unknown). */
const char *cbt_dirty_bitmap_break_text(CbtDirtyBitmapBreak why);
/* The identity a store kept (a loaded bitmap). */
void cbt_dirty_bitmap_set_identity(CbtDirtyBitmap *dbm, const guint8 uuid[16], guint64 created,
                                   CbtDirtyBitmapBreak broken);
/* Records a break; the first one stays. */
void cbt_dirty_bitmap_set_break(CbtDirtyBitmap *dbm, CbtDirtyBitmapBreak why);

/* Refuses, with QEMU's text, the first state among busy, read-only, inconsistent (in that
 * order) that @flags names and @dbm is in. */
gboolean cbt_dirty_bitmap_check(const CbtDirtyBitmap *dbm, CbtDirtyBitmapCheckFlags flags,
                                GError **error);

G_END_DECLS
