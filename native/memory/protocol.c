/* The memory protocol's records (protocol.h says what they are). */
#include "protocol.h"
#include "le.h"

#include <string.h>

static const char *const STATUS_NAMES[MP_STATUS_COUNT] = {
    [MP_OK] = "ok",
    [MP_E_MAGIC] = "not the sfmpi memory protocol",
    [MP_E_VERSION] = "unsupported protocol version",
    [MP_E_NO_CHECKPOINT] = "no such checkpoint on this server",
    [MP_E_TOKEN] = "wrong token for this checkpoint",
    [MP_E_RANGE] = "range outside the checkpoint's RAM",
    [MP_E_ALIGN] = "range not aligned to the page size",
    [MP_E_LENGTH] = "request length 0 or over the maximum",
    [MP_E_IO] = "the server could not read the checkpoint",
    [MP_E_BUSY] = "the server has too many connections",
    [MP_E_FLAGS] = "unknown request flags",
    [MP_MULTICAST] = "sent to the multicast group",
};

const char *mp_status_name(uint32_t status) {
    return status < MP_STATUS_COUNT ? STATUS_NAMES[status] : "unknown status";
}


int mp_id_valid(const char *id, size_t len) {
    if (len < 1 || len > MP_ID_MAX || id[0] == '.')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

size_t mp_encode_hello(uint8_t *out, const uint8_t token[MP_TOKEN_LEN], const char *id) {
    size_t len = strlen(id);
    put32(out, MP_MAGIC_HELLO);
    put16(out + 4, MP_VERSION);
    put16(out + 6, (uint16_t)len);
    memcpy(out + 8, token, MP_TOKEN_LEN);
    memcpy(out + MP_HELLO_FIXED, id, len);
    return MP_HELLO_FIXED + len;
}

size_t mp_encode_welcome(uint8_t out[MP_WELCOME_LEN], const struct mp_welcome *w) {
    put32(out, MP_MAGIC_WELCOME);
    put32(out + 4, w->status);
    put64(out + 8, w->size);
    put32(out + 16, w->page_size);
    put32(out + 20, w->max_request);
    return MP_WELCOME_LEN;
}

size_t mp_encode_request(uint8_t out[MP_REQUEST_LEN], const struct mp_request *r) {
    put32(out, MP_MAGIC_REQUEST);
    put32(out + 4, r->req_id);
    put64(out + 8, r->offset);
    put32(out + 16, r->length);
    put32(out + 20, r->flags);
    return MP_REQUEST_LEN;
}

size_t mp_encode_reply(uint8_t out[MP_REPLY_LEN], const struct mp_reply *r) {
    put32(out, MP_MAGIC_REPLY);
    put32(out + 4, r->req_id);
    put32(out + 8, r->status);
    put32(out + 12, r->length);
    return MP_REPLY_LEN;
}

uint32_t mp_decode_hello_head(const uint8_t in[MP_HELLO_FIXED], struct mp_hello *h) {
    memset(h, 0, sizeof *h);
    if (get32(in) != MP_MAGIC_HELLO)
        return MP_E_MAGIC;
    h->version = get16(in + 4);
    h->id_len = get16(in + 6);
    memcpy(h->token, in + 8, MP_TOKEN_LEN);
    if (h->version != MP_VERSION)
        return MP_E_VERSION;
    if (h->id_len < 1 || h->id_len > MP_ID_MAX)
        return MP_E_NO_CHECKPOINT;
    return MP_OK;
}

uint32_t mp_decode_hello_id(const uint8_t *id, struct mp_hello *h) {
    if (!mp_id_valid((const char *)id, h->id_len))
        return MP_E_NO_CHECKPOINT;
    memcpy(h->id, id, h->id_len);
    h->id[h->id_len] = '\0';
    return MP_OK;
}

uint32_t mp_decode_welcome(const uint8_t in[MP_WELCOME_LEN], struct mp_welcome *w) {
    if (get32(in) != MP_MAGIC_WELCOME)
        return MP_E_MAGIC;
    w->status = get32(in + 4);
    w->size = get64(in + 8);
    w->page_size = get32(in + 16);
    w->max_request = get32(in + 20);
    return MP_OK;
}

uint32_t mp_decode_request(const uint8_t in[MP_REQUEST_LEN], struct mp_request *r) {
    if (get32(in) != MP_MAGIC_REQUEST)
        return MP_E_MAGIC;
    r->req_id = get32(in + 4);
    r->offset = get64(in + 8);
    r->length = get32(in + 16);
    r->flags = get32(in + 20);
    return r->flags & ~MP_FLAGS_KNOWN ? MP_E_FLAGS : MP_OK;
}

uint32_t mp_decode_reply(const uint8_t in[MP_REPLY_LEN], struct mp_reply *r) {
    if (get32(in) != MP_MAGIC_REPLY)
        return MP_E_MAGIC;
    r->req_id = get32(in + 4);
    r->status = get32(in + 8);
    r->length = get32(in + 12);
    return MP_OK;
}

uint32_t mp_check_range(const struct mp_request *r, uint64_t size) {
    if (r->length == 0 || r->length > MP_MAX_REQUEST)
        return MP_E_LENGTH;
    if (r->offset % MP_PAGE || r->length % MP_PAGE)
        return MP_E_ALIGN;
    /* Written so that offset + length cannot overflow. */
    if (r->offset > size || r->length > size - r->offset)
        return MP_E_RANGE;
    return MP_OK;
}

uint32_t mp_check_request(const struct mp_request *r, uint64_t size) {
    if (r->flags & MP_FLAG_REPORT)
        return r->flags == MP_FLAG_REPORT && r->length == 0 ? MP_OK : MP_E_FLAGS;
    return mp_check_range(r, size);
}

int mp_token_equal(const uint8_t a[MP_TOKEN_LEN], const uint8_t b[MP_TOKEN_LEN]) {
    uint8_t diff = 0;
    for (int i = 0; i < MP_TOKEN_LEN; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int mp_token_from_hex(const char *hex, uint8_t out[MP_TOKEN_LEN]) {
    if (strlen(hex) != 2 * MP_TOKEN_LEN)
        return -1;
    for (int i = 0; i < MP_TOKEN_LEN; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}
