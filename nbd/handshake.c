/* nbd/handshake.c — fixed-newstyle negotiation (docs/nbd-server.md, "Handshake").
 *
 * Every option's payload is consumed whatever the answer, so the stream never desyncs; options
 * above CBT_NBD_MAX_OPTION_PAYLOAD are discarded without buffering. The loop ends with the
 * connection attached to an export (EXPORT_NAME, GO) or with the client dropped.
 */
#include "nbd/nbd-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "nbd/transport-tls.h"

typedef enum { OPT_CONTINUE, OPT_TRANSMIT, OPT_DROP } OptResult;

static gboolean
send_reply(CbtNbdConn *conn, guint32 opt, guint32 type, const void *data, gsize len)
{
  guint8 hdr[NBD_OPTION_REPLY_SIZE];
  struct iovec iov[2] = { { hdr, sizeof hdr }, { (void *)data, len } };

  cbt_nbd_put64(hdr, NBD_REP_MAGIC);
  cbt_nbd_put32(hdr + 8, opt);
  cbt_nbd_put32(hdr + 12, type);
  cbt_nbd_put32(hdr + 16, len);
  return cbt_nbd_writev_full(conn, iov, len ? 2 : 1) == 0;
}

static OptResult send_error(CbtNbdConn *conn, guint32 opt, guint32 type, const char *fmt, ...)
  G_GNUC_PRINTF(4, 5);

static OptResult
send_error(CbtNbdConn *conn, guint32 opt, guint32 type, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  g_autofree char *msg = g_strdup_vprintf(fmt, ap);
  va_end(ap);
  gsize len = MIN(strlen(msg), NBD_MAX_STRING);

  g_debug("option %u refused (0x%x): %s", opt, type, msg);
  return send_reply(conn, opt, type, msg, len) ? OPT_CONTINUE : OPT_DROP;
}

static OptResult
ack(CbtNbdConn *conn, guint32 opt)
{
  return send_reply(conn, opt, NBD_REP_ACK, NULL, 0) ? OPT_CONTINUE : OPT_DROP;
}

static void
set_meta(CbtNbdConn *conn, CbtNbdExport *exp, GArray *sel)
{
  g_clear_pointer(&conn->meta_exp, cbt_nbd_export_unref);
  g_clear_pointer(&conn->meta, g_array_unref);
  conn->meta_exp = exp;
  conn->meta = sel;
}

/* Enter transmission on @exp (ref transferred). A selection made for another export is void. */
static void
enter_transmission(CbtNbdConn *conn, CbtNbdExport *exp)
{
  if (conn->meta_exp != exp)
    set_meta(conn, NULL, NULL);
  conn->exp = exp;
  conn->eflags = cbt_nbd_export_eflags(exp, conn->structured);
  conn->deadline = 0;
  cbt_nbd_conn_set_send_timeout(conn, 0);
}

static OptResult
opt_export_name(CbtNbdConn *conn, const guint8 *data, guint32 len)
{
  g_autofree char *name = g_strndup((const char *)data, len);
  guint8 reply[8 + 2 + NBD_EXPORT_NAME_PAD] = { 0 };

  /* EXPORT_NAME has no error reply: an unusable request can only be dropped. */
  if (len > NBD_MAX_STRING || strlen(name) != len)
    return OPT_DROP;
  g_autoptr(CbtNbdExport) exp = cbt_nbd_export_find_name(name);
  if (!exp || cbt_nbd_export_attach(exp, conn) != CBT_NBD_ATTACH_OK)
    return OPT_DROP;
  enter_transmission(conn, g_steal_pointer(&exp));
  cbt_nbd_put64(reply, conn->exp->size);
  cbt_nbd_put16(reply + 8, conn->eflags);
  if (cbt_nbd_write_full(conn, reply, conn->no_zeroes ? 10 : sizeof reply) < 0)
    return OPT_DROP;
  return OPT_TRANSMIT;
}

static OptResult
opt_list(CbtNbdConn *conn, guint32 len, guint *budget)
{
  if (len)
    return send_error(conn, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST with a payload");
  g_autoptr(GPtrArray) list = cbt_nbd_export_list();
  for (guint i = 0; i + 1 < list->len; i += 2) {
    const char *name = list->pdata[i], *desc = list->pdata[i + 1];
    gsize nl = strlen(name), dl = strlen(desc);
    g_autofree guint8 *buf = g_malloc(4 + nl + dl);
    cbt_nbd_put32(buf, nl);
    memcpy(buf + 4, name, nl);
    memcpy(buf + 4 + nl, desc, dl);
    if (!send_reply(conn, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + nl + dl))
      return OPT_DROP;
    (*budget)++; /* the client may now ask about each export */
  }
  return ack(conn, NBD_OPT_LIST);
}

static gboolean
send_info(CbtNbdConn *conn, guint32 opt, guint16 type, const void *data, gsize len)
{
  g_autofree guint8 *buf = g_malloc(2 + len);
  cbt_nbd_put16(buf, type);
  memcpy(buf + 2, data, len);
  return send_reply(conn, opt, NBD_REP_INFO, buf, 2 + len);
}

static gboolean
send_infos(CbtNbdConn *conn, guint32 opt, CbtNbdExport *exp, gboolean want_name, gboolean want_desc)
{
  guint8 sizes[12], export[10];

  if (want_name && !send_info(conn, opt, NBD_INFO_NAME, exp->name, strlen(exp->name)))
    return FALSE;
  if (want_desc && exp->description &&
      !send_info(conn, opt, NBD_INFO_DESCRIPTION, exp->description, strlen(exp->description)))
    return FALSE;
  /* Always sent: the sizes are true for every client, asked for or not. */
  cbt_nbd_put32(sizes, exp->min_block);
  cbt_nbd_put32(sizes + 4, exp->pref_block);
  cbt_nbd_put32(sizes + 8, exp->max_block);
  if (!send_info(conn, opt, NBD_INFO_BLOCK_SIZE, sizes, sizeof sizes))
    return FALSE;
  /* INFO_EXPORT is mandatory even unrequested (qemu never asks for it). */
  cbt_nbd_put64(export, exp->size);
  cbt_nbd_put16(export + 8, cbt_nbd_export_eflags(exp, conn->structured));
  return send_info(conn, opt, NBD_INFO_EXPORT, export, sizeof export);
}

static OptResult
opt_info_go(CbtNbdConn *conn, guint32 opt, const guint8 *data, guint32 len)
{
  gboolean want_name = FALSE, want_desc = FALSE;

  if (len < 6)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "request too short");
  guint32 nl = cbt_nbd_get32(data);
  if (nl > len - 6)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "name length exceeds the payload");
  guint16 n_info = cbt_nbd_get16(data + 4 + nl);
  if (len != 6 + nl + 2u * n_info)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "payload length does not match");
  g_autofree char *name = g_strndup((const char *)data + 4, nl);
  if (nl > NBD_MAX_STRING || strlen(name) != nl)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "invalid export name");
  for (guint i = 0; i < n_info; i++) {
    guint16 t = cbt_nbd_get16(data + 6 + nl + 2 * i);
    want_name |= t == NBD_INFO_NAME;
    want_desc |= t == NBD_INFO_DESCRIPTION;
  }

  /* GO attaches before answering, so a deletion cannot slip in between. */
  g_autoptr(CbtNbdExport) exp = cbt_nbd_export_find_name(name);
  CbtNbdAttach at = !exp                ? CBT_NBD_ATTACH_GONE
                    : opt == NBD_OPT_GO ? cbt_nbd_export_attach(exp, conn)
                                        : CBT_NBD_ATTACH_OK;
  if (at == CBT_NBD_ATTACH_FULL)
    return send_error(conn, opt, NBD_REP_ERR_POLICY,
                      "export '%s' has reached its limit of %u clients", name, exp->max_clients);
  if (at != CBT_NBD_ATTACH_OK)
    return send_error(conn, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not present", name);
  if (!send_infos(conn, opt, exp, want_name, want_desc) || ack(conn, opt) != OPT_CONTINUE) {
    if (opt == NBD_OPT_GO)
      cbt_nbd_export_detach(exp, conn);
    return OPT_DROP;
  }
  if (opt == NBD_OPT_INFO)
    return OPT_CONTINUE;
  enter_transmission(conn, g_steal_pointer(&exp));
  return OPT_TRANSMIT;
}

/* The selection: the (already distinct) matches in order, numbered from 0. */
static GArray *
select_contexts(GArray *matches)
{
  GArray *sel = g_array_sized_new(FALSE, FALSE, sizeof(CbtNbdMetaSel), matches->len);

  for (guint i = 0; i < matches->len; i++) {
    CbtNbdMetaMatch *m = &g_array_index(matches, CbtNbdMetaMatch, i);
    CbtNbdMetaSel s = { .id = i, .kind = m->kind, .bitmap = m->bitmap };
    g_array_append_val(sel, s);
  }
  return sel;
}

static gboolean
send_context(CbtNbdConn *conn, guint32 opt, guint32 id, const char *name)
{
  gsize nl = strlen(name);
  g_autofree guint8 *buf = g_malloc(4 + nl);
  cbt_nbd_put32(buf, id);
  memcpy(buf + 4, name, nl);
  return send_reply(conn, opt, NBD_REP_META_CONTEXT, buf, 4 + nl);
}

/* Check a LIST/SET_META payload; on success @ret_exp is the export it names (ref) and @matches
 * holds the contexts its queries match. */
static OptResult
parse_meta(CbtNbdConn *conn, guint32 opt, const guint8 *data, guint32 len, GArray *matches,
           CbtNbdExport **ret_exp)
{
  const char *why = NULL;

  if (len < 8)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "request too short");
  guint32 nl = cbt_nbd_get32(data);
  if (nl > len - 8)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "name length exceeds the payload");
  g_autofree char *name = g_strndup((const char *)data + 4, nl);
  if (nl > NBD_MAX_STRING || strlen(name) != nl)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "invalid export name");

  g_autoptr(CbtNbdExport) exp = cbt_nbd_export_find_name(name);
  /* Parse with or without the export: a malformed request is INVALID either way. */
  if (!cbt_nbd_meta_parse(exp, opt == NBD_OPT_LIST_META_CONTEXT, data + 4 + nl, len - 4 - nl,
                          matches, &why))
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "%s", why);
  if (!exp)
    return send_error(conn, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not present", name);
  if (opt == NBD_OPT_SET_META_CONTEXT && matches->len > CBT_NBD_MAX_CONTEXTS)
    return send_error(conn, opt, NBD_REP_ERR_TOO_BIG, "too many contexts selected");
  *ret_exp = g_steal_pointer(&exp);
  return OPT_CONTINUE;
}

static OptResult
opt_meta(CbtNbdConn *conn, guint32 opt, const guint8 *data, guint32 len)
{
  gboolean list = opt == NBD_OPT_LIST_META_CONTEXT;
  g_autoptr(CbtNbdExport) exp = NULL;
  g_autoptr(GArray) matches = g_array_new(FALSE, FALSE, sizeof(CbtNbdMetaMatch));

  g_array_set_clear_func(matches, cbt_nbd_meta_match_clear);
  if (!list)
    set_meta(conn, NULL, NULL); /* every SET, even a failing one, ends the old selection */
  if (!list && !conn->structured)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "structured replies not negotiated");
  OptResult res = parse_meta(conn, opt, data, len, matches, &exp);
  if (!exp)
    return res;

  for (guint i = 0; i < matches->len; i++) {
    CbtNbdMetaMatch *m = &g_array_index(matches, CbtNbdMetaMatch, i);
    if (!send_context(conn, opt, list ? 0 : i, m->name))
      return OPT_DROP;
  }
  if (!list)
    set_meta(conn, g_steal_pointer(&exp), select_contexts(matches));
  return ack(conn, opt);
}

/* NBD_OPT_STARTTLS acknowledged: the TLS handshake on the same socket, then the peer's
 * certificate (verify-peer) and identity (tls-authz). A failure drops this client only. */
static OptResult
start_tls(CbtNbdConn *conn)
{
  g_autoptr(GError) error = NULL;

  if (ack(conn, NBD_OPT_STARTTLS) != OPT_CONTINUE)
    return OPT_DROP;
  int fd = fcntl(conn->fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0)
    return OPT_DROP;
  gnutls_session_t session = cbt_crypto_tls_session_new(conn->tls_creds, fd, &error);
  if (!session) {
    g_message("NBD client dropped: %s", error->message);
    close(fd);
    return OPT_DROP;
  }
  CbtNbdTransport *tls = cbt_nbd_transport_tls_new(fd, session, conn->deadline, &error);
  if (!tls) {
    g_message("NBD client dropped: %s", error->message);
    return OPT_DROP;
  }
  cbt_mutex_lock(&cbt_nbd_lock);
  CbtNbdTransport *plain = conn->transport;
  conn->transport = tls;
  conn->fd = fd;
  gboolean closing = conn->closing;
  cbt_mutex_unlock(&cbt_nbd_lock);
  cbt_nbd_transport_free(plain);
  if (closing)
    return OPT_DROP;

  g_autofree char *who = cbt_crypto_tls_session_check_peer(session, conn->tls_creds, &error);
  if (!who || (conn->tls_authz &&
               !cbt_crypto_authz_is_allowed(
                 conn->tls_authz, cbt_crypto_tls_creds_is_psk(conn->tls_creds) ? "PSK" : "x509",
                 who, &error))) {
    g_message("NBD client dropped: %s", error->message);
    return OPT_DROP;
  }
  conn->tls_done = TRUE;
  return OPT_CONTINUE;
}

static OptResult
handle_option(CbtNbdConn *conn, guint32 opt, const guint8 *data, guint32 len, guint *budget)
{
  if (!conn->fixed && opt != NBD_OPT_EXPORT_NAME)
    return send_error(conn, opt, NBD_REP_ERR_INVALID, "fixed newstyle not negotiated");
  /* With TLS, nothing about exports before it (NBD spec, "TLS support": FORCEDTLS). */
  if (conn->tls_creds && !conn->tls_done && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
    if (opt == NBD_OPT_EXPORT_NAME)
      return OPT_DROP; /* it has no error reply */
    return send_error(conn, opt, NBD_REP_ERR_TLS_REQD, "TLS negotiation required before option %u",
                      opt);
  }

  switch (opt) {
  case NBD_OPT_EXPORT_NAME:
    return opt_export_name(conn, data, len);
  case NBD_OPT_ABORT:
    send_reply(conn, opt, NBD_REP_ACK, NULL, 0); /* the client may already be gone */
    return OPT_DROP;
  case NBD_OPT_LIST:
    return opt_list(conn, len, budget);
  case NBD_OPT_STARTTLS:
    if (len)
      return send_error(conn, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS with a payload");
    if (!conn->tls_creds)
      return send_error(conn, opt, NBD_REP_ERR_POLICY, "TLS not configured");
    if (conn->tls_done)
      return send_error(conn, opt, NBD_REP_ERR_INVALID, "TLS already negotiated");
    return start_tls(conn);
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    return opt_info_go(conn, opt, data, len);
  case NBD_OPT_STRUCTURED_REPLY:
    if (len)
      return send_error(conn, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY with a payload");
    if (conn->structured)
      return send_error(conn, opt, NBD_REP_ERR_INVALID, "structured replies already negotiated");
    conn->structured = TRUE;
    return ack(conn, opt);
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return opt_meta(conn, opt, data, len);
  default:
    return send_error(conn, opt, NBD_REP_ERR_UNSUP, "option %u not supported", opt);
  }
}

/* Read one option and answer it. */
static OptResult
next_option(CbtNbdConn *conn, guint *budget)
{
  guint8 hdr[NBD_OPTION_HEADER_SIZE];

  if (cbt_nbd_read_full(conn, hdr, sizeof hdr) < 0)
    return OPT_DROP;
  if (cbt_nbd_get64(hdr) != NBD_IHAVEOPT)
    return OPT_DROP;
  guint32 opt = cbt_nbd_get32(hdr + 8), len = cbt_nbd_get32(hdr + 12);

  if (len > CBT_NBD_MAX_OPTION_PAYLOAD) {
    if (opt == NBD_OPT_EXPORT_NAME || len > CBT_NBD_MAX_OPTION_DISCARD ||
        cbt_nbd_discard(conn, len) < 0)
      return OPT_DROP;
    return send_error(conn, opt, NBD_REP_ERR_TOO_BIG, "option payload of %u bytes too large", len);
  }
  g_autofree guint8 *data = g_malloc(len + 1);
  if (cbt_nbd_read_full(conn, data, len) < 0)
    return OPT_DROP;
  return handle_option(conn, opt, data, len, budget);
}

static gboolean negotiate(CbtNbdConn *conn);

gboolean
cbt_nbd_handshake(CbtNbdConn *conn)
{
  cbt_nbd_tls_get(&conn->tls_creds, &conn->tls_authz);
  gboolean ok = negotiate(conn);
  g_clear_pointer(&conn->tls_creds, cbt_crypto_tls_creds_unref);
  g_clear_pointer(&conn->tls_authz, cbt_crypto_authz_unref);
  return ok;
}

static gboolean
negotiate(CbtNbdConn *conn)
{
  guint8 greet[NBD_GREETING_SIZE], cflags[4];
  guint budget = CBT_NBD_OPTION_BUDGET;

  cbt_nbd_put64(greet, NBD_MAGIC);
  cbt_nbd_put64(greet + 8, NBD_IHAVEOPT);
  cbt_nbd_put16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  if (cbt_nbd_write_full(conn, greet, sizeof greet) < 0 ||
      cbt_nbd_read_full(conn, cflags, sizeof cflags) < 0)
    return FALSE;
  guint32 f = cbt_nbd_get32(cflags);
  if (f & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
    return FALSE; /* a flag we never offered: nothing sensible can follow */
  conn->fixed = (f & NBD_FLAG_C_FIXED_NEWSTYLE) != 0;
  conn->no_zeroes = (f & NBD_FLAG_C_NO_ZEROES) != 0;

  for (;;) {
    if (budget == 0) {
      g_debug("NBD client used up its option budget");
      return FALSE;
    }
    budget--;
    switch (next_option(conn, &budget)) {
    case OPT_CONTINUE:
      break;
    case OPT_TRANSMIT:
      return TRUE;
    case OPT_DROP:
      return FALSE;
    }
  }
}
