/* crypto/authz.c — authz-simple, authz-list and authz-listfile: an ordered list of rules, the
 * first that matches an identity decides, else the default policy (QEMU's authz/list.c
 * semantics; glob is fnmatch(3) with no flags, as QEMU).
 */
#include "crypto/crypto-internal.h"

#include <fnmatch.h>
#include <json-glib/json-glib.h>

#include "rpc/rpc.h"

gboolean
cbt_crypto_authz_list_match(gboolean default_allow, GPtrArray *rules, const char *identity)
{
  for (guint i = 0; rules && i < rules->len; i++) {
    const CbtQmpQAuthZListRule *r = g_ptr_array_index(rules, i);
    gboolean glob = r->has_format && r->format == CBT_QMP_Q_AUTH_Z_LIST_FORMAT_GLOB;
    gboolean hit = glob ? fnmatch(r->match, identity, 0) == 0 : strcmp(r->match, identity) == 0;
    if (hit)
      return r->policy == CBT_QMP_Q_AUTH_Z_LIST_POLICY_ALLOW;
  }
  return default_allow;
}

gboolean
cbt_crypto_authz_is_allowed(CbtCryptoAuthz *authz, const char *kind, const char *identity,
                            GError **error)
{
  if (cbt_crypto_authz_list_match(authz->default_allow, authz->rules, identity))
    return TRUE;
  g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "TLS %s authz check for %s is denied",
              kind, identity);
  return FALSE;
}

/* Member @member of @o: absent (TRUE, *out NULL), a string (TRUE), or anything else (FALSE). */
static gboolean
string_member(JsonObject *o, const char *member, const char **out)
{
  JsonNode *n = json_object_get_member(o, member);

  *out = NULL;
  if (!n)
    return TRUE;
  if (!JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_STRING)
    return FALSE;
  *out = json_node_get_string(n);
  return TRUE;
}

static gboolean
parse_enum(JsonObject *o, const char *member, const char *const *names, int *out,
           const char *filename, GError **error)
{
  const char *v;
  if (!string_member(o, member, &v)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "Invalid parameter type for '%s', expected: string (in %s)", member, filename);
    return FALSE;
  }
  if (!v)
    return TRUE;
  for (int i = 0; names[i]; i++) {
    if (strcmp(names[i], v) == 0) {
      *out = i;
      return TRUE;
    }
  }
  g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
              "Parameter '%s' does not accept value '%s' (in %s)", member, v, filename);
  return FALSE;
}

/* The file holds AuthZListProperties as JSON: {"policy": ..., "rules": [...]}. */
gboolean
cbt_crypto_authz_list_file_load(CbtCryptoAuthz *a, const char *filename, GError **error)
{
  static const char *const policies[] = { "deny", "allow", NULL };
  static const char *const formats[] = { "exact", "glob", NULL };
  g_autoptr(JsonParser) parser = json_parser_new();
  g_autoptr(GError) local = NULL;

  a->rules = g_ptr_array_new_with_free_func((GDestroyNotify)cbt_qmp_q_auth_z_list_rule_free);
  if (!json_parser_load_from_file(parser, filename, &local)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Unable to read '%s': %s", filename,
                local->message);
    return FALSE;
  }
  JsonNode *root = json_parser_get_root(parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT(root)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "%s: expected a JSON object",
                filename);
    return FALSE;
  }
  JsonObject *o = json_node_get_object(root);
  int policy = 0;
  if (!parse_enum(o, "policy", policies, &policy, filename, error))
    return FALSE;
  a->default_allow = policy == CBT_QMP_Q_AUTH_Z_LIST_POLICY_ALLOW;
  JsonNode *rn = json_object_get_member(o, "rules");
  if (rn && !JSON_NODE_HOLDS_ARRAY(rn)) {
    g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                "Invalid parameter type for 'rules', expected: array (in %s)", filename);
    return FALSE;
  }
  JsonArray *rules = rn ? json_node_get_array(rn) : NULL;
  for (guint i = 0; rules && i < json_array_get_length(rules); i++) {
    JsonNode *en = json_array_get_element(rules, i);
    JsonObject *ro = JSON_NODE_HOLDS_OBJECT(en) ? json_node_get_object(en) : NULL;
    const char *match = NULL;
    int rp = -1, rf = 0;
    if (!ro || !string_member(ro, "match", &match) || !match ||
        !json_object_has_member(ro, "policy")) {
      g_set_error(error, CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                  "%s: rule %u needs 'match' and 'policy'", filename, i);
      return FALSE;
    }
    if (!parse_enum(ro, "policy", policies, &rp, filename, error) ||
        !parse_enum(ro, "format", formats, &rf, filename, error))
      return FALSE;
    CbtQmpQAuthZListRule *r = g_new0(CbtQmpQAuthZListRule, 1);
    r->match = g_strdup(match);
    r->policy = rp;
    r->has_format = TRUE;
    r->format = rf;
    g_ptr_array_add(a->rules, r);
  }
  return TRUE;
}
