/* tests/fuzz/fuzz-keyval.c — the command-line option parser (--blockdev, --object, ...) on
 * arbitrary text. The first byte chooses whether a first element without '=' names an
 * implied key, as --export and --object do. Each result must be an object or an error,
 * never both and never neither.
 */
#include "common/keyval.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  g_autofree char *text = g_strndup((const char *)data + 1, size - 1);
  g_autoptr(GError) error = NULL;
  JsonObject *obj = cbt_keyval_parse(text, data[0] & 1 ? "qom-type" : NULL, &error);

  if (!obj == !error)
    abort();
  if (obj)
    json_object_unref(obj);
  return 0;
}
