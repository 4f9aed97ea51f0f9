/* bitmap/store/store.h — persistent dirty bitmaps: a store file that holds the bitmaps of one
 * device, survives every kind of stop, and after an unclean one brings each bitmap back with no
 * chunk missing and a reported, bounded widening (docs/bitmaps.md, "Persistence").
 *
 * The store knows bitmaps (CbtBitmap) and a device's size and identity, never block nodes:
 * dirty-bitmaps/persist.c binds a store to a node. Every byte goes through a CbtStoreIo
 * (bitmap/store/io.h), so tests can fail or crash any call on purpose.
 *
 * Lifecycle (main thread):
 *   cbt_store_open()      load (and recover) the bitmaps, mark the store in use, durably
 *   cbt_store_loaded()    what the load found, for the caller to adopt
 *   cbt_store_add() / _remove() / _set_recording() / _rewrite() / _resize() / _sync()
 *                         each durable when it returns TRUE
 *   cbt_store_close()     final sync and "stopped cleanly", durably; then free
 * Write path (any thread, between the node's io_begin and io_end):
 *   cbt_store_mark()      marks every recording bitmap of the store, in memory and on disk,
 *                         before the caller may issue the data write (the ordering rule at the
 *                         top of store.c). It never fails: a store write that fails degrades
 *                         the store (wider recovery, never a missing mark) and is reported.
 * add, remove and set_recording change the set cbt_store_mark() walks: the caller holds the
 * device drained around them, as for cbt_blockdev_track_bitmap().
 */
#pragma once

#include <glib.h>

#include "bitmap/bitmap.h"
#include "bitmap/store/io.h"

G_BEGIN_DECLS

#define CBT_STORE_ERROR (cbt_store_error_quark())
GQuark cbt_store_error_quark(void);
typedef enum {
  CBT_STORE_ERROR_IO,      /* a call of the I/O layer failed (message names the store) */
  CBT_STORE_ERROR_CORRUPT, /* not a store, a newer version, or no valid header */
  CBT_STORE_ERROR_FOREIGN, /* the store belongs to another device */
  CBT_STORE_ERROR_BUSY,    /* another process holds it open for writing */
  CBT_STORE_ERROR_INVALID, /* a request the store cannot take (too large, bad name, ...) */
} CbtStoreError;

typedef struct CbtStore CbtStore;

/* How a store is opened. */
typedef struct {
  guint64 size;           /* the device's size in bytes */
  const char *identity;   /* the device's identity (dirty-bitmaps/persist.c chooses it) */
  guint64 region_size;    /* intent region in bytes, a power of two >= 1 MiB (0: default) */
  guint sync_interval_ms; /* the fine map is synced this often while it changes (0: default) */
  gboolean create;        /* create the store when it does not exist */
} CbtStoreConfig;

#define CBT_STORE_DEFAULT_REGION_SIZE (G_GUINT64_CONSTANT(64) << 20)
#define CBT_STORE_DEFAULT_SYNC_INTERVAL_MS 10000u
/* The fine map of one bitmap (size / granularity / 8 bytes) may not exceed this. */
#define CBT_STORE_MAX_AREA (G_GUINT64_CONSTANT(1) << 40)

/* How the last stop is judged at open. */
typedef enum {
  CBT_STORE_STOP_CLEAN,   /* closed by cbt_store_close(): exact */
  CBT_STORE_STOP_PROCESS, /* the process died, the kernel lived on (same boot): exact */
  CBT_STORE_STOP_SYSTEM,  /* power loss or kernel crash (another boot): intent regions ORed in */
  CBT_STORE_STOP_NEW,     /* the store was created by this open */
} CbtStoreStop;

/* A bitmap's identity, kept with it (docs/bitmaps.md, "Identity"): the store keeps it, the
 * caller gives it meaning. */
typedef struct {
  guint8 uuid[16];
  guint64 created; /* Unix time */
  guint32 broken;  /* 0: unbroken; else a reason code of the caller's */
} CbtStoreIdentity;

/* One bitmap as the load found it. */
typedef struct {
  char *name;
  CbtStoreIdentity id;
  guint32 granularity;
  gboolean recording;
  gboolean inconsistent; /* its bits could not be read back: only remove may follow */
  CbtBitmap *bitmap;     /* NULL when inconsistent; owned by the store until taken */
  guint64 widened;       /* bytes set by recovery that the synced map did not have */
  char *reason;          /* why it was widened or is inconsistent, or NULL */
} CbtStoreBitmap;

/* Open the store at @path through @io (NULL: the real file system), take its write lock, check
 * its identity against @config, recover after an unclean stop and mark it in use durably. */
CbtStore *cbt_store_open(const char *path, const CbtStoreConfig *config, const CbtStoreIo *io,
                         GError **error);
const char *cbt_store_get_path(const CbtStore *store);
CbtStoreStop cbt_store_last_stop(const CbtStore *store);

/* The bitmaps the open found, in store order (owned by the store; array of CbtStoreBitmap *).
 * The caller takes a bitmap with cbt_store_take_bitmap(), which passes ownership of its
 * CbtBitmap but leaves the store marking it while it records. */
GPtrArray *cbt_store_loaded(CbtStore *store);
CbtBitmap *cbt_store_take_bitmap(CbtStore *store, const char *name);

/* Add @bm (borrowed: it must outlive its entry) as @name, recording or not, with a fresh
 * identity (cbt_store_add) or @id. */
gboolean cbt_store_add(CbtStore *store, const char *name, CbtBitmap *bm, gboolean recording,
                       GError **error);
gboolean cbt_store_add_full(CbtStore *store, const char *name, CbtBitmap *bm, gboolean recording,
                            const CbtStoreIdentity *id, GError **error);
/* Record, durably, @name's break code (0: unbroken, for an undo). */
gboolean cbt_store_set_broken(CbtStore *store, const char *name, guint32 code, GError **error);
gboolean cbt_store_remove(CbtStore *store, const char *name, GError **error);
gboolean cbt_store_set_recording(CbtStore *store, const char *name, gboolean recording,
                                 GError **error);
/* The bitmap's bits changed other than by marks (clear, merge, restore): write them all. */
gboolean cbt_store_rewrite(CbtStore *store, const char *name, GError **error);
/* Point @name at another CbtBitmap (a resize or a transaction's undo replaced it) and write it. */
gboolean cbt_store_replace_bitmap(CbtStore *store, const char *name, CbtBitmap *bm, GError **error);
/* The device is now @size bytes (the bitmaps were already resized by the caller). */
gboolean cbt_store_resize(CbtStore *store, guint64 size, GError **error);
guint cbt_store_count(const CbtStore *store);

/* The write path: see the header comment. */
void cbt_store_mark(CbtStore *store, guint64 offset, guint64 len);

/* Make every mark so far durable now, and retire intent regions that went idle. */
gboolean cbt_store_sync(CbtStore *store, GError **error);

/* A store write failed (any thread): @what says what, errno-like @err. Called once per new
 * failure state; the store keeps working degraded. */
typedef void (*CbtStoreErrorFunc)(CbtStore *store, const char *what, int err, gpointer data);
void cbt_store_set_error_func(CbtStore *store, CbtStoreErrorFunc fn, gpointer data);
/* Is the store degraded (a failure since open that recovery will widen for)? */
gboolean cbt_store_is_degraded(const CbtStore *store);

/* Where a store at @path that could not be written at all records that (outside itself, in
 * $CBTD_RUN_DIR, else /run/cbtd for root, else $XDG_RUNTIME_DIR/cbtd), so that the next open on
 * this boot loads its bitmaps inconsistent. Transfer full. */
char *cbt_store_failure_marker(const char *path);

/* Close cleanly: sync, record a clean stop, release the lock, free. FALSE (and the store still
 * freed) when the final writes failed: the next open then recovers as after a crash. */
gboolean cbt_store_close(CbtStore *store, GError **error);
/* Free without the clean-stop record, as a crash would leave it (tests). */
void cbt_store_abandon(CbtStore *store);

G_END_DECLS
