/* bitmap/store/store.c — the store's lifecycle, header and directory.
 *
 * Invariants (each survives a crash at any instant; tests/store/ replays every sync point):
 *  (1) Memory is a subset of the file: a bit of a recording bitmap is written to its area
 *      (at least into the page cache) before it is set in memory, under the store's lock; so
 *      a write that finds its chunks set may go on at once (mark.c). Broken only in the
 *      degraded state, which (4) makes durable first.
 *  (2) cbt_store_mark() reads the current epoch after its area write and returns only when
 *      the intent of every region it touches is durable in that epoch's slot. So whatever the
 *      data write leaves on the medium, either the area holds its mark durably once the epoch
 *      is synced, or a live slot names its region.
 *  (3) synced_epoch becomes e only after a sync that began after the epoch left e; a slot is
 *      reused only once its epoch is <= synced_epoch on disk.
 *  (4) The degraded flag is durable before a failed area write's mark returns; while it is set
 *      synced_epoch stays and each new slot holds every region of the old one.
 *  (5) An area is a superset of its bitmap, except inside a rewrite with the device drained; a
 *      rewrite that fails flags its entry inconsistent, durably, before the command fails.
 *  (6) The header goes to the copy that does not hold the current one, the directory to the
 *      area the header does not name; each is synced before anything depends on it. An area
 *      that must grow (a resize, live or found at open) moves to a place no area of the
 *      directory on disk covers, its own old one included, and is written and synced there
 *      before the directory that names it: until then the old area keeps every bit.
 *  (7) IN_USE and this boot's id are durable before cbt_store_open() returns; the flag is
 *      cleared only after the final sync of cbt_store_close().
 *
 * States, and the functions that move a store between them:
 *
 *   (absent) --open(create)--> IN USE --close()--> CLEAN --open()--> IN USE (exact)
 *                                |  ^
 *       area write fails (mark)  |  |  a sync rewrites every area (cbt_store_sync)
 *                                v  |
 *                              DEGRADED
 *   IN USE or DEGRADED --process killed--> open() on the same boot: exact (the page cache
 *                                          kept every area write), unless DEGRADED
 *   IN USE or DEGRADED --power lost--> open() on another boot: areas OR live intent regions
 */
#include "bitmap/store/store-internal.h"

#include <glib/gstdio.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>

G_DEFINE_QUARK(cbt - store - error - quark, cbt_store_error)

guint64
cbt_store_area_len(guint64 size, guint32 granularity)
{
  guint64 nbits = (size + granularity - 1) / granularity;
  guint64 bytes = MAX((nbits + 63) / 64, 1) * 8;

  return (bytes + CBT_STORE_PAGE - 1) / CBT_STORE_PAGE * CBT_STORE_PAGE;
}

/* One report per failure: the owner's (which knows the node), or else a warning here. */
void
cbt_store_report(CbtStore *s, const char *what, int err)
{
  if (s->err_fn)
    s->err_fn(s, what, err, s->err_data);
  else
    g_warning("bitmap store %s: %s: %s", s->path, what, g_strerror(err));
}

/* The failure marker of the store at @path: a file in the runtime directory (a tmpfs: it
 * outlives the process, not the boot), named after the store's path. */
char *
cbt_store_failure_marker(const char *path)
{
  const char *dir = g_getenv("CBTD_RUN_DIR");
  g_autofree char *base = NULL;
  g_autofree char *sum = g_compute_checksum_for_string(G_CHECKSUM_SHA256, path, -1);
  g_autofree char *name = g_strconcat(sum, ".store-failed", NULL);

  if (!dir || !*dir)
    dir = base = geteuid() == 0 ? g_strdup("/run/cbtd")
                                : g_build_filename(g_get_user_runtime_dir(), "cbtd", NULL);
  return g_build_filename(dir, name, NULL);
}

/* Even the preallocated metadata cannot be written (a read-only file system, a dying disk):
 * the file can no longer promise anything for an unclean stop. So that the next open on this
 * boot does not trust it, the failure is recorded outside it; that open loads every bitmap
 * inconsistent (load.c). */
void
cbt_store_fail(CbtStore *s, const char *what, int err)
{
  if (__atomic_exchange_n(&s->failed, TRUE, __ATOMIC_ACQ_REL))
    return;
  g_autofree char *marker = cbt_store_failure_marker(s->path);
  g_autofree char *dir = g_path_get_dirname(marker);
  g_autoptr(GError) local = NULL;
  if (g_mkdir_with_parents(dir, 0700) < 0 || !g_file_set_contents(marker, s->path, -1, &local))
    g_warning("bitmap store %s: cannot record its failure in %s: %s", s->path, marker,
              local ? local->message : g_strerror(errno));
  cbt_store_report(s, what, err);
}

static gboolean
io_error(CbtStore *s, GError **error, int err, const char *what)
{
  g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_IO, "Bitmap store '%s': %s: %s", s->path,
              what, g_strerror(-err));
  return FALSE;
}

/* Invariant (6): the next seq goes to the other copy, and is synced. */
int
cbt_store_write_header(CbtStore *s)
{
  CbtStoreHeader h = s->hdr;

  h.seq++;
  cbt_store_checksum(h.checksum, &h, G_STRUCT_OFFSET(CbtStoreHeader, checksum), NULL, 0);
  int r = cbt_store_io_write(s->f, &h, sizeof h, (h.seq % 2) * CBT_STORE_PAGE);
  if (r == 0)
    r = s->f->io->sync(s->f);
  if (r == 0)
    s->hdr = h;
  return r;
}

/* ---- the directory --------------------------------------------------------------------- */

static GByteArray *
encode_dir(CbtStore *s, guint64 seq)
{
  GByteArray *b = g_byte_array_new();
  CbtStoreDirHead head = { .seq = seq, .count = s->entries->len };

  memcpy(head.magic, CBT_STORE_DIR_MAGIC, 8);
  memcpy(head.identity, s->hdr.identity, sizeof head.identity);
  g_byte_array_append(b, (guint8 *)&head, sizeof head);
  for (guint i = 0; i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    CbtStoreDirEntry d = { 0 };
    gsize nl = strlen(e->name);
    d.entry_len = (guint32)((sizeof d + nl + 7) & ~(gsize)7);
    d.name_len = (guint32)nl;
    d.granularity = e->granularity;
    d.flags = (e->recording ? CBT_STORE_ENTRY_RECORDING : 0) |
              (e->inconsistent ? CBT_STORE_ENTRY_INCONSISTENT : 0) |
              (e->summed ? CBT_STORE_ENTRY_SUMMED : 0);
    memcpy(d.sum, e->sum, 32);
    d.size = s->size;
    d.area_offset = e->area_offset;
    d.area_len = e->area_len;
    memcpy(d.uuid, e->uuid, 16);
    d.created = e->created;
    d.broken = e->broken;
    g_byte_array_append(b, (guint8 *)&d, sizeof d);
    g_byte_array_append(b, (guint8 *)e->name, (guint)nl);
    static const guint8 pad[8];
    g_byte_array_append(b, pad, d.entry_len - (guint32)(sizeof d + nl));
  }
  CbtStoreDirHead *h = (CbtStoreDirHead *)b->data;
  h->len = b->len - (guint)sizeof head;
  cbt_store_checksum(h->checksum, h, G_STRUCT_OFFSET(CbtStoreDirHead, checksum),
                     b->data + sizeof head, h->len);
  return b;
}

/* Write the directory to the other area, sync, then point the header at it (invariant 6). */
int
cbt_store_write_dir(CbtStore *s)
{
  guint64 seq = s->hdr.dir_seq + 1;
  guint64 where = s->hdr.dir_offset == CBT_STORE_DIR_OFFSET
                    ? CBT_STORE_DIR_OFFSET + CBT_STORE_DIR_MAX
                    : CBT_STORE_DIR_OFFSET;
  g_autoptr(GByteArray) b = encode_dir(s, seq);

  if (b->len > CBT_STORE_DIR_MAX)
    return -EFBIG;
  int r = cbt_store_io_write(s->f, b->data, b->len, where);
  if (r == 0)
    r = s->f->io->sync(s->f);
  if (r < 0)
    return r;
  /* Under the lock: a writer thread may be recording the degraded state in the header. */
  pthread_mutex_lock(&s->lock);
  CbtStoreHeader old = s->hdr;
  s->hdr.dir_offset = where;
  s->hdr.dir_seq = seq;
  r = cbt_store_write_header(s);
  if (r < 0)
    s->hdr = old;
  pthread_mutex_unlock(&s->lock);
  return r;
}

static CbtStoreEntry *
find(CbtStore *s, const char *name, guint *index)
{
  for (guint i = 0; i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    if (strcmp(e->name, name) == 0) {
      if (index)
        *index = i;
      return e;
    }
  }
  return NULL;
}

static void
entry_free(gpointer p)
{
  CbtStoreEntry *e = p;

  g_free(e->name);
  g_free(e);
}

static void
loaded_free(gpointer p)
{
  CbtStoreBitmap *b = p;

  g_free(b->name);
  g_free(b->reason);
  if (b->bitmap)
    cbt_bitmap_free(b->bitmap);
  g_free(b);
}

/* The file reaches past the end of @e's area, so that a store cut short is seen at the next
 * open (load.c): holes read as clean, and so would a cut. */
static int
claim_area_end(CbtStore *s, const CbtStoreEntry *e)
{
  static const guint8 zero;

  return cbt_store_io_write(s->f, &zero, 1, e->area_offset + e->area_len - 1);
}

/* First fit among the areas in use, after the intent slots. The areas in use include the one
 * an entry that grows is leaving: the directory on disk still names it (invariant 6). */
static guint64
place_area(CbtStore *s, guint64 len)
{
  guint64 at = s->hdr.slot_offset[1] + s->hdr.slot_len;

  at = (at + CBT_STORE_AREA_ALIGN - 1) & ~(CBT_STORE_AREA_ALIGN - 1);
  for (gboolean moved = TRUE; moved;) {
    moved = FALSE;
    for (guint i = 0; i < s->entries->len; i++) {
      CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
      if (e->area_offset >= at + len || e->area_offset + e->area_len <= at)
        continue;
      at = (e->area_offset + e->area_len + CBT_STORE_AREA_ALIGN - 1) & ~(CBT_STORE_AREA_ALIGN - 1);
      moved = TRUE;
    }
  }
  return at;
}

/* ---- open and close -------------------------------------------------------------------- */

static gboolean
mark_in_use(CbtStore *s, GError **error)
{
  s->hdr.flags |= CBT_STORE_HDR_IN_USE;
  g_strlcpy(s->hdr.boot_id, s->io->boot_id(s->io), sizeof s->hdr.boot_id);
  int r = cbt_store_write_header(s);
  return r == 0 || io_error(s, error, r, "cannot mark the store in use");
}

CbtStore *
cbt_store_open(const char *path, const CbtStoreConfig *config, const CbtStoreIo *io, GError **error)
{
  g_autoptr(GError) local = NULL;

  /* The header keeps the identity NUL-terminated in its field: a longer one would be cut and
   * never match again. */
  if (config->identity && strlen(config->identity) >= sizeof(((CbtStoreHeader *)0)->identity)) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_INVALID,
                "Bitmap store '%s': the device identity '%s' is longer than %zu bytes", path,
                config->identity, sizeof(((CbtStoreHeader *)0)->identity) - 1);
    return NULL;
  }
  CbtStore *s = g_new0(CbtStore, 1);
  s->path = g_strdup(path);
  s->io = io ? io : cbt_store_io_posix();
  s->size = config->size;
  s->sync_interval_ms =
    config->sync_interval_ms ? config->sync_interval_ms : CBT_STORE_DEFAULT_SYNC_INTERVAL_MS;
  s->entries = g_ptr_array_new_with_free_func(entry_free);
  s->loaded = g_ptr_array_new_with_free_func(loaded_free);
  pthread_mutex_init(&s->lock, NULL);
  pthread_mutex_init(&s->sync_lock, NULL);
  pthread_cond_init(&s->synced, NULL);
  pthread_cond_init(&s->wake, NULL);
  int r = s->io->open(s->io, path, config->create, &s->f);
  if (r < 0) {
    g_set_error(error, CBT_STORE_ERROR, r == -EBUSY ? CBT_STORE_ERROR_BUSY : CBT_STORE_ERROR_IO,
                r == -EBUSY ? "Bitmap store '%s' is in use by another process"
                            : "Cannot open bitmap store '%s': %s",
                path, g_strerror(-r));
    s->f = NULL;
    cbt_store_abandon(s);
    return NULL;
  }
  if (!cbt_store_load(s, config, &local) || !mark_in_use(s, &local)) {
    g_propagate_error(error, g_steal_pointer(&local));
    cbt_store_abandon(s);
    return NULL;
  }
  /* The load took the marker into account (its bitmaps are inconsistent now, durably). */
  g_autofree char *marker = cbt_store_failure_marker(path);
  g_unlink(marker);
  cbt_store_publish_recording(s);
  cbt_store_syncer_start(s);
  return s;
}

const char *
cbt_store_get_path(const CbtStore *store)
{
  return store->path;
}

CbtStoreStop
cbt_store_last_stop(const CbtStore *store)
{
  return store->last_stop;
}

GPtrArray *
cbt_store_loaded(CbtStore *store)
{
  return store->loaded;
}

CbtBitmap *
cbt_store_take_bitmap(CbtStore *store, const char *name)
{
  for (guint i = 0; i < store->loaded->len; i++) {
    CbtStoreBitmap *b = g_ptr_array_index(store->loaded, i);
    if (strcmp(b->name, name) == 0)
      return g_steal_pointer(&b->bitmap);
  }
  return NULL;
}

guint
cbt_store_count(const CbtStore *store)
{
  return store->entries->len;
}

void
cbt_store_set_error_func(CbtStore *store, CbtStoreErrorFunc fn, gpointer data)
{
  store->err_fn = fn;
  store->err_data = data;
}

gboolean
cbt_store_is_degraded(const CbtStore *store)
{
  return __atomic_load_n(&store->degraded, __ATOMIC_ACQUIRE) ||
         __atomic_load_n(&store->failed, __ATOMIC_ACQUIRE);
}

static void
store_free(CbtStore *s)
{
  if (s->f)
    s->f->io->close(s->f);
  cbt_store_intents_free(s);
  g_free(s->rec);
  g_ptr_array_unref(s->loaded);
  g_ptr_array_unref(s->entries);
  pthread_mutex_destroy(&s->lock);
  pthread_mutex_destroy(&s->sync_lock);
  pthread_cond_destroy(&s->synced);
  pthread_cond_destroy(&s->wake);
  g_free(s->path);
  g_free(s);
}

void
cbt_store_abandon(CbtStore *store)
{
  if (!store)
    return;
  cbt_store_syncer_stop(store);
  store_free(store);
}

gboolean
cbt_store_close(CbtStore *store, GError **error)
{
  cbt_store_syncer_stop(store);
  /* Entries whose rewrite failed get another chance: they leave clean or stay flagged. */
  for (guint i = 0; i < store->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(store->entries, i);
    if (e->inconsistent && e->bm && cbt_store_write_area(store, e) == 0)
      e->inconsistent = FALSE;
  }
  /* A store that failed gets one more try: every area rewritten from memory (the degraded
   * path of the sync). Only if all of it lands is the failure marker dropped below. */
  gboolean was_failed = __atomic_exchange_n(&store->failed, FALSE, __ATOMIC_ACQ_REL);
  if (was_failed)
    __atomic_store_n(&store->degraded, TRUE, __ATOMIC_RELEASE);
  int r = cbt_store_sync_locked_out(store, TRUE);
  /* The areas now equal memory: record their checksums for the next open to verify. */
  for (guint i = 0; r == 0 && i < store->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(store->entries, i);
    e->summed = e->bm && !e->inconsistent;
    if (e->summed)
      cbt_store_sum_bitmap(e->bm, e->sum);
  }
  if (r == 0 && !cbt_store_is_degraded(store)) {
    store->hdr.flags &= ~(guint32)CBT_STORE_HDR_IN_USE;
    r = cbt_store_write_dir(store);
  }
  if (r < 0 || cbt_store_is_degraded(store)) {
    io_error(store, error, r < 0 ? r : -EIO, "the store could not be closed cleanly");
    store_free(store);
    return FALSE;
  }
  if (was_failed) {
    g_autofree char *marker = cbt_store_failure_marker(store->path);
    g_unlink(marker);
  }
  store_free(store);
  return TRUE;
}

/* ---- changes of the directory ---------------------------------------------------------- */

gboolean
cbt_store_add_full(CbtStore *store, const char *name, CbtBitmap *bm, gboolean recording,
                   const CbtStoreIdentity *id, GError **error)
{
  guint32 gran = cbt_bitmap_get_granularity(bm);
  guint64 len = cbt_store_area_len(store->size, gran);

  if (find(store, name, NULL)) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_INVALID,
                "Bitmap store '%s' already holds a bitmap '%s'", store->path, name);
    return FALSE;
  }
  if (len > CBT_STORE_MAX_AREA) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_INVALID,
                "A persistent bitmap of granularity %u on a device of %" G_GUINT64_FORMAT
                " bytes needs %" G_GUINT64_FORMAT " bytes of store, more than %" G_GUINT64_FORMAT,
                gran, store->size, len, CBT_STORE_MAX_AREA);
    return FALSE;
  }
  CbtStoreEntry *e = g_new0(CbtStoreEntry, 1);
  e->name = g_strdup(name);
  e->granularity = gran;
  e->recording = recording;
  e->bm = bm;
  e->area_len = len;
  e->area_offset = place_area(store, len);
  if (id) {
    memcpy(e->uuid, id->uuid, 16);
    e->created = id->created;
    e->broken = id->broken;
  } else {
    e->created = (guint64)(g_get_real_time() / G_USEC_PER_SEC);
    for (guint i = 0; i < 16; i += 4)
      *(guint32 *)(e->uuid + i) = g_random_int();
  }
  /* The area may hold an old bitmap's bits: zero it before the directory names it. */
  int r = store->f->io->punch(store->f, e->area_offset, e->area_len);
  if (r == 0)
    r = claim_area_end(store, e);
  if (r == 0)
    r = cbt_store_write_area(store, e);
  g_ptr_array_add(store->entries, e);
  if (r == 0)
    r = cbt_store_write_dir(store);
  if (r < 0) {
    g_ptr_array_remove(store->entries, e);
    return io_error(store, error, r, "cannot add the bitmap");
  }
  cbt_store_publish_recording(store);
  return TRUE;
}

gboolean
cbt_store_remove(CbtStore *store, const char *name, GError **error)
{
  guint i;
  CbtStoreEntry *e = find(store, name, &i);

  if (!e)
    return TRUE;
  g_ptr_array_steal_index(store->entries, i);
  int r = cbt_store_write_dir(store);
  if (r < 0) {
    g_ptr_array_insert(store->entries, (gint)i, e);
    return io_error(store, error, r, "cannot remove the bitmap");
  }
  cbt_store_publish_recording(store);
  /* Not needed for correctness: an area is zeroed again before it is reused. */
  store->f->io->punch(store->f, e->area_offset, e->area_len);
  entry_free(e);
  return TRUE;
}

gboolean
cbt_store_set_recording(CbtStore *store, const char *name, gboolean recording, GError **error)
{
  CbtStoreEntry *e = find(store, name, NULL);

  if (!e || e->recording == recording)
    return TRUE;
  /* A bitmap that stops recording is not widened by recovery: its marks must be durable
   * before the directory says it stopped. */
  int r = recording ? 0 : cbt_store_sync_locked_out(store, FALSE);
  if (r == 0) {
    e->recording = recording;
    r = cbt_store_write_dir(store);
    if (r < 0)
      e->recording = !recording;
  }
  if (r < 0)
    return io_error(store, error, r,
                    recording ? "cannot enable the bitmap" : "cannot disable the bitmap");
  cbt_store_publish_recording(store);
  return TRUE;
}

gboolean
cbt_store_add(CbtStore *store, const char *name, CbtBitmap *bm, gboolean recording, GError **error)
{
  return cbt_store_add_full(store, name, bm, recording, NULL, error);
}

gboolean
cbt_store_set_broken(CbtStore *store, const char *name, guint32 code, GError **error)
{
  CbtStoreEntry *e = find(store, name, NULL);

  if (!e || e->broken == code)
    return TRUE;
  guint32 was = e->broken;
  e->broken = code;
  int r = cbt_store_write_dir(store);
  if (r < 0) {
    e->broken = was;
    return io_error(store, error, r, "cannot record that the bitmap's record broke");
  }
  return TRUE;
}

/* Invariant (5): a failed rewrite flags the entry before the caller hears of it. */
gboolean
cbt_store_rewrite(CbtStore *store, const char *name, GError **error)
{
  CbtStoreEntry *e = find(store, name, NULL);

  if (!e)
    return TRUE;
  int r = cbt_store_write_area(store, e);
  if (r == 0)
    r = store->f->io->sync(store->f);
  if (r == 0 && e->inconsistent) {
    e->inconsistent = FALSE;
    r = cbt_store_write_dir(store);
  }
  if (r < 0) {
    e->inconsistent = TRUE;
    int r2 = cbt_store_write_dir(store);
    if (r2 < 0)
      cbt_store_fail(store, "cannot flag a bitmap inconsistent", -r2);
    return io_error(store, error, r, "cannot write the bitmap");
  }
  return TRUE;
}

gboolean
cbt_store_replace_bitmap(CbtStore *store, const char *name, CbtBitmap *bm, GError **error)
{
  CbtStoreEntry *e = find(store, name, NULL);

  if (!e)
    return TRUE;
  e->bm = bm;
  cbt_store_publish_recording(store);
  return cbt_store_rewrite(store, name, error);
}

/* Give @e an area for the store's size: in place when it fits, else zeroed somewhere free. Only
 * a new place has its last byte claimed: in place that byte may hold bits (a bitmap that fills
 * its last page) and the file already reaches past it. */
int
cbt_store_fit_area(CbtStore *s, CbtStoreEntry *e)
{
  guint64 len = cbt_store_area_len(s->size, e->granularity);

  if (len <= e->area_len) {
    e->area_len = len;
    return 0;
  }
  guint64 at = place_area(s, len);
  int r = s->f->io->punch(s->f, at, len);
  if (r < 0)
    return r;
  e->area_offset = at;
  e->area_len = len;
  return claim_area_end(s, e);
}

/* With the device drained: every mark so far durable, then areas and intent regions for the
 * new size, then the directory that names them. */
gboolean
cbt_store_resize(CbtStore *store, guint64 size, GError **error)
{
  int r = cbt_store_sync_locked_out(store, TRUE);

  store->size = size;
  for (guint i = 0; r == 0 && i < store->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(store->entries, i);
    r = cbt_store_fit_area(store, e);
    if (r == 0 && e->bm)
      r = cbt_store_write_area(store, e);
  }
  if (r == 0)
    r = store->f->io->sync(store->f);
  if (r == 0) {
    store->hdr.device_size = size;
    r = cbt_store_intents_reset(store);
  }
  if (r == 0)
    r = cbt_store_write_dir(store);
  return r == 0 || io_error(store, error, r, "cannot resize the store");
}
