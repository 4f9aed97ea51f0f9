/* tests/nbd/test-nbd-contracts.c — the locking rules of nbd/nbd-internal.h are checked, not
 * only written: a function named _locked dies when its caller does not hold the lock it names,
 * also when another thread holds it, and the control-plane entry points die off the main
 * thread. Each failing call runs in a subprocess (debug builds check; see common/assert.h).
 */
#include <string.h>

#include "common/assert.h"
#include "nbd/nbd-internal.h"

/* A connection whose socket already failed: a reply function returns after its checks, so the
 * test reaches the contract without a transport. */
static CbtNbdConn *
dead_conn(void)
{
  CbtNbdConn *conn = g_new0(CbtNbdConn, 1);

  cbt_mutex_init(&conn->send_lock);
  conn->structured = TRUE;
  conn->send_failed = TRUE;
  return conn;
}

static void
test_reply_with_lock(void)
{
  CbtNbdConn *conn = dead_conn();

  cbt_mutex_lock(&conn->send_lock);
  cbt_nbd_reply_error_locked(conn, 1, NBD_EINVAL, "held");
  cbt_mutex_unlock(&conn->send_lock);
  cbt_mutex_clear(&conn->send_lock);
  g_free(conn);
}

static void
test_reply_without_lock(void)
{
  if (g_test_subprocess()) {
    CbtNbdConn *conn = dead_conn();
    cbt_nbd_reply_error_locked(conn, 1, NBD_EINVAL, "not held");
    return;
  }
  g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_failed();
  g_test_trap_assert_stderr("*cbt_nbd_reply_error_locked*");
}

static gpointer
hold_and_wait(gpointer data)
{
  CbtNbdConn *conn = data;

  cbt_mutex_lock(&conn->send_lock);
  g_usleep(G_USEC_PER_SEC * 30); /* the subprocess dies long before */
  cbt_mutex_unlock(&conn->send_lock);
  return NULL;
}

/* Held, but by someone else: the owner is checked, not only the state. */
static void
test_reply_lock_of_another_thread(void)
{
  if (g_test_subprocess()) {
    CbtNbdConn *conn = dead_conn();
    g_thread_unref(g_thread_new("holder", hold_and_wait, conn));
    while (!__atomic_load_n(&conn->send_lock.held, __ATOMIC_RELAXED))
      g_usleep(1000);
    cbt_nbd_reply_status_locked(conn, 1, 0, NULL, TRUE);
    return;
  }
  g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_failed();
  g_test_trap_assert_stderr("*cbt_nbd_reply_status_locked*");
}

/* Asking a connection to end needs the module lock, cbt_nbd_lock. */
static void
test_kick_without_module_lock(void)
{
  if (g_test_subprocess()) {
    CbtNbdConn *conn = dead_conn();
    cbt_mutex_lock(&conn->send_lock); /* the wrong lock */
    cbt_nbd_conn_kick_locked(conn);
    return;
  }
  g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_failed();
  g_test_trap_assert_stderr("*cbt_nbd_conn_kick_locked*");
}

static gpointer
stop_listening(gpointer data)
{
  (void)data;
  cbt_nbd_server_stop_listening();
  return NULL;
}

static void
test_stop_off_main_thread(void)
{
  if (g_test_subprocess()) {
    g_thread_join(g_thread_new("off-main", stop_listening, NULL));
    return;
  }
  g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_failed();
  g_test_trap_assert_stderr("*cbt_nbd_server_stop_listening: called off the main thread*");
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  cbt_main_thread_init();
  g_test_add_func("/nbd/contracts/reply-with-lock", test_reply_with_lock);
  g_test_add_func("/nbd/contracts/reply-without-lock", test_reply_without_lock);
  g_test_add_func("/nbd/contracts/reply-lock-of-another-thread", test_reply_lock_of_another_thread);
  g_test_add_func("/nbd/contracts/kick-without-module-lock", test_kick_without_module_lock);
  g_test_add_func("/nbd/contracts/stop-off-main-thread", test_stop_off_main_thread);
  return g_test_run();
}
