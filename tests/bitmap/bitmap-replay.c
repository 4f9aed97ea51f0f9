/* tests/bitmap/bitmap-replay.c — replays a script of bitmap operations on CbtDirtyBitmaps and
 * prints what qemu-storage-daemon would report, for test_bitmap_qsd.py to compare with the
 * real one. One command a line on stdin:
 *   new NAME SIZE GRANULARITY    add a recording bitmap
 *   write OFFSET LENGTH          a guest write: marks every recording bitmap
 *   disable NAME | enable NAME
 *   clear NAME
 *   merge TARGET SOURCE          a set source chunk sets every target chunk it overlaps
 *   sha256 NAME                  prints the hash
 *   count NAME                   prints BlockDirtyInfo's count (bytes)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap/dirty-bitmap.h"

static CbtDirtyBitmap *
lookup(GHashTable *all, const char *name)
{
  CbtDirtyBitmap *dbm = g_hash_table_lookup(all, name);
  if (!dbm) {
    fprintf(stderr, "bitmap-replay: no bitmap %s\n", name);
    exit(2);
  }
  return dbm;
}

int
main(void)
{
  g_autoptr(GHashTable) all =
    g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify)cbt_dirty_bitmap_free);
  char line[512];

  while (fgets(line, sizeof(line), stdin)) {
    g_auto(GStrv) w = g_strsplit_set(g_strstrip(line), " ", -1);
    guint n = g_strv_length(w);

    if (n == 4 && strcmp(w[0], "new") == 0) {
      g_hash_table_insert(all, g_strdup(w[1]),
                          cbt_dirty_bitmap_new(w[1], g_ascii_strtoull(w[2], NULL, 10),
                                               g_ascii_strtoull(w[3], NULL, 10)));
    } else if (n == 3 && strcmp(w[0], "write") == 0) {
      GHashTableIter it;
      gpointer dbm;
      g_hash_table_iter_init(&it, all);
      while (g_hash_table_iter_next(&it, NULL, &dbm))
        if (cbt_dirty_bitmap_is_recording(dbm))
          cbt_bitmap_mark_range(cbt_dirty_bitmap_get_bitmap(dbm), g_ascii_strtoull(w[1], NULL, 10),
                                g_ascii_strtoull(w[2], NULL, 10));
    } else if (n == 2 && strcmp(w[0], "disable") == 0) {
      cbt_dirty_bitmap_set_recording(lookup(all, w[1]), FALSE);
    } else if (n == 2 && strcmp(w[0], "enable") == 0) {
      cbt_dirty_bitmap_set_recording(lookup(all, w[1]), TRUE);
    } else if (n == 2 && strcmp(w[0], "clear") == 0) {
      cbt_bitmap_clear_all(cbt_dirty_bitmap_get_bitmap(lookup(all, w[1])));
    } else if (n == 3 && strcmp(w[0], "merge") == 0) {
      cbt_bitmap_merge(cbt_dirty_bitmap_get_bitmap(lookup(all, w[1])),
                       cbt_dirty_bitmap_get_bitmap(lookup(all, w[2])));
    } else if (n == 2 && strcmp(w[0], "sha256") == 0) {
      g_autofree char *sum = cbt_bitmap_sha256(cbt_dirty_bitmap_get_bitmap(lookup(all, w[1])));
      printf("%s\n", sum);
    } else if (n == 2 && strcmp(w[0], "count") == 0) {
      printf("%" G_GUINT64_FORMAT "\n", cbt_dirty_bitmap_get_count(lookup(all, w[1])));
    } else if (n > 0 && *w[0]) {
      fprintf(stderr, "bitmap-replay: bad line: %s\n", line);
      return 2;
    }
  }
  return 0;
}
