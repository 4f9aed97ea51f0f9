/* tools/backup/progress.c — how far a copy is: a bar on a terminal, JSON lines for programs.
 *
 * JSON lines go to stdout, one object per line, each with "type": "progress" lines while a
 * phase runs ({"type": "progress", "phase": "copy", "done": B, "total": B,
 * "bytes-per-second": R, "eta-seconds": S}), and the caller's "result" or "error" line at the
 * end (docs/backup-vendors.md). The bar goes to stderr and is redrawn in place.
 */
#include "backup.h"

#include <stdio.h>

struct CbtBackupProgress {
  CbtBackupProgressMode mode;
  char *phase;
  guint64 total;
  guint64 done; /* atomic */
  gint64 start_us, last_us;
  guint64 last_done;
  double rate; /* smoothed, bytes per second */
};

CbtBackupProgress *
cbt_backup_progress_new(CbtBackupProgressMode mode, const char *phase, guint64 total)
{
  CbtBackupProgress *p = g_new0(CbtBackupProgress, 1);

  p->mode = mode;
  p->phase = g_strdup(phase);
  p->total = total;
  p->start_us = p->last_us = g_get_monotonic_time();
  return p;
}

void
cbt_backup_progress_add(CbtBackupProgress *p, guint64 bytes)
{
  __atomic_add_fetch(&p->done, bytes, __ATOMIC_RELAXED);
}

static char *
human(double bytes)
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB" };
  guint u = 0;

  while (bytes >= 1024 && u + 1 < G_N_ELEMENTS(units)) {
    bytes /= 1024;
    u++;
  }
  return g_strdup_printf(u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
}

static void
draw_bar(CbtBackupProgress *p, guint64 done, double eta, gboolean last)
{
  double frac = p->total ? (double)done / (double)p->total : 1.0;
  char bar[31];
  guint fill = (guint)(frac * 30);

  for (guint i = 0; i < 30; i++)
    bar[i] = i < fill ? '#' : '-';
  bar[30] = 0;
  g_autofree char *d = human(done), *t = human(p->total), *r = human(p->rate);
  g_autofree char *left =
    eta >= 0 ? g_strdup_printf("%d:%02d", (int)eta / 60, (int)eta % 60) : g_strdup("-:--");
  fprintf(stderr, "\r%s [%s] %5.1f%%  %s / %s  %s/s  ETA %s   ", p->phase, bar, frac * 100, d, t, r,
          left);
  if (last)
    fputc('\n', stderr);
  fflush(stderr);
}

void
cbt_backup_progress_tick(CbtBackupProgress *p, gboolean last)
{
  gint64 now = g_get_monotonic_time();
  guint64 done = __atomic_load_n(&p->done, __ATOMIC_RELAXED);
  double dt = (double)(now - p->last_us) / 1e6;

  if (p->mode == CBT_BACKUP_PROGRESS_NONE)
    return;
  /* At most four lines (or redraws) a second, however small the pieces: a program reading
   * them wants news, not one line per read. */
  if (!last && p->last_us > p->start_us && now - p->last_us < G_USEC_PER_SEC / 4)
    return;
  if (dt > 0) {
    double inst = (double)(done - p->last_done) / dt;
    p->rate = p->last_done == 0 && p->rate == 0 ? inst : 0.7 * p->rate + 0.3 * inst;
  }
  if (last && now > p->start_us)
    p->rate = (double)done / ((double)(now - p->start_us) / 1e6);
  p->last_us = now;
  p->last_done = done;
  double eta = p->rate > 0 ? (double)(p->total - MIN(done, p->total)) / p->rate : -1;
  if (p->mode == CBT_BACKUP_PROGRESS_BAR) {
    draw_bar(p, done, eta, last);
    return;
  }
  g_autoptr(JsonObject) o = json_object_new();
  json_object_set_string_member(o, "phase", p->phase);
  json_object_set_int_member(o, "done", (gint64)done);
  json_object_set_int_member(o, "total", (gint64)p->total);
  json_object_set_int_member(o, "bytes-per-second", (gint64)p->rate);
  if (eta >= 0)
    json_object_set_double_member(o, "eta-seconds", (double)(gint64)(eta * 10 + 0.5) / 10);
  cbt_backup_progress_event(p->mode, "progress", o);
}

void
cbt_backup_progress_free(CbtBackupProgress *p)
{
  if (!p)
    return;
  g_free(p->phase);
  g_free(p);
}

void
cbt_backup_progress_event(CbtBackupProgressMode mode, const char *type, JsonObject *obj)
{
  if (mode != CBT_BACKUP_PROGRESS_JSON)
    return;
  g_autoptr(JsonObject) line = json_object_new();
  json_object_set_string_member(line, "type", type);
  if (obj) {
    JsonObjectIter it;
    const char *k;
    JsonNode *v;
    json_object_iter_init(&it, obj);
    while (json_object_iter_next(&it, &k, &v))
      json_object_set_member(line, k, json_node_copy(v));
  }
  g_autoptr(JsonNode) n = json_node_init_object(json_node_alloc(), line);
  g_autofree char *text = json_to_string(n, FALSE);
  fprintf(stdout, "%s\n", text);
  fflush(stdout);
}
