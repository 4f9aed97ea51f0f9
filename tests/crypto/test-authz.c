/* tests/crypto/test-authz.c — authz-list rules and authz-listfile files (crypto/authz.c): the
 * first rule that matches decides, exact or glob (fnmatch, as QEMU), else the list's policy;
 * a file that is not what AuthZListProperties says is refused with a clear error, never
 * half-loaded.
 */
#include <glib.h>
#include <glib/gstdio.h>
#include <string.h>

#include "crypto/crypto-internal.h"

static CbtQmpQAuthZListRule *
rule(const char *match, gboolean allow, gboolean glob)
{
  CbtQmpQAuthZListRule *r = g_new0(CbtQmpQAuthZListRule, 1);
  r->match = g_strdup(match);
  r->policy = allow ? CBT_QMP_Q_AUTH_Z_LIST_POLICY_ALLOW : CBT_QMP_Q_AUTH_Z_LIST_POLICY_DENY;
  r->has_format = glob;
  r->format = glob ? CBT_QMP_Q_AUTH_Z_LIST_FORMAT_GLOB : CBT_QMP_Q_AUTH_Z_LIST_FORMAT_EXACT;
  return r;
}

static void
test_match(void)
{
  g_autoptr(GPtrArray) rules =
    g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_q_auth_z_list_rule_free);
  g_ptr_array_add(rules, rule("CN=mallory,O=acme", FALSE, FALSE));
  g_ptr_array_add(rules, rule("CN=*,O=acme", TRUE, TRUE));
  g_ptr_array_add(rules, rule("CN=bob", TRUE, FALSE));

  /* First match decides: mallory is denied before the glob could allow her. */
  g_assert_false(cbt_crypto_authz_list_match(TRUE, rules, "CN=mallory,O=acme"));
  g_assert_true(cbt_crypto_authz_list_match(FALSE, rules, "CN=alice,O=acme"));
  g_assert_true(cbt_crypto_authz_list_match(FALSE, rules, "CN=bob"));
  /* Exact means exact: no prefix, no case folding. */
  g_assert_false(cbt_crypto_authz_list_match(FALSE, rules, "CN=bob,O=acme2"));
  g_assert_false(cbt_crypto_authz_list_match(FALSE, rules, "cn=bob"));
  /* A glob matches the whole identity. */
  g_assert_false(cbt_crypto_authz_list_match(FALSE, rules, "CN=alice,O=acme,OU=x"));
  /* No match: the list's own policy. */
  g_assert_false(cbt_crypto_authz_list_match(FALSE, rules, "CN=eve"));
  g_assert_true(cbt_crypto_authz_list_match(TRUE, rules, "CN=eve"));
  g_assert_true(cbt_crypto_authz_list_match(TRUE, NULL, "anyone"));
  g_assert_false(cbt_crypto_authz_list_match(FALSE, NULL, "anyone"));
}

/* Load @text as an authz-listfile; NULL on success, else the error message. */
static char *
load(const char *text)
{
  g_autofree char *dir = g_dir_make_tmp("cbt-authz-XXXXXX", NULL);
  g_autofree char *path = g_build_filename(dir, "list.json", NULL);
  CbtCryptoAuthz a = { 0 };
  g_autoptr(GError) error = NULL;

  if (text)
    g_assert_true(g_file_set_contents(path, text, -1, NULL));
  gboolean ok = cbt_crypto_authz_list_file_load(&a, path, &error);
  g_clear_pointer(&a.rules, g_ptr_array_unref);
  g_unlink(path);
  g_rmdir(dir);
  if (ok)
    return NULL;
  return g_strdup(error->message);
}

static void
test_file(void)
{
  g_autofree char *ok = load("{\"policy\": \"deny\", \"rules\": [{\"match\": \"CN=*\", "
                             "\"policy\": \"allow\", \"format\": \"glob\"}]}");
  g_assert_null(ok);
  g_autofree char *none = load("{}");
  g_assert_null(none);

  static const struct {
    const char *text, *error; /* part of the message */
  } bad[] = {
    { NULL, "No such file or directory" },
    { "not json", "Parse error" },
    { "[1, 2]", ": expected a JSON object" },
    { "{\"policy\": \"maybe\"}", "Parameter 'policy' does not accept value 'maybe'" },
    { "{\"policy\": 7}", "Invalid parameter type for 'policy', expected: string" },
    { "{\"rules\": {\"match\": \"x\"}}", "Invalid parameter type for 'rules', expected: array" },
    { "{\"rules\": [7]}", ": rule 0 needs 'match' and 'policy'" },
    { "{\"rules\": [{\"match\": 5, \"policy\": \"allow\"}]}",
      ": rule 0 needs 'match' and 'policy'" },
    { "{\"rules\": [{\"match\": \"x\"}]}", ": rule 0 needs 'match' and 'policy'" },
    { "{\"rules\": [{\"match\": \"x\", \"policy\": \"allow\", \"format\": \"regex\"}]}",
      "Parameter 'format' does not accept value 'regex'" },
    { "{\"rules\": [{\"match\": \"x\", \"policy\": [\"allow\"]}]}",
      "Invalid parameter type for 'policy', expected: string" },
  };
  for (gsize i = 0; i < G_N_ELEMENTS(bad); i++) {
    g_autofree char *msg = load(bad[i].text);
    g_test_message("%s -> %s", bad[i].text ? bad[i].text : "(no file)", msg ? msg : "loaded");
    g_assert_nonnull(msg);
    g_assert_nonnull(strstr(msg, bad[i].error));
  }
}

int
main(int argc, char **argv)
{
  g_test_init(&argc, &argv, NULL);
  /* A JSON type mismatch must be an error of ours, not a critical of json-glib's. */
  g_log_set_always_fatal(G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING);
  g_test_add_func("/authz/match", test_match);
  g_test_add_func("/authz/file", test_file);
  return g_test_run();
}
