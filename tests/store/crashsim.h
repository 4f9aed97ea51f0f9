/* tests/store/crashsim.h — a store I/O layer in memory that remembers every write since the
 * last sync, so a test can build the file as a crash at any instant would leave it (SQLite's
 * test6.c idea): the synced bytes, plus any subset of the later writes, each whole, torn at a
 * sector or lost. A "process crash" keeps every write (the kernel's page cache survives).
 */
#pragma once

#include "bitmap/store/io.h"

typedef struct CrashSim CrashSim;

CrashSim *crashsim_new(const char *boot_id);
void crashsim_free(CrashSim *sim);
const CbtStoreIo *crashsim_io(CrashSim *sim);
void crashsim_set_boot_id(CrashSim *sim, const char *boot_id);
/* The largest file (default 1 GiB): writes past it fail with EFBIG, as at a file system's
 * limit. */
void crashsim_set_max_size(CrashSim *sim, guint64 bytes);
/* Writes that would allocate (into bytes never written or allocated) fail with ENOSPC. */
void crashsim_set_full(CrashSim *sim, gboolean full);
/* Fail every sync with EIO. */
void crashsim_set_sync_error(CrashSim *sim, gboolean fail);
/* How many operations (writes, punches, syncs) the file has seen. */
guint crashsim_ops(CrashSim *sim);
/* A new simulator holding what a crash after operation @ops would leave: @process keeps every
 * write; otherwise the synced state plus, chosen by @seed, some of the unsynced writes, each
 * whole, torn after some sectors, or lost. */
CrashSim *crashsim_after_crash(CrashSim *sim, guint ops, gboolean process, guint32 seed);
/* Direct access to the current bytes (for corrupting them). */
GByteArray *crashsim_bytes(CrashSim *sim);
