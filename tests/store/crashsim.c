/* tests/store/crashsim.c — see crashsim.h. One file per simulator; the log keeps every
 * operation with its bytes, so any prefix can be replayed. */
#include "crashsim.h"

#include <errno.h>
#include <string.h>

typedef enum { OP_WRITE, OP_PUNCH, OP_SYNC } OpKind;

typedef struct {
  OpKind kind;
  guint64 offset;
  GBytes *data; /* OP_WRITE */
  guint64 len;
} Op;

struct CrashSim {
  CbtStoreIo io;
  GByteArray *bytes; /* the file as the process sees it */
  GByteArray *alloc; /* one byte per 4 KiB block: allocated */
  GArray *log;       /* Op, every operation since the simulator was made */
  GByteArray *base;  /* the file when the log began */
  char boot_id[64];
  gboolean full, sync_error, open;
  guint64 max_size; /* writes past it fail with EFBIG */
};

typedef struct {
  CbtStoreFile base;
  CrashSim *sim;
} SimFile;

#define SIM(f) (((SimFile *)(f))->sim)

/* The simulated file system's largest file by default (a real one has a limit too, ext4's
 * 16 TiB): the file lives in memory, so a corrupt store that asks for a write far out gets
 * EFBIG. */
#define CRASHSIM_MAX_SIZE (G_GUINT64_CONSTANT(1) << 30)

static void
grow(GByteArray *b, guint64 len)
{
  if (b->len < len) {
    guint old = b->len;
    g_byte_array_set_size(b, (guint)len);
    memset(b->data + old, 0, len - old);
  }
}

static gboolean
allocated(CrashSim *sim, guint64 off, guint64 len)
{
  for (guint64 b = off / 4096; b <= (off + len - 1) / 4096; b++)
    if (b >= sim->alloc->len || !sim->alloc->data[b])
      return FALSE;
  return TRUE;
}

static void
set_alloc(CrashSim *sim, guint64 off, guint64 len, guint8 v)
{
  grow(sim->alloc, (off + len + 4095) / 4096);
  for (guint64 b = off / 4096; b < (off + len + 4095) / 4096; b++)
    sim->alloc->data[b] = v;
}

static void
apply(GByteArray *b, const Op *op, guint64 len)
{
  grow(b, op->offset + len);
  if (op->kind == OP_WRITE)
    memcpy(b->data + op->offset, g_bytes_get_data(op->data, NULL), len);
  else
    memset(b->data + op->offset, 0, len);
}

static void
log_op(CrashSim *sim, OpKind kind, guint64 offset, const void *data, guint64 len)
{
  Op op = { kind, offset, data ? g_bytes_new(data, len) : NULL, len };
  g_array_append_val(sim->log, op);
  if (kind != OP_SYNC)
    apply(sim->bytes, &op, len);
}

static int
sim_open(const CbtStoreIo *io, const char *path, gboolean create, CbtStoreFile **out)
{
  CrashSim *sim = (CrashSim *)io;
  (void)path;
  if (sim->open)
    return -EBUSY;
  if (!create && sim->bytes->len == 0)
    return -ENOENT;
  SimFile *f = g_new0(SimFile, 1);
  f->base.io = io;
  f->sim = sim;
  sim->open = TRUE;
  *out = &f->base;
  return 0;
}

static gssize
sim_pread(CbtStoreFile *f, void *buf, gsize len, guint64 off)
{
  GByteArray *b = SIM(f)->bytes;
  if (off >= b->len)
    return 0;
  gsize n = MIN(len, b->len - off);
  memcpy(buf, b->data + off, n);
  return (gssize)n;
}

static gssize
sim_pwrite(CbtStoreFile *f, const void *buf, gsize len, guint64 off)
{
  CrashSim *sim = SIM(f);
  if (off > sim->max_size || len > sim->max_size - off)
    return -EFBIG;
  if (sim->full && !allocated(sim, off, len))
    return -ENOSPC;
  set_alloc(sim, off, len, 1);
  log_op(sim, OP_WRITE, off, buf, len);
  return (gssize)len;
}

static int
sim_sync(CbtStoreFile *f)
{
  CrashSim *sim = SIM(f);
  if (sim->sync_error)
    return -EIO;
  log_op(sim, OP_SYNC, 0, NULL, 0);
  return 0;
}

static int
sim_punch(CbtStoreFile *f, guint64 off, guint64 len)
{
  CrashSim *sim = SIM(f);
  guint64 end = MIN(off + len, (guint64)sim->bytes->len);
  if (off < end)
    log_op(sim, OP_PUNCH, off, NULL, end - off);
  return 0;
}

static int
sim_allocate(CbtStoreFile *f, guint64 off, guint64 len)
{
  CrashSim *sim = SIM(f);
  if (off > sim->max_size || len > sim->max_size - off)
    return -EFBIG;
  if (sim->full && !allocated(sim, off, len))
    return -ENOSPC;
  set_alloc(sim, off, len, 1);
  return 0;
}

static gint64
sim_next_data(CbtStoreFile *f, guint64 off)
{
  GByteArray *b = SIM(f)->bytes;
  for (guint64 p = off; p < b->len; p++)
    if (b->data[p])
      return (gint64)p;
  return b->len;
}

static gint64
sim_next_hole(CbtStoreFile *f, guint64 off)
{
  (void)off;
  return SIM(f)->bytes->len; /* no holes: zeroes read as data */
}

static gint64
sim_size(CbtStoreFile *f)
{
  return SIM(f)->bytes->len;
}

static void
sim_close(CbtStoreFile *f)
{
  SIM(f)->open = FALSE;
  g_free(f);
}

static const char *
sim_boot_id(const CbtStoreIo *io)
{
  return ((CrashSim *)io)->boot_id;
}

CrashSim *
crashsim_new(const char *boot_id)
{
  CrashSim *sim = g_new0(CrashSim, 1);
  sim->max_size = CRASHSIM_MAX_SIZE;
  sim->io = (CbtStoreIo){
    .open = sim_open,
    .pread = sim_pread,
    .pwrite = sim_pwrite,
    .sync = sim_sync,
    .punch = sim_punch,
    .allocate = sim_allocate,
    .next_data = sim_next_data,
    .next_hole = sim_next_hole,
    .size = sim_size,
    .close = sim_close,
    .boot_id = sim_boot_id,
  };
  sim->bytes = g_byte_array_new();
  sim->alloc = g_byte_array_new();
  sim->base = g_byte_array_new();
  sim->log = g_array_new(FALSE, FALSE, sizeof(Op));
  g_strlcpy(sim->boot_id, boot_id, sizeof sim->boot_id);
  return sim;
}

static void
clear_log(CrashSim *sim)
{
  for (guint i = 0; i < sim->log->len; i++)
    g_clear_pointer(&g_array_index(sim->log, Op, i).data, g_bytes_unref);
  g_array_set_size(sim->log, 0);
}

void
crashsim_free(CrashSim *sim)
{
  clear_log(sim);
  g_array_unref(sim->log);
  g_byte_array_unref(sim->bytes);
  g_byte_array_unref(sim->alloc);
  g_byte_array_unref(sim->base);
  g_free(sim);
}

const CbtStoreIo *
crashsim_io(CrashSim *sim)
{
  return &sim->io;
}

void
crashsim_set_boot_id(CrashSim *sim, const char *boot_id)
{
  g_strlcpy(sim->boot_id, boot_id, sizeof sim->boot_id);
}

void
crashsim_set_max_size(CrashSim *sim, guint64 bytes)
{
  sim->max_size = bytes;
}

void
crashsim_set_full(CrashSim *sim, gboolean full)
{
  sim->full = full;
}

void
crashsim_set_sync_error(CrashSim *sim, gboolean fail)
{
  sim->sync_error = fail;
}

guint
crashsim_ops(CrashSim *sim)
{
  return sim->log->len;
}

GByteArray *
crashsim_bytes(CrashSim *sim)
{
  return sim->bytes;
}

CrashSim *
crashsim_after_crash(CrashSim *sim, guint ops, gboolean process, guint32 seed)
{
  g_autoptr(GRand) rand = g_rand_new_with_seed(seed);
  CrashSim *out = crashsim_new(sim->boot_id);
  guint last_sync = 0;

  out->max_size = sim->max_size;

  g_byte_array_append(out->bytes, sim->base->data, sim->base->len);
  ops = MIN(ops, sim->log->len);
  for (guint i = 0; i < ops; i++)
    if (g_array_index(sim->log, Op, i).kind == OP_SYNC)
      last_sync = i + 1;
  for (guint i = 0; i < ops; i++) {
    const Op *op = &g_array_index(sim->log, Op, i);
    if (op->kind == OP_SYNC)
      continue;
    if (process || i < last_sync) {
      apply(out->bytes, op, op->len);
      continue;
    }
    /* Unsynced: lost, whole, or torn after some 512-byte sectors. */
    guint fate = g_rand_int_range(rand, 0, 3);
    if (fate == 1)
      apply(out->bytes, op, op->len);
    else if (fate == 2 && op->len > 512)
      apply(out->bytes, op,
            512 * (guint64)g_rand_int_range(rand, 1, (gint32)((op->len + 511) / 512)));
  }
  g_byte_array_append(out->base, out->bytes->data, out->bytes->len);
  set_alloc(out, 0, out->bytes->len, 1);
  return out;
}
