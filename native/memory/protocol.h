/* The memory protocol: a clone host's memtap asks a memory server for ranges
 * of one checkpoint's RAM over TCP.
 *
 * One connection serves one checkpoint. The client opens with a hello (the
 * checkpoint's id and the token handed out with its descriptor); the server
 * answers with the RAM size or an error and, after an error, closes. Then
 * requests and replies, in order, any number. All integers little-endian.
 *
 *   hello    u32 magic 'SFMH' | u16 version | u16 id_len | u8 token[32] | id[id_len]
 *   welcome  u32 magic 'SFMW' | u32 status  | u64 size   | u32 page_size | u32 max_request
 *   request  u32 magic 'SFMQ' | u32 req_id  | u64 offset | u32 length    | u32 flags
 *   reply    u32 magic 'SFMA' | u32 req_id  | u32 status | u32 length    | length bytes
 *
 * A request's offset and length are multiples of the page size, length is
 * 1..max_request, and the range lies inside the RAM. A reply's length is the
 * request's when status is 0, else 0. A malformed request (bad magic, flags)
 * ends the connection; a well-formed one the server cannot serve (range,
 * alignment) is answered with an error and the connection stays.
 *
 * A request's flags (mcast.h has the multicast side):
 *   MP_FLAG_MULTICAST   answer by the checkpoint's multicast group, if it has
 *                       one: the reply is then MP_MULTICAST with no bytes, and
 *                       every host's memtap receives the range; pages sent to
 *                       the group within the lockstep window are not sent again.
 *   MP_FLAG_BACKGROUND  a push or prefetch, not a fault: not recorded in the
 *                       checkpoint's working set.
 *   MP_FLAG_REPAIR      pages a multicast did not bring: counted as repairs.
 *   MP_FLAG_REPORT      alone, length 0: a rate report, offset = the bytes/s
 *                       this receiver can take (the server paces its
 *                       multicast to the lowest fresh report). Answered MP_OK.
 *
 * Pure code: encoding, decoding and validation, no I/O (unit-tested).
 */
#ifndef SFMPI_MEMORY_PROTOCOL_H
#define SFMPI_MEMORY_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#define MP_VERSION 1
#define MP_MAGIC_HELLO 0x484d4653u   /* "SFMH" as bytes on the wire */
#define MP_MAGIC_WELCOME 0x574d4653u /* "SFMW" */
#define MP_MAGIC_REQUEST 0x514d4653u /* "SFMQ" */
#define MP_MAGIC_REPLY 0x414d4653u   /* "SFMA" */

#define MP_PAGE 4096u
#define MP_MAX_REQUEST (1u << 20)    /* the kernel's largest FUSE read, 256 pages */
#define MP_TOKEN_LEN 32

#define MP_FLAG_MULTICAST 0x1u
#define MP_FLAG_BACKGROUND 0x2u
#define MP_FLAG_REPAIR 0x4u
#define MP_FLAG_REPORT 0x8u
#define MP_FLAGS_KNOWN 0xfu
#define MP_ID_MAX 64

#define MP_HELLO_FIXED 40            /* magic, version, id_len, token */
#define MP_WELCOME_LEN 24
#define MP_REQUEST_LEN 24
#define MP_REPLY_LEN 16

enum mp_status {
    MP_OK = 0,
    MP_E_MAGIC = 1,          /* not this protocol */
    MP_E_VERSION = 2,
    MP_E_NO_CHECKPOINT = 3,  /* unknown id, or an id that is not well-formed */
    MP_E_TOKEN = 4,
    MP_E_RANGE = 5,          /* outside the RAM */
    MP_E_ALIGN = 6,          /* offset or length not a multiple of the page */
    MP_E_LENGTH = 7,         /* 0 or more than max_request */
    MP_E_IO = 8,             /* the server could not read its file */
    MP_E_BUSY = 9,           /* too many connections */
    MP_E_FLAGS = 10,
    MP_MULTICAST = 11,       /* not an error: the range went to the multicast group */
    MP_STATUS_COUNT
};

const char *mp_status_name(uint32_t status);

struct mp_hello {
    uint16_t version;
    uint16_t id_len;
    uint8_t token[MP_TOKEN_LEN];
    char id[MP_ID_MAX + 1];
};

struct mp_welcome {
    uint32_t status;
    uint64_t size;
    uint32_t page_size;
    uint32_t max_request;
};

struct mp_request {
    uint32_t req_id;
    uint64_t offset;
    uint32_t length;
    uint32_t flags;
};

struct mp_reply {
    uint32_t req_id;
    uint32_t status;
    uint32_t length;
};

/* A checkpoint id: 1..MP_ID_MAX of [A-Za-z0-9._-], not starting with '.'. */
int mp_id_valid(const char *id, size_t len);

/* Encoders write exactly the record's length; return it (hello: fixed + id). */
size_t mp_encode_hello(uint8_t *out, const uint8_t token[MP_TOKEN_LEN], const char *id);
size_t mp_encode_welcome(uint8_t out[MP_WELCOME_LEN], const struct mp_welcome *w);
size_t mp_encode_request(uint8_t out[MP_REQUEST_LEN], const struct mp_request *r);
size_t mp_encode_reply(uint8_t out[MP_REPLY_LEN], const struct mp_reply *r);

/* Decoders: MP_OK or the status that says what is wrong. A hello is decoded
 * from its fixed part first (mp_decode_hello_head gives id_len), then its id. */
uint32_t mp_decode_hello_head(const uint8_t in[MP_HELLO_FIXED], struct mp_hello *h);
uint32_t mp_decode_hello_id(const uint8_t *id, struct mp_hello *h);
uint32_t mp_decode_welcome(const uint8_t in[MP_WELCOME_LEN], struct mp_welcome *w);
uint32_t mp_decode_request(const uint8_t in[MP_REQUEST_LEN], struct mp_request *r);
uint32_t mp_decode_reply(const uint8_t in[MP_REPLY_LEN], struct mp_reply *r);

/* May a server with RAM of `size` bytes serve `r`? MP_OK or why not. */
uint32_t mp_check_range(const struct mp_request *r, uint64_t size);
/* mp_check_range for a range, and a report's shape (MP_FLAG_REPORT alone, length 0). */
uint32_t mp_check_request(const struct mp_request *r, uint64_t size);

/* Constant-time comparison of two tokens: 1 when equal. */
int mp_token_equal(const uint8_t a[MP_TOKEN_LEN], const uint8_t b[MP_TOKEN_LEN]);

/* 64 hex digits to 32 bytes: 0, or -1 if not exactly that. */
int mp_token_from_hex(const char *hex, uint8_t out[MP_TOKEN_LEN]);

#endif
