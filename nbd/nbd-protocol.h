/* nbd/nbd-protocol.h — NBD wire constants, with the names the protocol document gives them.
 *
 * Numbers from the NBD protocol specification (doc/proto.md of the NetworkBlockDevice/nbd
 * project, and its extension-ext-header branch for the extended headers). All multi-byte
 * fields on the wire are big-endian. Only nbd/ includes this header.
 */
#pragma once

#include <stdint.h>

/* clang-format off */

/* Magics */
#define NBD_MAGIC                   UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_IHAVEOPT                UINT64_C(0x49484156454F5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC               UINT64_C(0x0003e889045565a9)
#define NBD_REQUEST_MAGIC           0x25609513u
#define NBD_EXTENDED_REQUEST_MAGIC  0x21e41c71u
#define NBD_SIMPLE_REPLY_MAGIC      0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC  0x668e33efu
#define NBD_EXTENDED_REPLY_MAGIC    0x6e8a278cu

/* Handshake flags (server, 16 bit) and client flags (32 bit) */
#define NBD_FLAG_FIXED_NEWSTYLE     0x0001u
#define NBD_FLAG_NO_ZEROES          0x0002u
#define NBD_FLAG_C_FIXED_NEWSTYLE   0x00000001u
#define NBD_FLAG_C_NO_ZEROES        0x00000002u

/* Options (32 bit) */
#define NBD_OPT_EXPORT_NAME         1u
#define NBD_OPT_ABORT               2u
#define NBD_OPT_LIST                3u
#define NBD_OPT_PEEK_EXPORT         4u /* withdrawn */
#define NBD_OPT_STARTTLS            5u
#define NBD_OPT_INFO                6u
#define NBD_OPT_GO                  7u
#define NBD_OPT_STRUCTURED_REPLY    8u
#define NBD_OPT_LIST_META_CONTEXT   9u
#define NBD_OPT_SET_META_CONTEXT    10u
#define NBD_OPT_EXTENDED_HEADERS    11u

/* Option reply types (32 bit); errors have bit 31 set */
#define NBD_REP_ACK                 1u
#define NBD_REP_SERVER              2u
#define NBD_REP_INFO                3u
#define NBD_REP_META_CONTEXT        4u
#define NBD_REP_FLAG_ERROR          0x80000000u
#define NBD_REP_ERR_UNSUP           0x80000001u
#define NBD_REP_ERR_POLICY          0x80000002u
#define NBD_REP_ERR_INVALID         0x80000003u
#define NBD_REP_ERR_PLATFORM        0x80000004u
#define NBD_REP_ERR_TLS_REQD        0x80000005u
#define NBD_REP_ERR_UNKNOWN         0x80000006u
#define NBD_REP_ERR_SHUTDOWN        0x80000007u
#define NBD_REP_ERR_BLOCK_SIZE_REQD 0x80000008u
#define NBD_REP_ERR_TOO_BIG         0x80000009u
#define NBD_REP_ERR_EXT_HEADER_REQD 0x8000000au

/* Info types (16 bit, inside NBD_REP_INFO) */
#define NBD_INFO_EXPORT             0u
#define NBD_INFO_NAME               1u
#define NBD_INFO_DESCRIPTION        2u
#define NBD_INFO_BLOCK_SIZE         3u

/* Transmission flags (16 bit) */
#define NBD_FLAG_HAS_FLAGS            0x0001u
#define NBD_FLAG_READ_ONLY            0x0002u
#define NBD_FLAG_SEND_FLUSH           0x0004u
#define NBD_FLAG_SEND_FUA             0x0008u
#define NBD_FLAG_ROTATIONAL           0x0010u
#define NBD_FLAG_SEND_TRIM            0x0020u
#define NBD_FLAG_SEND_WRITE_ZEROES    0x0040u
#define NBD_FLAG_SEND_DF              0x0080u
#define NBD_FLAG_CAN_MULTI_CONN       0x0100u
#define NBD_FLAG_SEND_RESIZE          0x0200u
#define NBD_FLAG_SEND_CACHE           0x0400u
#define NBD_FLAG_SEND_FAST_ZERO       0x0800u
#define NBD_FLAG_BLOCK_STATUS_PAYLOAD 0x1000u

/* Commands (16 bit) */
#define NBD_CMD_READ                0u
#define NBD_CMD_WRITE               1u
#define NBD_CMD_DISC                2u
#define NBD_CMD_FLUSH               3u
#define NBD_CMD_TRIM                4u
#define NBD_CMD_CACHE               5u
#define NBD_CMD_WRITE_ZEROES        6u
#define NBD_CMD_BLOCK_STATUS        7u
#define NBD_CMD_RESIZE              8u

/* Command flags (16 bit) */
#define NBD_CMD_FLAG_FUA            0x0001u
#define NBD_CMD_FLAG_NO_HOLE        0x0002u
#define NBD_CMD_FLAG_DF             0x0004u
#define NBD_CMD_FLAG_REQ_ONE        0x0008u
#define NBD_CMD_FLAG_FAST_ZERO      0x0010u
#define NBD_CMD_FLAG_PAYLOAD_LEN    0x0020u

/* Reply flags and structured chunk types (16 bit) */
#define NBD_REPLY_FLAG_DONE              0x0001u
#define NBD_REPLY_TYPE_NONE              0u
#define NBD_REPLY_TYPE_OFFSET_DATA       1u
#define NBD_REPLY_TYPE_OFFSET_HOLE       2u
#define NBD_REPLY_TYPE_BLOCK_STATUS      5u
#define NBD_REPLY_TYPE_BLOCK_STATUS_EXT  6u
#define NBD_REPLY_TYPE_ERROR             0x8001u
#define NBD_REPLY_TYPE_ERROR_OFFSET      0x8002u

/* Error values (32 bit) */
#define NBD_SUCCESS                 0u
#define NBD_EPERM                   1u
#define NBD_EIO                     5u
#define NBD_ENOMEM                  12u
#define NBD_EINVAL                  22u
#define NBD_ENOSPC                  28u
#define NBD_EOVERFLOW               75u
#define NBD_ENOTSUP                 95u
#define NBD_ESHUTDOWN               108u

/* Block-status values */
#define NBD_STATE_HOLE              0x1u /* base:allocation */
#define NBD_STATE_ZERO              0x2u /* base:allocation */
#define NBD_STATE_DIRTY             0x1u /* qemu:dirty-bitmap:NAME */

/* Sizes fixed by the protocol */
#define NBD_MAX_STRING              4096u     /* names, descriptions, messages */
#define NBD_DEFAULT_MAX_PAYLOAD     (32u << 20) /* clients may always send this much */
#define NBD_EXPORT_NAME_PAD         124u      /* zeroes after an EXPORT_NAME reply */

/* Fixed wire sizes */
#define NBD_GREETING_SIZE           18u
#define NBD_OPTION_HEADER_SIZE      16u
#define NBD_OPTION_REPLY_SIZE       20u
#define NBD_REQUEST_SIZE            28u
#define NBD_SIMPLE_REPLY_SIZE       16u
#define NBD_STRUCTURED_REPLY_SIZE   20u

#define NBD_CONTEXT_BASE_ALLOCATION   "base:allocation"
#define NBD_CONTEXT_QEMU_DEPTH        "qemu:allocation-depth"
#define NBD_CONTEXT_QEMU_BITMAP       "qemu:dirty-bitmap:"
/* cbtd's own namespace (docs/bitmaps.md, "Identity"): listed, never selected. */
#define NBD_CONTEXT_CBTD_IDENTITY     "cbtd:bitmap-identity:"
/* clang-format on */
