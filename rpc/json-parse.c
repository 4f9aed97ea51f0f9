/* Streaming JSON reader with QEMU's observable behaviour.
 *
 * Three stages, as QMP clients see them:
 *  - a lexer cuts the byte stream into tokens; a byte that cannot continue a token is a "stray"
 *    error, after which input is skipped up to the next structural or control character so a
 *    client can resynchronise;
 *  - a framer collects tokens until braces and brackets balance (or a closer appears too
 *    early), which delimits one message without newlines;
 *  - a recursive-descent parser turns the tokens of one message into a JsonNode tree, keeping
 *    the first error it meets.
 * Extensions QEMU accepts are accepted too: single-quoted strings and the \' escape.
 */
#include "rpc/rpc-private.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/memory.h"

G_DEFINE_QUARK(cbt - json - error - quark, cbt_json_error)

typedef enum {
  TOK_LCURLY,
  TOK_RCURLY,
  TOK_LSQUARE,
  TOK_RSQUARE,
  TOK_COLON,
  TOK_COMMA,
  TOK_STRING,
  TOK_INTEGER,
  TOK_FLOAT,
  TOK_KEYWORD,
} TokenType;

typedef enum {
  LEX_START,
  LEX_RECOVER,
  LEX_STRING,
  LEX_STRING_ESCAPE,
  LEX_ZERO,
  LEX_SIGN,
  LEX_DIGITS,
  LEX_FRAC_START,
  LEX_FRAC,
  LEX_EXP_START,
  LEX_EXP_SIGN,
  LEX_EXP,
  LEX_KEYWORD,
} LexState;

/* Tokens of the message being framed live in one text buffer (NUL-separated), so an 8 MiB
 * message of one-byte tokens costs a few bytes per token, not an allocation each. */
typedef struct {
  guint32 type;
  guint32 offset; /* of the token's text in CbtJsonStream.text */
} Token;

struct CbtJsonStream {
  CbtJsonEmitFunc emit;
  gpointer user_data;
  gsize max_message;

  LexState state;
  char quote;     /* the delimiter of the string being lexed */
  GString *token; /* text of the token being lexed */

  GArray *tokens;     /* Token, the message being framed */
  GString *text;      /* their texts, each NUL-terminated */
  gsize message_size; /* bytes of the tokens in @tokens */
  int braces;
  int brackets;
};

#define MAX_NESTING CBT_RPC_MAX_DEPTH
/* QEMU's limit on tokens per message; it also bounds the tree a message can build. */
#define MAX_TOKENS (2u << 20)

CbtJsonStream *
cbt_json_stream_new(gsize max_message, CbtJsonEmitFunc emit, gpointer user_data)
{
  CbtJsonStream *js = g_new0(CbtJsonStream, 1);

  js->emit = emit;
  js->user_data = user_data;
  js->max_message = max_message;
  js->state = LEX_START;
  js->token = g_string_new(NULL);
  js->tokens = g_array_new(FALSE, FALSE, sizeof(Token));
  js->text = g_string_new(NULL);
  return js;
}

void
cbt_json_stream_free(CbtJsonStream *js)
{
  if (!js)
    return;
  g_string_free(js->token, TRUE);
  g_string_free(js->text, TRUE);
  g_array_unref(js->tokens);
  g_free(js);
}

/* ---- numbers ------------------------------------------------------------------------------ */

#define BIG_UINT_MARK '\xFF'

JsonNode *
cbt_json_uint_new(guint64 v)
{
  char buf[32];

  if (v <= G_MAXINT64)
    return json_node_init_int(json_node_alloc(), (gint64)v);
  g_snprintf(buf, sizeof(buf), "%c%" G_GUINT64_FORMAT, BIG_UINT_MARK, v);
  return json_node_init_string(json_node_alloc(), buf);
}

gboolean
cbt_json_get_big_uint(JsonNode *node, guint64 *value)
{
  const char *s;

  if (!node || !JSON_NODE_HOLDS_VALUE(node) || json_node_get_value_type(node) != G_TYPE_STRING)
    return FALSE;
  s = json_node_get_string(node);
  if (s[0] != BIG_UINT_MARK || !g_ascii_isdigit(s[1]))
    return FALSE;
  if (value)
    *value = g_ascii_strtoull(s + 1, NULL, 10);
  return TRUE;
}

/* An integer token is int64 if it fits, else uint64, else a double (as QEMU). */
static JsonNode *
number_node(const char *text, gboolean integer)
{
  if (integer) {
    char *end;

    errno = 0;
    gint64 v = g_ascii_strtoll(text, &end, 10);
    if (errno == 0 && *end == '\0')
      return json_node_init_int(json_node_alloc(), v);
    if (text[0] != '-') {
      errno = 0;
      guint64 u = g_ascii_strtoull(text, &end, 10);
      if (errno == 0 && *end == '\0')
        return cbt_json_uint_new(u);
    }
  }
  return json_node_init_double(json_node_alloc(), g_ascii_strtod(text, NULL));
}

/* ---- modified UTF-8 ----------------------------------------------------------------------- */

gboolean
cbt_json_codepoint_valid(int cp)
{
  if (cp < 0 || cp > 0x10FFFF)
    return FALSE;
  if (cp >= 0xD800 && cp <= 0xDFFF)
    return FALSE;
  /* Noncharacters are refused too, as QEMU does. */
  if ((cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE)
    return FALSE;
  return TRUE;
}

int
cbt_json_utf8_decode(const char *s, const char **end)
{
  static const int min_cp[] = { 0x80, 0x800, 0x10000, 0x200000, 0x4000000 };
  const guchar *p = (const guchar *)s;
  guint byte = *p++;
  int cp;
  guint len;

  if (byte < 0x80) {
    *end = (const char *)p;
    return byte;
  }
  if (byte >= 0xFE || !(byte & 0x40)) { /* impossible byte or stray continuation byte */
    *end = (const char *)p;
    return -1;
  }
  for (len = 0; byte & (0x80u >> len); len++)
    ;
  cp = byte & ((0x80u >> len) - 1);
  for (guint i = 1; i < len; i++) {
    if ((*p & 0xC0) != 0x80) {
      *end = (const char *)p;
      return -1;
    }
    cp = (cp << 6) | (*p++ & 0x3F);
  }
  *end = (const char *)p;
  if (cp == 0 && len == 2)
    return 0; /* "\xC0\x80": the modified UTF-8 form of U+0000 */
  if (!cbt_json_codepoint_valid(cp) || cp < min_cp[len - 2])
    return -1;
  return cp;
}

static void
utf8_append(GString *out, int cp)
{
  if (cp == 0)
    g_string_append_len(out, "\xC0\x80", 2);
  else
    g_string_append_unichar(out, cp);
}

/* ---- parser -------------------------------------------------------------------------------- */

typedef struct {
  Token *tok;
  const char *text;
  guint n;
  guint pos;
  GError *error; /* the first error only */
} Parser;

static void G_GNUC_PRINTF(2, 3) parse_error(Parser *p, const char *fmt, ...)
{
  va_list ap;

  if (p->error)
    return;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  p->error = g_error_new(CBT_JSON_ERROR, CBT_JSON_ERROR_PARSE, "JSON parse error, %s", msg);
}

static Token *
peek(Parser *p)
{
  return p->pos < p->n ? &p->tok[p->pos] : NULL;
}

static Token *
next(Parser *p)
{
  return p->pos < p->n ? &p->tok[p->pos++] : NULL;
}

static const char *
token_text(Parser *p, Token *t)
{
  return p->text + t->offset;
}

static int
hex4(const char *s)
{
  int v = 0;

  for (int i = 0; i < 4; i++) {
    if (!g_ascii_isxdigit(s[i]))
      return -1;
    v = v * 16 + g_ascii_xdigit_value(s[i]);
  }
  return v;
}

/* Decode a \u escape at @s (pointing at the backslash); surrogate pairs are joined. Returns the
 * code point or -1, and the end of what was consumed. */
static int
unicode_escape(const char *s, const char **end)
{
  const char *limit = s + strlen(s);
  const char *p = s + 2;
  int cp = hex4(p);

  p = MIN(p + 4, limit);
  if (cp >= 0xD800 && cp <= 0xDBFF && p[0] == '\\' && p[1] == 'u') {
    int low = hex4(p + 2);

    if (low >= 0xDC00 && low <= 0xDFFF) {
      cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF);
      p += 6;
    } else {
      cp = -1;
    }
  }
  *end = p;
  return cp;
}

/* The escape sequence at *@text (a backslash) into @s; advances *@text. */
static gboolean
parse_escape(Parser *p, const char **text, GString *s)
{
  static const char simple[] = "\"\"''\\\\//b\bf\fn\nr\rt\t";
  const char *t = *text;

  for (const char *e = simple; *e; e += 2) {
    if (*e == t[1]) {
      g_string_append_c(s, e[1]);
      *text = t + 2;
      return TRUE;
    }
  }
  if (t[1] != 'u') {
    parse_error(p, "invalid escape sequence in string");
    return FALSE;
  }
  const char *end;
  int cp = unicode_escape(t, &end);
  if (!cbt_json_codepoint_valid(cp)) {
    parse_error(p, "%.*s is not a valid Unicode character", (int)(end - t), t);
    return FALSE;
  }
  utf8_append(s, cp);
  *text = end;
  return TRUE;
}

static JsonNode *
parse_string(Parser *p, const char *text)
{
  char quote = *text++;
  g_autoptr(GString) s = g_string_new(NULL);

  while (*text != quote) {
    if (*text == '\\') {
      if (!parse_escape(p, &text, s))
        return NULL;
      continue;
    }
    const char *end;
    int cp = cbt_json_utf8_decode(text, &end);
    if (cp < 0) {
      parse_error(p, "invalid UTF-8 sequence in string");
      return NULL;
    }
    utf8_append(s, cp);
    text = end;
  }
  return json_node_init_string(json_node_alloc(), s->str);
}

static JsonNode *parse_value(Parser *p);

static gboolean
parse_member(Parser *p, JsonObject *obj)
{
  Token *key_tok = peek(p);
  g_autoptr(JsonNode) key = parse_value(p);

  if (!key || key_tok->type != TOK_STRING) {
    parse_error(p, "key is not a string in object");
    return FALSE;
  }
  Token *colon = next(p);
  if (!colon || colon->type != TOK_COLON) {
    parse_error(p, "missing : in object pair");
    return FALSE;
  }
  JsonNode *value = parse_value(p);
  if (!value) {
    parse_error(p, "Missing value in dict");
    return FALSE;
  }
  const char *name = json_node_get_string(key);
  if (json_object_has_member(obj, name)) {
    json_node_unref(value);
    parse_error(p, "duplicate key");
    return FALSE;
  }
  json_object_set_member(obj, name, value);
  return TRUE;
}

static JsonNode *
parse_object(Parser *p)
{
  g_autoptr(JsonObject) obj = json_object_new();
  Token *t;

  next(p); /* { */
  t = peek(p);
  if (t && t->type == TOK_RCURLY) {
    next(p);
    return json_node_init_object(json_node_alloc(), obj);
  }
  for (;;) {
    if (!parse_member(p, obj))
      return NULL;
    t = next(p);
    if (!t) {
      parse_error(p, "premature EOI");
      return NULL;
    }
    if (t->type == TOK_RCURLY)
      return json_node_init_object(json_node_alloc(), obj);
    if (t->type != TOK_COMMA) {
      parse_error(p, "expected separator in dict");
      return NULL;
    }
  }
}

static JsonNode *
parse_array(Parser *p)
{
  g_autoptr(JsonArray) arr = json_array_new();
  Token *t;

  next(p); /* [ */
  t = peek(p);
  if (t && t->type == TOK_RSQUARE) {
    next(p);
    return json_node_init_array(json_node_alloc(), arr);
  }
  for (;;) {
    JsonNode *elem = parse_value(p);

    if (!elem) {
      parse_error(p, "expecting value");
      return NULL;
    }
    json_array_add_element(arr, elem);
    t = next(p);
    if (!t) {
      parse_error(p, "premature EOI");
      return NULL;
    }
    if (t->type == TOK_RSQUARE)
      return json_node_init_array(json_node_alloc(), arr);
    if (t->type != TOK_COMMA) {
      parse_error(p, "expected separator in list");
      return NULL;
    }
  }
}

static JsonNode *
parse_keyword(Parser *p, const char *word)
{
  if (g_str_equal(word, "true"))
    return json_node_init_boolean(json_node_alloc(), TRUE);
  if (g_str_equal(word, "false"))
    return json_node_init_boolean(json_node_alloc(), FALSE);
  if (g_str_equal(word, "null"))
    return json_node_init_null(json_node_alloc());
  parse_error(p, "invalid keyword '%s'", word);
  return NULL;
}

static JsonNode *
parse_value(Parser *p)
{
  Token *t = peek(p);

  if (!t) {
    parse_error(p, "premature EOI");
    return NULL;
  }
  switch (t->type) {
  case TOK_LCURLY:
    return parse_object(p);
  case TOK_LSQUARE:
    return parse_array(p);
  case TOK_STRING:
    next(p);
    return parse_string(p, token_text(p, t));
  case TOK_INTEGER:
  case TOK_FLOAT:
    next(p);
    return number_node(token_text(p, t), t->type == TOK_INTEGER);
  case TOK_KEYWORD:
    next(p);
    return parse_keyword(p, token_text(p, t));
  default:
    parse_error(p, "expecting value");
    return NULL;
  }
}

/* ---- framer ------------------------------------------------------------------------------- */

static void
stream_reset(CbtJsonStream *js)
{
  g_array_set_size(js->tokens, 0);
  g_string_truncate(js->text, 0);
  js->message_size = 0;
  js->braces = 0;
  js->brackets = 0;
}

static void
emit_error(CbtJsonStream *js, int code, const char *msg)
{
  stream_reset(js);
  js->emit(NULL, g_error_new_literal(CBT_JSON_ERROR, code, msg), js->user_data);
}

/* A message this large has just been handled and its value freed: give back the token buffers
 * and the nodes (one per value, tens of bytes each, in the main thread's heap), so that one
 * 8 MiB request of small values does not leave a hundred MiB resident. */
#define BIG_MESSAGE_TOKENS 16384u
#define BYTES_PER_TOKEN 64u

static void
release_big(CbtJsonStream *js, guint ntokens)
{
  g_array_unref(js->tokens);
  js->tokens = g_array_new(FALSE, FALSE, sizeof(Token));
  g_string_free(js->text, TRUE);
  js->text = g_string_new(NULL);
  cbt_memory_released((gsize)ntokens * BYTES_PER_TOKEN);
}

static void
emit_message(CbtJsonStream *js)
{
  Parser p = { (Token *)(void *)js->tokens->data, js->text->str, js->tokens->len, 0, NULL };
  JsonNode *value = parse_value(&p);

  if (p.error) {
    g_clear_pointer(&value, json_node_unref);
  } else if (!value) {
    p.error = g_error_new_literal(CBT_JSON_ERROR, CBT_JSON_ERROR_PARSE,
                                  "JSON parse error, expecting value");
  }
  /* Tokens after a complete value (only possible at flush) are ignored, as QEMU does. */
  guint ntokens = js->tokens->len;
  stream_reset(js);
  js->emit(value, p.error, js->user_data);
  if (ntokens >= BIG_MESSAGE_TOKENS)
    release_big(js, ntokens);
}

static void
process_token(CbtJsonStream *js, TokenType type)
{
  Token t = { type, js->text->len };

  switch (type) {
  case TOK_LCURLY:
    js->braces++;
    break;
  case TOK_RCURLY:
    js->braces--;
    break;
  case TOK_LSQUARE:
    js->brackets++;
    break;
  case TOK_RSQUARE:
    js->brackets--;
    break;
  default:
    break;
  }
  if (js->braces + js->brackets > MAX_NESTING) {
    g_string_truncate(js->token, 0);
    emit_error(js, CBT_JSON_ERROR_PARSE, "JSON nesting depth limit exceeded");
    return;
  }
  if (js->tokens->len >= MAX_TOKENS) {
    /* Unlike QEMU, close: the rest of the message cannot be framed reliably. */
    g_string_truncate(js->token, 0);
    js->state = LEX_RECOVER;
    emit_error(js, CBT_JSON_ERROR_TOO_BIG, "JSON token count limit exceeded");
    return;
  }
  g_string_append_len(js->text, js->token->str, js->token->len + 1); /* with its NUL */
  js->message_size += js->token->len;
  g_string_truncate(js->token, 0);
  g_array_append_val(js->tokens, t);

  if ((js->braces > 0 || js->brackets > 0) && js->braces >= 0 && js->brackets >= 0)
    return;
  emit_message(js);
}

/* ---- lexer -------------------------------------------------------------------------------- */

static void
lex_error(CbtJsonStream *js)
{
  g_autofree char *msg =
    g_strdup_printf("JSON parse error, stray '%.*s'", (int)js->token->len, js->token->str);

  g_string_truncate(js->token, 0);
  js->state = LEX_RECOVER;
  emit_error(js, CBT_JSON_ERROR_PARSE, msg);
}

static gboolean
is_structural(guchar c)
{
  return c == '{' || c == '}' || c == '[' || c == ']' || c == ':' || c == ',';
}

/* The token in progress ends before @c; returns TRUE when @c must be looked at again. */
static gboolean
lex_finish(CbtJsonStream *js, TokenType type)
{
  js->state = LEX_START;
  process_token(js, type);
  return TRUE;
}

/* A byte at the start of a token. */
static void
lex_start(CbtJsonStream *js, guchar c)
{
  static const struct {
    char c;
    TokenType type;
  } punct[] = {
    { '{', TOK_LCURLY },  { '}', TOK_RCURLY }, { '[', TOK_LSQUARE },
    { ']', TOK_RSQUARE }, { ':', TOK_COLON },  { ',', TOK_COMMA },
  };

  if (c == ' ' || c == '\t' || c == '\r' || c == '\n')
    return;
  g_string_append_c(js->token, c);
  for (guint i = 0; i < G_N_ELEMENTS(punct); i++) {
    if (c == (guchar)punct[i].c) {
      process_token(js, punct[i].type);
      return;
    }
  }
  if (c == '"' || c == '\'') {
    js->quote = c;
    js->state = LEX_STRING;
  } else if (c == '0') {
    js->state = LEX_ZERO;
  } else if (c == '-') {
    js->state = LEX_SIGN;
  } else if (c >= '1' && c <= '9') {
    js->state = LEX_DIGITS;
  } else if (c >= 'a' && c <= 'z') {
    js->state = LEX_KEYWORD;
  } else {
    lex_error(js);
  }
}

/* A byte inside a string: any byte 0x20..0xFD; validation is the parser's job. */
static void
lex_string(CbtJsonStream *js, guchar c)
{
  g_string_append_c(js->token, c);
  if (c < 0x20 || c > 0xFD) {
    lex_error(js);
  } else if (js->state == LEX_STRING_ESCAPE) {
    js->state = LEX_STRING;
  } else if (c == '\\') {
    js->state = LEX_STRING_ESCAPE;
  } else if (c == (guchar)js->quote) {
    js->state = LEX_START;
    process_token(js, TOK_STRING);
  }
}

/* A byte after the start of a number or keyword. One that cannot continue the token ends it
 * (and is looked at again: returns TRUE) where the grammar allows an end, and is a stray error
 * where it does not. */
static gboolean
lex_number_or_keyword(CbtJsonStream *js, guchar c)
{
  gboolean digit = c >= '0' && c <= '9';
  gboolean exp = c == 'e' || c == 'E';
  LexState next_state = LEX_START;
  gboolean can_end = FALSE;
  TokenType type = TOK_INTEGER;

  switch (js->state) {
  case LEX_ZERO:
    next_state = c == '.' ? LEX_FRAC_START : LEX_START;
    can_end = !digit;
    break;
  case LEX_SIGN:
    next_state = c == '0' ? LEX_ZERO : digit ? LEX_DIGITS : LEX_START;
    break;
  case LEX_DIGITS:
    next_state = digit ? LEX_DIGITS : exp ? LEX_EXP_START : c == '.' ? LEX_FRAC_START : LEX_START;
    can_end = TRUE;
    break;
  case LEX_FRAC_START:
    next_state = digit ? LEX_FRAC : LEX_START;
    break;
  case LEX_FRAC:
    next_state = digit ? LEX_FRAC : exp ? LEX_EXP_START : LEX_START;
    can_end = TRUE;
    type = TOK_FLOAT;
    break;
  case LEX_EXP_START:
    next_state = digit ? LEX_EXP : (c == '+' || c == '-') ? LEX_EXP_SIGN : LEX_START;
    break;
  case LEX_EXP_SIGN:
    next_state = digit ? LEX_EXP : LEX_START;
    break;
  case LEX_EXP:
    next_state = digit ? LEX_EXP : LEX_START;
    can_end = TRUE;
    type = TOK_FLOAT;
    break;
  case LEX_KEYWORD:
    next_state = c >= 'a' && c <= 'z' ? LEX_KEYWORD : LEX_START;
    can_end = TRUE;
    type = TOK_KEYWORD;
    break;
  default:
    g_assert_not_reached();
  }
  if (next_state != LEX_START) {
    g_string_append_c(js->token, c);
    js->state = next_state;
    return FALSE;
  }
  if (can_end)
    return lex_finish(js, type);
  g_string_append_c(js->token, c);
  lex_error(js);
  return FALSE;
}

/* One step of the lexer for byte @c; returns TRUE when @c was not consumed. */
static gboolean
lex_step(CbtJsonStream *js, guchar c)
{
  switch (js->state) {
  case LEX_RECOVER:
    /* Skip to a structural character, a control character other than tab, or 0xFE/0xFF. */
    if (is_structural(c) || (c < 0x20 && c != '\t') || c >= 0xFE) {
      js->state = LEX_START;
      return TRUE;
    }
    return FALSE;
  case LEX_START:
    lex_start(js, c);
    return FALSE;
  case LEX_STRING:
  case LEX_STRING_ESCAPE:
    lex_string(js, c);
    return FALSE;
  default:
    return lex_number_or_keyword(js, c);
  }
}

void
cbt_json_stream_feed(CbtJsonStream *js, const char *buf, gsize len)
{
  for (gsize i = 0; i < len; i++) {
    while (lex_step(js, (guchar)buf[i]))
      ;
    if (js->max_message && js->message_size + js->token->len > js->max_message) {
      g_string_truncate(js->token, 0);
      js->state = LEX_RECOVER;
      emit_error(js, CBT_JSON_ERROR_TOO_BIG, "JSON message size limit exceeded");
    }
  }
}

void
cbt_json_stream_flush(CbtJsonStream *js)
{
  switch (js->state) {
  case LEX_ZERO:
  case LEX_DIGITS:
    lex_finish(js, TOK_INTEGER);
    break;
  case LEX_FRAC:
  case LEX_EXP:
    lex_finish(js, TOK_FLOAT);
    break;
  case LEX_KEYWORD:
    lex_finish(js, TOK_KEYWORD);
    break;
  case LEX_START:
  case LEX_RECOVER:
    break;
  default:
    lex_error(js);
    break;
  }
  js->state = LEX_START;
  if (js->tokens->len)
    emit_message(js);
}

/* ---- one-shot parsing --------------------------------------------------------------------- */

typedef struct {
  JsonNode *value;
  GError *error;
  guint count;
} OneShot;

static void
one_shot_emit(JsonNode *value, GError *error, gpointer user_data)
{
  OneShot *os = user_data;

  os->count++;
  if (os->count > 1 || os->error || os->value) {
    if (!os->error) {
      os->error = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC,
                                      "Expecting at most one JSON value");
    }
    g_clear_pointer(&value, json_node_unref);
    g_clear_error(&error);
    return;
  }
  os->value = value;
  if (error) {
    os->error = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, error->message);
    g_error_free(error);
  }
}

JsonNode *
cbt_rpc_json_parse(const char *text, gssize len, GError **error)
{
  OneShot os = { NULL, NULL, 0 };
  CbtJsonStream *js = cbt_json_stream_new(CBT_RPC_MAX_MESSAGE, one_shot_emit, &os);

  cbt_json_stream_feed(js, text, len < 0 ? strlen(text) : (gsize)len);
  cbt_json_stream_flush(js);
  cbt_json_stream_free(js);
  if (!os.error && !os.value)
    os.error = g_error_new_literal(CBT_RPC_ERROR, CBT_RPC_ERROR_GENERIC, "Expecting a JSON value");
  if (os.error) {
    g_clear_pointer(&os.value, json_node_unref);
    g_propagate_error(error, os.error);
    return NULL;
  }
  return os.value;
}

JsonNode *
cbt_rpc_uint_new(guint64 value)
{
  return cbt_json_uint_new(value);
}
