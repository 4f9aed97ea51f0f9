/* bitmap/store/store-internal.h — what the files of bitmap/store/ share. */
#pragma once

#include <pthread.h>

#include "bitmap/store/format.h"
#include "bitmap/store/store.h"

G_BEGIN_DECLS

typedef struct {
  char *name;
  guint32 granularity;
  gboolean recording;
  gboolean inconsistent; /* on disk: the area may miss bits (see store.c, invariant 5) */
  CbtBitmap *bm;         /* borrowed from the caller (or owned by `loaded` until taken) */
  guint64 area_offset, area_len;
  guint8 uuid[16];
  guint64 created;
  guint32 broken;
  gboolean summed; /* `sum` holds the checksum of the area (a clean stop wrote it) */
  guint8 sum[32];
} CbtStoreEntry;

/* The recording entries, swapped whole while the device is drained (the write path reads it
 * without a lock). */
typedef struct {
  guint n;
  CbtStoreEntry *e[];
} CbtStoreRecSet;

struct CbtStore {
  char *path;
  const CbtStoreIo *io;
  CbtStoreFile *f;
  CbtStoreHeader hdr; /* as last written */
  guint64 size;
  GPtrArray *entries; /* CbtStoreEntry *, directory order */
  GPtrArray *loaded;  /* CbtStoreBitmap * */
  CbtStoreStop last_stop;
  guint sync_interval_ms;

  CbtStoreRecSet *rec; /* atomic */

  /* The write path's state, under `lock`. */
  pthread_mutex_t lock;
  pthread_cond_t synced; /* intent_synced advanced, or a sync failed */
  guint64 nregions, region_words;
  guint region_shift;
  guint64 *durable[2]; /* per slot: regions whose intent is durable (read without the lock) */
  guint64 *written[2]; /* per slot: regions written to the slot file (maybe not yet synced) */
  guint64 *touched[2]; /* per slot: regions written to during its epoch (read and ORed freely) */
  guint cur;           /* atomic: the slot of the current epoch */
  guint64 epoch;       /* the current epoch's number */
  guint64 intent_gen, intent_synced; /* group commit of intent writes */
  gboolean intent_syncing;
  gboolean fine_dirty; /* atomic: area writes since the last sync */
  gboolean degraded;   /* atomic */
  guint64 fail_gen;    /* under `lock`: area writes failed so far */
  gboolean failed;     /* atomic: even the preallocated metadata could not be written */
  CbtStoreErrorFunc err_fn;
  gpointer err_data;

  /* The syncer thread. */
  GThread *syncer;
  pthread_mutex_t sync_lock; /* one sync at a time; taken before `lock` */
  pthread_cond_t wake;
  gboolean stopping; /* under sync_lock */
};

/* sum.c: the checksum of a bitmap's bits, fed in word order. */
typedef struct {
  GChecksum *c;
  guint64 run_len, next;
} CbtStoreSum;
void cbt_store_sum_init(CbtStoreSum *sum);
void cbt_store_sum_feed(CbtStoreSum *sum, guint64 index, const guint64 *words, gsize n);
void cbt_store_sum_finish(CbtStoreSum *sum, guint8 out[32]);
void cbt_store_sum_bitmap(const CbtBitmap *bm, guint8 out[32]);

/* store.c */
int cbt_store_write_header(CbtStore *s);
int cbt_store_write_dir(CbtStore *s);
int cbt_store_fit_area(CbtStore *s, CbtStoreEntry *e);
void cbt_store_report(CbtStore *s, const char *what, int err);
void cbt_store_fail(CbtStore *s, const char *what, int err);
guint64 cbt_store_area_len(guint64 size, guint32 granularity);
/* load.c: read the header and directory and recover the bitmaps; fills s->hdr, s->entries,
 * s->loaded and s->last_stop. */
gboolean cbt_store_load(CbtStore *s, const CbtStoreConfig *config, GError **error);
gboolean cbt_store_header_valid(const CbtStoreHeader *h);
void cbt_store_checksum(guint8 out[32], const void *a, gsize alen, const void *b, gsize blen);
guint cbt_store_region_shift(CbtStore *s, guint64 region_size);
/* mark.c */
/* Fresh intent slots: the current epoch @epoch0 + 1, both slots empty and durable; sets
 * synced_epoch to @epoch0 in memory (the caller writes the header). Every mark so far must be
 * durable in the areas. */
int cbt_store_intents_init(CbtStore *s, guint64 epoch0);
/* The same after a resize: the region size may have to grow. */
int cbt_store_intents_reset(CbtStore *s);
void cbt_store_intents_free(CbtStore *s);
/* A sync (an epoch's end) now; @final: also when nothing changed, and retire every region. */
int cbt_store_sync_locked_out(CbtStore *s, gboolean final);
int cbt_store_write_area(CbtStore *s, CbtStoreEntry *e);
void cbt_store_syncer_start(CbtStore *s);
void cbt_store_syncer_stop(CbtStore *s);
void cbt_store_publish_recording(CbtStore *s);

G_END_DECLS
