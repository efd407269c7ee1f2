/* Multicast distribution's pure part (mcast.h says what it is). */
#include "mcast.h"
#include "le.h"

#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

_Static_assert(MC_HEADER_LEN == MC_MAC_AT + MC_MAC_LEN, "the mac ends the header");
_Static_assert(MC_DATAGRAM_LEN < 1400, "a datagram must not need IP fragmentation");
_Static_assert(MP_PAGE % MC_FRAG == 0 && MP_MAX_REQUEST % MC_FRAG == 0, "fragments tile pages");
_Static_assert(MC_MAX_FRAGS <= UINT16_MAX && MC_MAX_FRAGS % 64 == 0, "count is a u16, bits whole words");

static const char *const STATUS_NAMES[MC_STATUS_COUNT] = {
    [MC_OK] = "ok",
    [MC_E_SIZE] = "datagram truncated or padded",
    [MC_E_MAGIC] = "not an sfmpi multicast datagram",
    [MC_E_VERSION] = "unsupported multicast version",
    [MC_E_FLAGS] = "unknown multicast flags",
    [MC_E_LENGTH] = "range length 0 or over the maximum",
    [MC_E_ALIGN] = "range not aligned to the page size",
    [MC_E_RANGE] = "range outside the checkpoint's RAM",
    [MC_E_COUNT] = "fragment count does not match the range",
    [MC_E_INDEX] = "fragment index past the count",
    [MC_E_PAYLOAD] = "payload not one whole fragment",
    [MC_E_MAC] = "forged or altered datagram (bad MAC)",
};

const char *mc_status_name(uint32_t status) {
    return status < MC_STATUS_COUNT ? STATUS_NAMES[status] : "unknown status";
}


static int bit_test(const uint64_t *bits, uint32_t i) { return (bits[i / 64] >> (i % 64)) & 1; }
static void bit_set(uint64_t *bits, uint32_t i) { bits[i / 64] |= (uint64_t)1 << (i % 64); }
static void bit_clear(uint64_t *bits, uint32_t i) { bits[i / 64] &= ~((uint64_t)1 << (i % 64)); }

/* -- the MAC ---------------------------------------------------------------- */

static const char KEY_LABEL[] = "sfmpi multicast key";

int mc_derive_key(const uint8_t token[MP_TOKEN_LEN], uint8_t key[MC_KEY_LEN]) {
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), token, MP_TOKEN_LEN, (const unsigned char *)KEY_LABEL, sizeof KEY_LABEL - 1, key, &len))
        return -1;
    return len == MC_KEY_LEN ? 0 : -1;
}

int mc_key_init(struct mc_key *k, const uint8_t token[MP_TOKEN_LEN]) {
    uint8_t key[MC_KEY_LEN];
    k->ctx = NULL;
    if (mc_derive_key(token, key) < 0)
        return -1;
    /* Fetched once here, not per datagram: a fetch looks the algorithm up under a lock. */
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
    EVP_MAC_free(mac);   /* the context holds its own reference */
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    int ok = ctx && EVP_MAC_init(ctx, key, sizeof key, params) == 1;
    OPENSSL_cleanse(key, sizeof key);
    if (!ok) {
        EVP_MAC_CTX_free(ctx);
        return -1;
    }
    k->ctx = ctx;
    return 0;
}

void mc_key_free(struct mc_key *k) {
    EVP_MAC_CTX_free(k->ctx);
    k->ctx = NULL;
}

/* HMAC of dgram[0, len) but for the mac field, truncated. 0 or -1. */
static int mac_of(struct mc_key *k, const uint8_t *dgram, size_t len, uint8_t out[MC_MAC_LEN]) {
    uint8_t full[EVP_MAX_MD_SIZE];
    size_t n = 0;
    if (!k->ctx || len < MC_HEADER_LEN)
        return -1;
    /* A NULL key restarts the context with the key it was given in mc_key_init. */
    int ok = EVP_MAC_init(k->ctx, NULL, 0, NULL) == 1 && EVP_MAC_update(k->ctx, dgram, MC_MAC_AT) == 1 &&
             EVP_MAC_update(k->ctx, dgram + MC_HEADER_LEN, len - MC_HEADER_LEN) == 1 &&
             EVP_MAC_final(k->ctx, full, &n, sizeof full) == 1 && n >= MC_MAC_LEN;
    if (ok)
        memcpy(out, full, MC_MAC_LEN);
    OPENSSL_cleanse(full, sizeof full);
    return ok ? 0 : -1;
}

int mc_seal(struct mc_key *k, uint8_t *dgram, size_t len) {
    return mac_of(k, dgram, len, dgram + MC_MAC_AT);
}

/* -- datagrams --------------------------------------------------------------- */

void mc_fragment(struct mc_datagram *d, uint32_t session, uint32_t seq, uint64_t offset, uint32_t length,
                 uint16_t index) {
    memset(d, 0, sizeof *d);
    d->version = MC_VERSION;
    d->session = session;
    d->seq = seq;
    d->offset = offset;
    d->length = length;
    d->index = index;
    d->count = (uint16_t)(length / MC_FRAG);
    d->payload_len = MC_FRAG;
}

uint32_t mc_check(const struct mc_datagram *d, uint64_t ram_size) {
    if (d->version != MC_VERSION)
        return MC_E_VERSION;
    if (d->flags & ~MC_FLAGS_KNOWN)
        return MC_E_FLAGS;
    /* The same rules as a TCP request's (length, then alignment, then range). */
    struct mp_request r = {.offset = d->offset, .length = d->length};
    switch (mp_check_range(&r, ram_size)) {
    case MP_OK: break;
    case MP_E_LENGTH: return MC_E_LENGTH;
    case MP_E_ALIGN: return MC_E_ALIGN;
    default: return MC_E_RANGE;
    }
    if (d->count != d->length / MC_FRAG)
        return MC_E_COUNT;
    if (d->index >= d->count)
        return MC_E_INDEX;
    if (d->payload_len != MC_FRAG)
        return MC_E_PAYLOAD;
    return MC_OK;
}

size_t mc_encode(struct mc_key *k, const struct mc_datagram *d, const uint8_t *payload,
                 uint8_t out[MC_DATAGRAM_LEN]) {
    if (mc_check(d, UINT64_MAX) != MC_OK)
        return 0;
    put32(out, MC_MAGIC_DATA);
    put16(out + 4, d->version);
    put16(out + 6, d->flags);
    put32(out + 8, d->session);
    put32(out + 12, d->seq);
    put64(out + 16, d->offset);
    put32(out + 24, d->length);
    put16(out + 28, d->index);
    put16(out + 30, d->count);
    put16(out + 32, d->payload_len);
    memcpy(out + MC_HEADER_LEN, payload, MC_FRAG);
    return mc_seal(k, out, MC_DATAGRAM_LEN) == 0 ? MC_DATAGRAM_LEN : 0;
}

uint32_t mc_decode(struct mc_key *k, const uint8_t *dgram, size_t len, uint64_t ram_size, struct mc_datagram *d,
                   const uint8_t **payload) {
    memset(d, 0, sizeof *d);
    *payload = NULL;
    if (len < 8)
        return MC_E_SIZE;
    if (get32(dgram) != MC_MAGIC_DATA)
        return MC_E_MAGIC;
    d->version = get16(dgram + 4);
    if (d->version != MC_VERSION)
        return MC_E_VERSION;
    if (len < MC_HEADER_LEN)
        return MC_E_SIZE;
    d->flags = get16(dgram + 6);
    d->session = get32(dgram + 8);
    d->seq = get32(dgram + 12);
    d->offset = get64(dgram + 16);
    d->length = get32(dgram + 24);
    d->index = get16(dgram + 28);
    d->count = get16(dgram + 30);
    d->payload_len = get16(dgram + 32);
    if (d->payload_len != MC_FRAG)
        return MC_E_PAYLOAD;
    if (len != MC_HEADER_LEN + (size_t)d->payload_len)
        return MC_E_SIZE;
    uint32_t st = mc_check(d, ram_size);
    if (st != MC_OK)
        return st;
    uint8_t mac[MC_MAC_LEN];
    if (mac_of(k, dgram, len, mac) < 0 || CRYPTO_memcmp(mac, dgram + MC_MAC_AT, MC_MAC_LEN) != 0)
        return MC_E_MAC;
    *payload = dgram + MC_HEADER_LEN;
    return MC_OK;
}

/* -- sequence numbers ---------------------------------------------------------- */

void mc_seq_init(struct mc_seq *s) { memset(s, 0, sizeof *s); }

void mc_seq_note(struct mc_seq *s, uint32_t session, uint32_t seq) {
    if (!s->started || session != s->session) {
        s->started = 1;
        s->session = session;
        s->sessions++;
        memset(s->bits, 0, sizeof s->bits);
        s->max = seq;
        s->span = 1;
        bit_set(s->bits, seq % MC_SEQ_WINDOW);
        s->received++;
        return;
    }
    /* Serial-number arithmetic: ahead by less than 2^31 is newer, whatever the wrap. */
    uint32_t ahead = seq - s->max;
    if (ahead != 0 && ahead < 0x80000000u) {
        if (ahead >= MC_SEQ_WINDOW)
            memset(s->bits, 0, sizeof s->bits);
        else
            for (uint32_t i = 1; i <= ahead; i++)
                bit_clear(s->bits, (s->max + i) % MC_SEQ_WINDOW);
        s->lost += ahead - 1;   /* until they arrive */
        s->max = seq;
        s->span = s->span + ahead < MC_SEQ_WINDOW ? s->span + ahead : MC_SEQ_WINDOW;
        bit_set(s->bits, seq % MC_SEQ_WINDOW);
        s->received++;
        return;
    }
    uint32_t behind = s->max - seq;
    if (behind >= MC_SEQ_WINDOW) {
        s->stale++;
        return;
    }
    if (behind < s->span) {
        if (bit_test(s->bits, seq % MC_SEQ_WINDOW)) {
            s->duplicates++;
            return;
        }
        s->lost--;   /* every unseen number inside the span was counted lost */
    } else {
        /* Before the first one this session showed: the numbers between were lost too. */
        s->lost += behind - s->span;
        s->span = behind + 1;
    }
    bit_set(s->bits, seq % MC_SEQ_WINDOW);
    s->reordered++;
    s->received++;
}

/* -- the receiver's assembly ----------------------------------------------------- */

void mc_assembly_init(struct mc_assembly *a, uint8_t *cache, uint64_t ram_size) {
    memset(a, 0, sizeof *a);
    a->cache = cache;
    a->ram_size = ram_size;
    mc_seq_init(&a->seq);
}

static int recently_done(const struct mc_assembly *a, uint64_t offset, uint32_t length) {
    for (uint32_t i = 0; i < MC_DONE; i++)
        if (a->done[i].length == length && a->done[i].offset == offset)
            return 1;
    return 0;
}

static struct mc_range *slot_for(struct mc_assembly *a, const struct mc_datagram *d, uint64_t now_ns) {
    struct mc_range *free_slot = NULL, *quietest = NULL;
    for (uint32_t i = 0; i < MC_SLOTS; i++) {
        struct mc_range *s = &a->slot[i];
        if (s->length == 0) {
            if (!free_slot)
                free_slot = s;
        } else if (s->offset == d->offset && s->length == d->length) {
            return s;
        } else if (!quietest || s->last_ns < quietest->last_ns) {
            quietest = s;
        }
    }
    struct mc_range *s = free_slot;
    if (!s) {
        s = quietest;
        a->evicted++;
    }
    memset(s, 0, sizeof *s);
    s->offset = d->offset;
    s->length = d->length;
    s->count = d->count;
    s->first_ns = s->last_ns = now_ns;
    return s;
}

enum mc_accept mc_assembly_accept(struct mc_assembly *a, const struct mc_datagram *d, const uint8_t *payload,
                                  uint64_t now_ns) {
    /* Decoded against some RAM size: checked again against this one, the buffer's. */
    if (!payload || mc_check(d, a->ram_size) != MC_OK) {
        a->invalid++;
        return MC_INVALID;
    }
    mc_seq_note(&a->seq, d->session, d->seq);
    if (recently_done(a, d->offset, d->length)) {
        a->duplicates++;
        return MC_DUPLICATE;
    }
    struct mc_range *s = slot_for(a, d, now_ns);
    if (bit_test(s->bits, d->index)) {
        a->duplicates++;
        return MC_DUPLICATE;
    }
    memcpy(a->cache + d->offset + (uint64_t)d->index * MC_FRAG, payload, MC_FRAG);
    bit_set(s->bits, d->index);
    s->have++;
    s->last_ns = now_ns;
    a->fragments++;
    if (s->have < s->count)
        return MC_NEW;
    a->done[a->done_next].offset = s->offset;
    a->done[a->done_next].length = s->length;
    a->done_next = (a->done_next + 1) % MC_DONE;
    s->length = 0;
    a->completed++;
    return MC_COMPLETE;
}

static void add_run(struct mc_run *runs, uint32_t *n, uint64_t offset) {
    if (*n && runs[*n - 1].offset + runs[*n - 1].length == offset) {
        runs[*n - 1].length += MP_PAGE;
    } else if (*n < MC_RUNS_MAX) {   /* always: runs of one kind are apart by a page at least */
        runs[*n].offset = offset;
        runs[*n].length = MP_PAGE;
        (*n)++;
    }
}

int mc_assembly_expire(struct mc_assembly *a, uint64_t now_ns, uint64_t timeout_ns, const uint8_t *present,
                       struct mc_repair *out) {
    struct mc_range *due = NULL;
    for (uint32_t i = 0; i < MC_SLOTS; i++) {
        struct mc_range *s = &a->slot[i];
        /* A time before the range's last fragment is no age (a caller's clock is not trusted to be monotonic). */
        if (s->length && now_ns >= s->last_ns && now_ns - s->last_ns >= timeout_ns &&
            (!due || s->last_ns < due->last_ns))
            due = s;
    }
    if (!due)
        return 0;
    out->offset = due->offset;
    out->length = due->length;
    out->n_missing = out->n_received = 0;
    for (uint32_t p = 0; p < due->length / MP_PAGE; p++) {
        uint64_t at = due->offset + (uint64_t)p * MP_PAGE, page = at / MP_PAGE;
        int whole = 1;
        for (uint32_t f = 0; f < MC_FRAGS_PER_PAGE; f++)
            whole &= bit_test(due->bits, p * MC_FRAGS_PER_PAGE + f);
        if (whole)
            add_run(out->received, &out->n_received, at);
        /* memtap's FUSE threads set bits of `present` while this runs. */
        else if (!present || !((__atomic_load_n(&present[page >> 3], __ATOMIC_ACQUIRE) >> (page & 7)) & 1))
            add_run(out->missing, &out->n_missing, at);
    }
    due->length = 0;
    a->expired++;
    return 1;
}

/* -- lockstep suppression ------------------------------------------------------- */

void mc_recent_init(struct mc_recent *r, uint64_t window_ns) {
    memset(r, 0, sizeof *r);
    r->window_ns = window_ns;
}

int mc_recent_should_send(struct mc_recent *r, uint64_t offset, uint32_t length, uint64_t now_ns) {
    if (length == 0 || length > MP_MAX_REQUEST || offset > UINT64_MAX - length)
        return -1;
    for (uint32_t i = 0; i < MC_RECENT; i++) {
        const typeof(r->e[0]) *e = &r->e[i];
        /* now before sent_ns (a clock that went back) is not "within": sending twice is safe. */
        if (e->length && now_ns >= e->sent_ns && now_ns - e->sent_ns < r->window_ns && e->offset <= offset &&
            offset + length <= e->offset + e->length) {
            r->suppressed++;
            return 0;
        }
    }
    r->e[r->next].offset = offset;
    r->e[r->next].length = length;
    r->e[r->next].sent_ns = now_ns;
    r->next = (r->next + 1) % MC_RECENT;
    r->sent++;
    return 1;
}

/* -- pacing ------------------------------------------------------------------- */

#define NS_PER_S 1000000000u

int mc_pacer_init(struct mc_pacer *p, uint64_t floor, uint64_t ceiling, uint64_t burst, uint64_t fresh_ns,
                  uint64_t now_ns) {
    memset(p, 0, sizeof *p);
    if (floor == 0 || floor > ceiling || burst < MC_DATAGRAM_LEN || fresh_ns == 0)
        return -1;
    p->floor = floor;
    p->ceiling = ceiling;
    p->burst = burst;
    p->fresh_ns = fresh_ns;
    p->tokens = burst;
    p->last_ns = now_ns;
    return 0;
}

void mc_pacer_report(struct mc_pacer *p, uint32_t id, uint64_t bytes_per_s, uint64_t now_ns) {
    int slot = -1, free_slot = -1, oldest = -1;
    for (int i = 0; i < MC_REPORTERS && slot < 0; i++) {
        if (!p->report[i].used) {
            if (free_slot < 0)
                free_slot = i;
        } else if (p->report[i].id == id) {
            slot = i;
        } else if (oldest < 0 || p->report[i].at_ns < p->report[oldest].at_ns) {
            oldest = i;
        }
    }
    if (slot < 0)
        slot = free_slot >= 0 ? free_slot : oldest;
    p->report[slot].id = id;
    p->report[slot].used = 1;
    p->report[slot].rate = bytes_per_s;
    p->report[slot].at_ns = now_ns;
}

uint64_t mc_pacer_rate(const struct mc_pacer *p, uint64_t now_ns) {
    uint64_t lowest = 0;
    int any = 0;
    for (int i = 0; i < MC_REPORTERS; i++) {
        const typeof(p->report[0]) *r = &p->report[i];
        /* A report stamped after now (a clock that went back) counts as just made. */
        if (!r->used || (now_ns > r->at_ns && now_ns - r->at_ns >= p->fresh_ns))
            continue;
        if (!any || r->rate < lowest)
            lowest = r->rate;
        any = 1;
    }
    if (!any)
        return p->ceiling;   /* nobody said it cannot take more */
    return lowest < p->floor ? p->floor : lowest > p->ceiling ? p->ceiling : lowest;
}

/* The bucket as of now_ns, at the rate of now_ns; p itself unchanged. */
static void bucket_at(const struct mc_pacer *p, uint64_t now_ns, uint64_t *tokens, uint64_t *frac) {
    *tokens = p->tokens;
    *frac = p->frac;
    if (now_ns <= p->last_ns || *tokens >= p->burst)
        return;
    unsigned __int128 total = (unsigned __int128)mc_pacer_rate(p, now_ns) * (now_ns - p->last_ns) + p->frac;
    unsigned __int128 add = total / NS_PER_S;
    if (add >= p->burst - *tokens) {
        *tokens = p->burst;
        *frac = 0;
    } else {
        *tokens += (uint64_t)add;
        *frac = (uint64_t)(total % NS_PER_S);
    }
}

int mc_pacer_allow(struct mc_pacer *p, uint64_t bytes, uint64_t now_ns) {
    if (bytes > p->burst) {
        p->denied++;
        return 0;
    }
    bucket_at(p, now_ns, &p->tokens, &p->frac);
    if (now_ns > p->last_ns)
        p->last_ns = now_ns;
    if (p->tokens < bytes) {
        p->denied++;
        return 0;
    }
    p->tokens -= bytes;
    p->allowed_bytes += bytes;
    return 1;
}

uint64_t mc_pacer_wait_ns(const struct mc_pacer *p, uint64_t bytes, uint64_t now_ns) {
    if (bytes > p->burst)
        return UINT64_MAX;
    uint64_t tokens, frac;
    bucket_at(p, now_ns, &tokens, &frac);
    if (tokens >= bytes)
        return 0;
    unsigned __int128 need = (unsigned __int128)(bytes - tokens) * NS_PER_S - frac;
    uint64_t rate = mc_pacer_rate(p, now_ns);
    unsigned __int128 ns = (need + rate - 1) / rate;
    if (now_ns < p->last_ns)
        ns += p->last_ns - now_ns;   /* the bucket fills from last_ns on */
    return ns >= UINT64_MAX ? UINT64_MAX - 1 : (uint64_t)ns;
}
