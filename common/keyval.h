/* common/keyval.h — QEMU's command-line option syntax: "key=value,a.b=c,list.0=x".
 *
 * Shared by cbtd (--blockdev, --export, …, through cbt_rpc_option_parse(), which also takes a
 * JSON object) and cbtctl (command arguments).
 */
#pragma once

#include <glib.h>
#include <json-glib/json-glib.h>

G_BEGIN_DECLS

/* Parse @text into an object whose leaves are strings. A first element without '=' is the
 * value of @implied_key (when not NULL). Dotted keys nest objects; an object whose keys are all
 * 0..n-1 becomes an array. ",," in a value is a literal comma; a repeated key keeps the last
 * value. Errors use QEMU's texts ("Invalid parameter 'a..b'", "Expected '=' after parameter
 * 'x'", "Parameters 'a.*' used inconsistently", "Parameter 'l.0' missing"). */
JsonObject *cbt_keyval_parse(const char *text, const char *implied_key, GError **error);

G_END_DECLS
