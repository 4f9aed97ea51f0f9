/* nbd/transport-tls.h — the TLS transport (transport-tls.c). */
#pragma once

#include <gnutls/gnutls.h>

#include "nbd/transport.h"

/* Run the server handshake of @session on connected @fd until @deadline (monotonic) and wrap
 * both in a transport, which owns them from now on (also when this fails: NULL with @error). */
CbtNbdTransport *cbt_nbd_transport_tls_new(int fd, gnutls_session_t session, gint64 deadline,
                                           GError **error);
