/* tests/fuzz/fuzz-json.c — the QMP reader's JSON stream parser on arbitrary bytes.
 *
 * The first byte picks how the rest is cut into feeds (the monitor feeds whatever recv
 * returned), so values split across reads are covered. Beyond not crashing, each value the
 * stream emits must survive the writer: what it writes parses, and rewriting it settles
 * after one round, since a reply the monitor writes is parsed by its client.
 */
#include "rpc/rpc-private.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Small, so inputs within -max_len reach the oversized-message path. */
#define MAX_MESSAGE 1024

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
keep_one(JsonNode *value, GError *error, gpointer user_data)
{
  JsonNode **out = user_data;

  g_clear_error(&error);
  if (value && !*out)
    *out = value;
  else if (value)
    json_node_unref(value);
}

/* Parses @text, which the writer made. */
static JsonNode *
reread(const char *text)
{
  JsonNode *again = NULL;
  CbtJsonStream *js = cbt_json_stream_new(G_MAXSIZE, keep_one, &again);
  cbt_json_stream_feed(js, text, strlen(text));
  cbt_json_stream_flush(js);
  cbt_json_stream_free(js);
  if (!again) {
    fprintf(stderr, "written value does not parse: %s\n", text);
    abort();
  }
  return again;
}

/* Written and read back, a value must then be stable: written and read again it is the same
 * value. Not the same text: members are written in QEMU's hash order, which for colliding
 * keys depends on insertion order; and not from the first write, since the double -0.0 is
 * written "-0", as QEMU writes it, and reads back as the integer 0. */
static void
check_round_trip(JsonNode *value, GError *error, gpointer user_data)
{
  g_clear_error(&error);
  if (!value)
    return;
  g_autofree char *first = cbt_json_to_string(value, FALSE);
  json_node_unref(value);
  g_autoptr(JsonNode) second = reread(first);
  g_autofree char *second_text = cbt_json_to_string(second, FALSE);
  g_autoptr(JsonNode) third = reread(second_text);
  if (!json_node_equal(second, third)) {
    g_autofree char *third_text = cbt_json_to_string(third, FALSE);
    fprintf(stderr, "round trip differs:\n  %s\n  %s\n  %s\n", first, second_text, third_text);
    abort();
  }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  size_t chunk = data[0] % 16 ? data[0] % 16 : size;
  const char *text = (const char *)data + 1;
  size_t left = size - 1;

  CbtJsonStream *js = cbt_json_stream_new(MAX_MESSAGE, check_round_trip, NULL);
  while (left) {
    size_t n = MIN(chunk, left);
    cbt_json_stream_feed(js, text, n);
    text += n;
    left -= n;
  }
  cbt_json_stream_flush(js);
  cbt_json_stream_free(js);
  return 0;
}
