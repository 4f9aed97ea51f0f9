/* bitmap/store/load.c — reading a store back, and recovery after an unclean stop.
 *
 * Everything read from the file is distrusted: lengths are checked against the structures and
 * the file before use, checksums before meaning. A store whose header cannot be found is
 * refused (CBT_STORE_ERROR_CORRUPT) unless a valid directory survives, whose bitmaps then come
 * back inconsistent; a bitmap whose area cannot be read comes back inconsistent; nothing is
 * ever loaded with fewer bits than were marked. Recovery (invariants (2)-(4) of store.c):
 * after a clean stop, or after the process alone died (the same boot, the page cache intact,
 * and a sync of it succeeds), the areas are exact; otherwise the regions of every slot younger
 * than synced_epoch are ORed into each recording bitmap, and the bytes so added are reported.
 */
#include "bitmap/store/store-internal.h"

#include <errno.h>
#include <string.h>

void
cbt_store_checksum(guint8 out[32], const void *a, gsize alen, const void *b, gsize blen)
{
  g_autoptr(GChecksum) c = g_checksum_new(G_CHECKSUM_SHA256);
  gsize n = 32;

  g_checksum_update(c, a, (gssize)alen);
  if (blen)
    g_checksum_update(c, b, (gssize)blen);
  g_checksum_get_digest(c, out, &n);
}

gboolean
cbt_store_header_valid(const CbtStoreHeader *h)
{
  guint8 sum[32];

  if (memcmp(h->magic, CBT_STORE_MAGIC, 8) != 0 || h->version != CBT_STORE_VERSION ||
      h->header_len != sizeof *h)
    return FALSE;
  cbt_store_checksum(sum, h, G_STRUCT_OFFSET(CbtStoreHeader, checksum), NULL, 0);
  if (memcmp(sum, h->checksum, 32) != 0 || h->region_shift < 20 || h->region_shift >= 63)
    return FALSE;
  /* Strings end inside their fields (found by tests/fuzz/fuzz-store: an identity without its
   * NUL was compared on into the next field). */
  if (!memchr(h->identity, '\0', sizeof h->identity) ||
      !memchr(h->boot_id, '\0', sizeof h->boot_id))
    return FALSE;
  /* The layout of format.h, whatever a checksummed header says: a store that followed a
   * header's offsets into its own header, directories or areas would overwrite them. */
  gboolean dir_ok = h->dir_offset == CBT_STORE_DIR_OFFSET ||
                    h->dir_offset == CBT_STORE_DIR_OFFSET + CBT_STORE_DIR_MAX ||
                    (h->dir_offset == 0 && h->dir_seq == 0);
  return dir_ok && h->slot_len > CBT_STORE_PAGE && h->slot_len % 8 == 0 &&
         h->slot_offset[0] == CBT_STORE_SLOTS_OFFSET &&
         h->slot_offset[1] == CBT_STORE_SLOTS_OFFSET + h->slot_len &&
         h->slot_offset[1] + h->slot_len <= CBT_STORE_AREA_ALIGN;
}

static gboolean
corrupt(CbtStore *s, GError **error, const char *why)
{
  g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_CORRUPT, "Bitmap store '%s' is corrupt: %s",
              s->path, why);
  return FALSE;
}

/* The valid header copy with the higher seq; FALSE when neither is valid. */
static gboolean
read_header(CbtStore *s, CbtStoreHeader *out, gboolean *any_bytes)
{
  CbtStoreHeader h[2];
  gboolean ok[2];

  for (int i = 0; i < 2; i++) {
    ok[i] = cbt_store_io_read(s->f, &h[i], sizeof h[i], (guint64)i * CBT_STORE_PAGE) == 0 &&
            cbt_store_header_valid(&h[i]);
  }
  *any_bytes = s->f->io->size(s->f) > 0;
  if (!ok[0] && !ok[1])
    return FALSE;
  *out = ok[0] && (!ok[1] || h[0].seq > h[1].seq) ? h[0] : h[1];
  return TRUE;
}

/* Parse directory bytes into entries; FALSE when they do not hold together. @identity (may be
 * NULL) receives the device the directory was written for. */
static gboolean
parse_dir(CbtStore *s, const guint8 *buf, gsize len, guint64 *seq, char **identity)
{
  const CbtStoreDirHead *h = (const CbtStoreDirHead *)buf;
  guint8 sum[32];

  if (len < sizeof *h || memcmp(h->magic, CBT_STORE_DIR_MAGIC, 8) != 0 || h->len > len - sizeof *h)
    return FALSE;
  cbt_store_checksum(sum, h, G_STRUCT_OFFSET(CbtStoreDirHead, checksum), buf + sizeof *h, h->len);
  if (memcmp(sum, h->checksum, 32) != 0)
    return FALSE;
  *seq = h->seq;
  if (identity)
    *identity = g_strndup(h->identity, sizeof h->identity);
  gsize at = sizeof *h, end = sizeof *h + h->len;
  for (guint i = 0; i < h->count; i++) {
    const CbtStoreDirEntry *d = (const CbtStoreDirEntry *)(buf + at);
    if (end - at < sizeof *d || d->entry_len > end - at || d->name_len == 0 || d->name_len > 1023 ||
        sizeof *d + d->name_len > d->entry_len || d->granularity < CBT_BITMAP_MIN_GRANULARITY ||
        d->granularity > CBT_BITMAP_MAX_GRANULARITY || (d->granularity & (d->granularity - 1)) ||
        d->area_len > CBT_STORE_MAX_AREA || d->area_offset > G_MAXUINT64 - d->area_len ||
        d->area_offset < CBT_STORE_AREA_ALIGN || d->area_offset % CBT_STORE_AREA_ALIGN ||
        (d->entry_len & 7))
      return FALSE;
    CbtStoreEntry *e = g_new0(CbtStoreEntry, 1);
    e->name = g_strndup((const char *)(d + 1), d->name_len);
    if (strlen(e->name) != d->name_len || !g_utf8_validate(e->name, -1, NULL)) {
      g_free(e->name);
      g_free(e);
      return FALSE;
    }
    e->granularity = d->granularity;
    e->recording = (d->flags & CBT_STORE_ENTRY_RECORDING) != 0;
    e->inconsistent = (d->flags & CBT_STORE_ENTRY_INCONSISTENT) != 0;
    e->area_offset = d->area_offset;
    e->area_len = d->area_len;
    e->summed = (d->flags & CBT_STORE_ENTRY_SUMMED) != 0;
    memcpy(e->sum, d->sum, 32);
    memcpy(e->uuid, d->uuid, 16);
    e->created = d->created;
    e->broken = d->broken;
    g_ptr_array_add(s->entries, e);
    at += d->entry_len;
  }
  return TRUE;
}

static gboolean
read_dir_at(CbtStore *s, guint64 offset, guint64 *seq, char **identity)
{
  g_autofree guint8 *buf = g_malloc(CBT_STORE_DIR_MAX);

  g_ptr_array_set_size(s->entries, 0);
  if (cbt_store_io_read(s->f, buf, CBT_STORE_DIR_MAX, offset) < 0 ||
      !parse_dir(s, buf, CBT_STORE_DIR_MAX, seq, identity)) {
    g_ptr_array_set_size(s->entries, 0);
    return FALSE;
  }
  return TRUE;
}

/* OR the area's data runs into @bm; holes are clean. -EBADMSG when the checksum a clean stop
 * recorded does not match. */
static int
read_area(CbtStore *s, const CbtStoreEntry *e, CbtBitmap *bm)
{
  g_autofree guint8 *buf = g_malloc(1 << 20);
  guint64 pos = e->area_offset, end = e->area_offset + e->area_len;
  CbtStoreSum sum;
  guint8 digest[32];
  int r = 0;

  cbt_store_sum_init(&sum);

  while (pos < end) {
    gint64 d = s->f->io->next_data(s->f, pos);
    if (d < 0 || (guint64)d >= end) {
      r = d < 0 ? (int)d : 0;
      break;
    }
    pos = MAX(pos, (guint64)d & ~(guint64)(CBT_STORE_PAGE - 1));
    gint64 hole = s->f->io->next_hole(s->f, pos);
    if (hole < 0) {
      r = (int)hole;
      break;
    }
    /* Up to the next hole (a sparse area is mostly holes: never read them). */
    guint64 stop = (guint64)hole > pos ? MIN(end, (guint64)hole) : end;
    gsize n = (gsize)MIN(stop - pos, (guint64)(1 << 20));
    r = cbt_store_io_read(s->f, buf, n, pos);
    if (r < 0)
      break;
    cbt_bitmap_deserialize_part(bm, pos - e->area_offset, buf, n);
    cbt_store_sum_feed(&sum, (pos - e->area_offset) / 8, (const guint64 *)buf, n / 8);
    pos += n;
  }
  cbt_store_sum_finish(&sum, digest);
  if (r == 0 && e->summed && s->last_stop == CBT_STORE_STOP_CLEAN && memcmp(digest, e->sum, 32))
    r = -EBADMSG;
  return r;
}

/* The regions of the slots younger than synced_epoch, ORed into @regions. */
static int
read_live_regions(CbtStore *s, guint64 *regions, guint64 words)
{
  for (int i = 0; i < 2; i++) {
    CbtStoreSlotHead h;
    guint8 sum[32];
    guint64 off = s->hdr.slot_offset[i];
    int r = cbt_store_io_read(s->f, &h, sizeof h, off);
    if (r < 0)
      return r;
    cbt_store_checksum(sum, &h, G_STRUCT_OFFSET(CbtStoreSlotHead, checksum), NULL, 0);
    gboolean valid =
      memcmp(h.magic, CBT_STORE_SLOT_MAGIC, 8) == 0 && memcmp(sum, h.checksum, 32) == 0;
    /* A slot whose head is torn may be the live one: count all of its bits. */
    if (valid && h.epoch <= s->hdr.synced_epoch)
      continue;
    g_autofree guint64 *bits = g_new0(guint64, words);
    r = cbt_store_io_read(s->f, bits, words * 8, off + CBT_STORE_PAGE);
    if (r < 0)
      return r;
    for (guint64 w = 0; w < words; w++)
      regions[w] |= bits[w];
  }
  return 0;
}

static void
widen(CbtStore *s, CbtStoreBitmap *b, const guint64 *regions, guint64 nregions)
{
  guint64 before = cbt_bitmap_count(b->bitmap);
  guint64 rsize = G_GUINT64_CONSTANT(1) << s->hdr.region_shift;

  for (guint64 r = 0; r < nregions; r++)
    if (regions[r / 64] & (G_GUINT64_CONSTANT(1) << (r % 64)))
      cbt_bitmap_mark_range(b->bitmap, r * rsize, rsize);
  b->widened = (cbt_bitmap_count(b->bitmap) - before) * b->granularity;
}

/* Judge the last stop (the header as found, before this open rewrites it). */
static CbtStoreStop
judge_stop(CbtStore *s)
{
  if (!(s->hdr.flags & CBT_STORE_HDR_IN_USE))
    return CBT_STORE_STOP_CLEAN;
  /* The page cache of the last run is only trusted if it is this boot's and it syncs. */
  if (!(s->hdr.flags & CBT_STORE_HDR_DEGRADED) &&
      strcmp(s->hdr.boot_id, s->io->boot_id(s->io)) == 0 && s->f->io->sync(s->f) == 0)
    return CBT_STORE_STOP_PROCESS;
  return CBT_STORE_STOP_SYSTEM;
}

static void
load_entries(CbtStore *s, guint64 *regions, guint64 nregions, const char *why)
{
  gint64 fsize = s->f->io->size(s->f);

  for (guint i = 0; i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    CbtStoreBitmap *b = g_new0(CbtStoreBitmap, 1);
    b->name = g_strdup(e->name);
    b->granularity = e->granularity;
    b->recording = e->recording;
    memcpy(b->id.uuid, e->uuid, 16);
    b->id.created = e->created;
    b->id.broken = e->broken;
    g_ptr_array_add(s->loaded, b);
    if (why || e->inconsistent) {
      b->inconsistent = e->inconsistent = TRUE;
      b->recording = e->recording = FALSE;
      b->reason = g_strdup(why ? why : "an earlier write of its bits failed");
      continue;
    }
    b->bitmap = cbt_bitmap_new(s->size, e->granularity);
    /* Every area's last byte was written when it was placed (store.c): a shorter file was cut. */
    int r = fsize < 0                                       ? (int)fsize
            : (guint64)fsize < e->area_offset + e->area_len ? -ENODATA
                                                            : read_area(s, e, b->bitmap);
    if (r < 0) {
      g_clear_pointer(&b->bitmap, cbt_bitmap_free);
      b->inconsistent = e->inconsistent = TRUE;
      b->recording = e->recording = FALSE;
      b->reason = r == -EBADMSG   ? g_strdup("its bits do not match the checksum of the clean stop")
                  : r == -ENODATA ? g_strdup("the store file is shorter than its bits: it was cut")
                                  : g_strdup_printf("its bits cannot be read: %s", g_strerror(-r));
      continue;
    }
    e->bm = b->bitmap;
    if (regions && e->recording) {
      widen(s, b, regions, nregions);
      b->reason = g_strdup(s->last_stop == CBT_STORE_STOP_SYSTEM
                             ? "unclean stop of the system: intent regions added"
                             : "unclean stop");
    }
  }
}

/* A store without a usable header: take the newest valid directory, every bitmap inconsistent,
 * if it was written for this device. */
static gboolean
salvage(CbtStore *s, const CbtStoreConfig *config, GError **error)
{
  guint64 seq[2] = { 0, 0 };
  gboolean ok[2];

  for (int i = 0; i < 2; i++)
    ok[i] = read_dir_at(s, CBT_STORE_DIR_OFFSET + (guint64)i * CBT_STORE_DIR_MAX, &seq[i], NULL);
  if (!ok[0] && !ok[1])
    return corrupt(s, error, "no valid header or directory");
  g_autofree char *identity = NULL;
  guint newest = ok[1] && (!ok[0] || seq[1] > seq[0]);
  read_dir_at(s, CBT_STORE_DIR_OFFSET + newest * CBT_STORE_DIR_MAX, &seq[0], &identity);
  if (config->identity && strcmp(identity, config->identity) != 0) {
    g_ptr_array_set_size(s->entries, 0);
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_FOREIGN,
                "Bitmap store '%s' belongs to another device ('%s', not '%s')", s->path, identity,
                config->identity);
    return FALSE;
  }
  return TRUE;
}

/* The region size: the configured one, coarser when the device needs more regions than a
 * slot holds. */
guint
cbt_store_region_shift(CbtStore *s, guint64 region_size)
{
  guint64 capacity = (s->hdr.slot_len - CBT_STORE_PAGE) * 8;
  guint shift = (guint)g_bit_storage(region_size ? region_size : CBT_STORE_DEFAULT_REGION_SIZE) - 1;

  shift = MAX(shift, 20u);
  while ((s->size >> shift) >= capacity)
    shift++;
  return shift;
}

static void
init_header(CbtStore *s, const CbtStoreConfig *config)
{
  memset(&s->hdr, 0, sizeof s->hdr);
  memcpy(s->hdr.magic, CBT_STORE_MAGIC, 8);
  s->hdr.version = CBT_STORE_VERSION;
  s->hdr.header_len = sizeof s->hdr;
  s->hdr.device_size = s->size;
  g_strlcpy(s->hdr.identity, config->identity ? config->identity : "", sizeof s->hdr.identity);
  s->hdr.slot_len = CBT_STORE_PAGE + (1u << 20) / 8;
  s->hdr.slot_offset[0] = CBT_STORE_SLOTS_OFFSET;
  s->hdr.slot_offset[1] = s->hdr.slot_offset[0] + s->hdr.slot_len;
  s->hdr.region_shift = cbt_store_region_shift(s, config->region_size);
}

/* A new store: its metadata preallocated, so that overwriting it never runs out of space. */
static gboolean
create_fresh(CbtStore *s, const CbtStoreConfig *config, GError **error)
{
  init_header(s, config);
  int r = s->f->io->allocate(s->f, 0, s->hdr.slot_offset[1] + s->hdr.slot_len);
  /* The header first: a crash during creation leaves either nothing or a valid, empty store
   * (dir_seq 0: no directory yet), so a file without a valid header is always damage. */
  if (r == 0)
    r = cbt_store_write_header(s);
  if (r == 0)
    r = cbt_store_intents_init(s, 0);
  if (r == 0)
    r = cbt_store_write_dir(s);
  if (r < 0) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_IO, "Cannot create bitmap store '%s': %s",
                s->path, g_strerror(-r));
    return FALSE;
  }
  s->last_stop = CBT_STORE_STOP_NEW;
  return TRUE;
}

/* Make what the load found durable before the old intents go (a second crash right after
 * this open must not lose what recovery added), then start new epochs. */
static gboolean
settle(CbtStore *s, const CbtStoreConfig *config, GError **error)
{
  int r = 0;

  for (guint i = 0; r == 0 && i < s->entries->len; i++) {
    CbtStoreEntry *e = g_ptr_array_index(s->entries, i);
    gboolean resized = e->area_len != cbt_store_area_len(s->size, e->granularity);
    r = cbt_store_fit_area(s, e);
    if (r == 0 && e->bm && (s->last_stop == CBT_STORE_STOP_SYSTEM || resized))
      r = cbt_store_write_area(s, e);
  }
  if (r == 0)
    r = s->f->io->sync(s->f);
  /* In use from now on: marks change the areas, so no checksum holds any more. */
  for (guint i = 0; i < s->entries->len; i++)
    ((CbtStoreEntry *)g_ptr_array_index(s->entries, i))->summed = FALSE;
  if (r == 0) {
    s->hdr.flags &= ~(guint32)CBT_STORE_HDR_DEGRADED;
    s->hdr.device_size = s->size;
    s->hdr.region_shift = cbt_store_region_shift(s, config->region_size);
    r = cbt_store_intents_init(s, s->hdr.synced_epoch + 16);
  }
  if (r == 0)
    r = cbt_store_write_dir(s);
  if (r < 0) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_IO,
                "Bitmap store '%s': recovery cannot write: %s", s->path, g_strerror(-r));
    return FALSE;
  }
  return TRUE;
}

gboolean
cbt_store_load(CbtStore *s, const CbtStoreConfig *config, GError **error)
{
  CbtStoreHeader h;
  gboolean any = FALSE;
  guint64 seq = 0;

  if (!read_header(s, &h, &any)) {
    if (!any && config->create)
      return create_fresh(s, config, error);
    if (!any)
      return corrupt(s, error, "the file is empty");
    if (!salvage(s, config, error))
      return FALSE;
    init_header(s, config);
    s->last_stop = CBT_STORE_STOP_SYSTEM;
    load_entries(s, NULL, 0, "the store's header is unreadable");
    return s->f->io->allocate(s->f, 0, s->hdr.slot_offset[1] + s->hdr.slot_len) == 0 &&
           settle(s, config, error);
  }
  s->hdr = h;
  if (config->identity && strcmp(h.identity, config->identity) != 0) {
    g_set_error(error, CBT_STORE_ERROR, CBT_STORE_ERROR_FOREIGN,
                "Bitmap store '%s' belongs to another device ('%s', not '%s')", s->path, h.identity,
                config->identity);
    return FALSE;
  }
  s->last_stop = judge_stop(s);
  if (h.dir_seq != 0 && (!read_dir_at(s, h.dir_offset, &seq, NULL) || seq != h.dir_seq)) {
    /* The header names a directory that is not there: keep the names, not the bits. */
    guint64 other = h.dir_offset == CBT_STORE_DIR_OFFSET ? CBT_STORE_DIR_OFFSET + CBT_STORE_DIR_MAX
                                                         : CBT_STORE_DIR_OFFSET;
    read_dir_at(s, other, &seq, NULL);
    load_entries(s, NULL, 0, "the store's directory is unreadable");
    return settle(s, config, error);
  }
  g_autofree char *marker = cbt_store_failure_marker(s->path);
  if (s->last_stop != CBT_STORE_STOP_CLEAN && g_file_test(marker, G_FILE_TEST_EXISTS)) {
    /* The store stopped being writable before the process died: its bits may miss marks. */
    s->last_stop = CBT_STORE_STOP_SYSTEM;
    load_entries(s, NULL, 0, "the store could not be written before the last stop");
    return settle(s, config, error);
  }
  g_autofree guint64 *regions = NULL;
  guint64 words = (h.slot_len - CBT_STORE_PAGE) / 8;
  if (s->last_stop == CBT_STORE_STOP_SYSTEM) {
    regions = g_new0(guint64, words);
    if (read_live_regions(s, regions, words) < 0)
      memset(regions, 0xff, words * 8); /* unreadable intents: every region may be dirty */
  }
  load_entries(s, regions, words * 64, NULL);
  return settle(s, config, error);
}
