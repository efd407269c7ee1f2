/* Unit tests of multicast distribution's pure part (native/memory/mcast.h):
 * the datagram and its MAC, the receiver's assembly and repair lists, the
 * sequence-gap counter, the server's lockstep suppression and the pacer, and
 * a randomized run (ranges split, shuffled, some fragments dropped, some
 * duplicated). No sockets, no clock: every time is made up. Built with
 * AddressSanitizer and UBSan (make mcast-test); run by
 * tests/unit/test_native_memory.py.
 *
 * No framework: CHECK counts checks and failures and says where one failed.
 * Exit 0 when every check passed, else 1.
 */
#include "counters.h"   /* memtap will include both: their names must not collide */
#include "mcast.h"
#include "protocol.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long checks, failures;

#define CHECK(expr)                                                                 \
    do {                                                                            \
        checks++;                                                                   \
        if (!(expr)) {                                                              \
            failures++;                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr); \
        }                                                                           \
    } while (0)

#define RAM_PAGES 2048u                       /* 8 MiB */
#define RAM_SIZE ((uint64_t)RAM_PAGES * MP_PAGE)
#define MAX_PAGES (MP_MAX_REQUEST / MP_PAGE)  /* 256 */
#define TOKEN_HEX "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
#define OTHER_TOKEN_HEX "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543211"
/* Known answers, from Python's hmac module: HMAC-SHA256(token, "sfmpi multicast key"), and the
 * truncated MAC of the datagram test_known_answer builds. */
#define KEY_HEX "01c26de5f72544cb0a4a0162ea106b80c1f140759c6b8ece211ccfedf01b5c64"
#define MAC_HEX "ed1de855c9698c83bbf00dfefbfdeaab"

static uint8_t token[MP_TOKEN_LEN], other_token[MP_TOKEN_LEN];
static uint8_t *src;                          /* the "checkpoint's RAM" the server sends */
static struct mc_key key, other_key;

/* -- small helpers ------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    return *s = x;
}

static void from_hex(const char *hex, uint8_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

/* Fragment `index` of [offset, offset + length) of src, sealed: its length (MC_DATAGRAM_LEN) or 0. */
static size_t make(uint8_t *out, struct mc_key *k, uint32_t session, uint32_t seq, uint64_t offset, uint32_t length,
                   uint16_t index) {
    struct mc_datagram d;
    mc_fragment(&d, session, seq, offset, length, index);
    return mc_encode(k, &d, src + offset + (uint64_t)index * MC_FRAG, out);
}

static uint32_t decode(const uint8_t *buf, size_t len) {
    struct mc_datagram d;
    const uint8_t *payload;
    return mc_decode(&key, buf, len, RAM_SIZE, &d, &payload);
}

/* Feed fragment `index` of a range of src to an assembly, as a receiver would: decoded, then accepted. */
static int feed(struct mc_assembly *a, uint32_t session, uint32_t seq, uint64_t offset, uint32_t length,
                uint16_t index, uint64_t now) {
    uint8_t buf[MC_DATAGRAM_LEN];
    struct mc_datagram d;
    const uint8_t *payload;
    if (make(buf, &key, session, seq, offset, length, index) != MC_DATAGRAM_LEN ||
        mc_decode(&key, buf, sizeof buf, RAM_SIZE, &d, &payload) != MC_OK)
        return -1;
    return (int)mc_assembly_accept(a, &d, payload, now);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

static int page_bit(const uint8_t *bits, uint64_t page) { return (bits[page >> 3] >> (page & 7)) & 1; }
static void page_set(uint8_t *bits, uint64_t page) { bits[page >> 3] |= (uint8_t)(1u << (page & 7)); }

/* -- the format and the MAC -------------------------------------------------- */

static void test_status_names(void) {
    for (uint32_t s = 0; s < MC_STATUS_COUNT; s++)
        CHECK(mc_status_name(s) && mc_status_name(s)[0] && strcmp(mc_status_name(s), "unknown status") != 0);
    CHECK(strcmp(mc_status_name(MC_STATUS_COUNT), "unknown status") == 0);
    CHECK(strcmp(mc_status_name(MC_E_MAC), mc_status_name(MC_E_SIZE)) != 0);
    CHECK(MC_DATAGRAM_LEN == 1074 && MC_DATAGRAM_LEN < 1400);
    CHECK(MC_FRAGS_PER_PAGE == 4 && MC_MAX_FRAGS == 1024);
}

static void test_known_answer(void) {
    uint8_t k[MC_KEY_LEN], want[MC_KEY_LEN];
    from_hex(KEY_HEX, want, sizeof want);
    CHECK(mc_derive_key(token, k) == 0 && memcmp(k, want, sizeof k) == 0);
    CHECK(memcmp(k, token, sizeof k) != 0);   /* the token itself keys nothing */

    /* A datagram built by hand, byte by byte: the encoder must produce exactly it. */
    uint8_t payload[MC_FRAG], hand[MC_DATAGRAM_LEN], enc[MC_DATAGRAM_LEN], mac[MC_MAC_LEN];
    for (int i = 0; i < (int)MC_FRAG; i++)
        payload[i] = (uint8_t)(i * 7);
    memset(hand, 0, sizeof hand);
    memcpy(hand, "SFMD", 4);
    put16(hand + 4, 1);
    put16(hand + 6, 0);
    put32(hand + 8, 0x11223344u);
    put32(hand + 12, 7);
    put64(hand + 16, 8192);
    put32(hand + 24, 4096);
    put16(hand + 28, 2);
    put16(hand + 30, 4);
    put16(hand + 32, 1024);
    from_hex(MAC_HEX, hand + MC_MAC_AT, MC_MAC_LEN);
    memcpy(hand + MC_HEADER_LEN, payload, MC_FRAG);
    struct mc_datagram d;
    mc_fragment(&d, 0x11223344u, 7, 8192, 4096, 2);
    CHECK(d.version == MC_VERSION && d.flags == 0 && d.count == 4 && d.payload_len == MC_FRAG);
    CHECK(mc_encode(&key, &d, payload, enc) == MC_DATAGRAM_LEN);
    CHECK(memcmp(enc, hand, MC_HEADER_LEN) == 0);
    CHECK(memcmp(enc, hand, sizeof enc) == 0);

    /* The same MAC by OpenSSL's one-shot HMAC over header (without mac) + payload. */
    uint8_t cat[MC_MAC_AT + MC_FRAG], full[32];
    unsigned int n = 0;
    memcpy(cat, hand, MC_MAC_AT);
    memcpy(cat + MC_MAC_AT, payload, MC_FRAG);
    CHECK(HMAC(EVP_sha256(), want, sizeof want, cat, sizeof cat, full, &n) && n == 32);
    CHECK(memcmp(full, hand + MC_MAC_AT, MC_MAC_LEN) == 0);

    /* Sealing again gives the same MAC (the context restarts cleanly each time). */
    memcpy(mac, enc + MC_MAC_AT, MC_MAC_LEN);
    for (int i = 0; i < 3; i++)
        CHECK(mc_seal(&key, enc, sizeof enc) == 0 && memcmp(enc + MC_MAC_AT, mac, MC_MAC_LEN) == 0);
    CHECK(mc_seal(&key, enc, MC_HEADER_LEN - 1) == -1);

    struct mc_datagram got;
    const uint8_t *pl;
    CHECK(mc_decode(&key, hand, sizeof hand, RAM_SIZE, &got, &pl) == MC_OK);
    CHECK(pl == hand + MC_HEADER_LEN);
    CHECK(got.session == 0x11223344u && got.seq == 7 && got.offset == 8192 && got.length == 4096 &&
          got.index == 2 && got.count == 4 && got.payload_len == MC_FRAG && got.flags == 0);

    /* A key made straight from the token (no derivation) does not verify. */
    uint8_t raw[MC_DATAGRAM_LEN];
    memcpy(raw, hand, sizeof raw);
    HMAC(EVP_sha256(), token, MP_TOKEN_LEN, cat, sizeof cat, full, &n);
    memcpy(raw + MC_MAC_AT, full, MC_MAC_LEN);
    CHECK(mc_decode(&key, raw, sizeof raw, RAM_SIZE, &got, &pl) == MC_E_MAC && pl == NULL);

    /* A freed key (or one never made) seals and verifies nothing. */
    struct mc_key none = {NULL};
    CHECK(mc_encode(&none, &d, payload, enc) == 0);
    CHECK(mc_decode(&none, hand, sizeof hand, RAM_SIZE, &got, &pl) == MC_E_MAC);
    mc_key_free(&none);
}

static void test_round_trips(void) {
    uint64_t seed = 0x1234;
    int bad = 0;
    for (int i = 0; i < 500; i++) {
        uint32_t pages = 1 + (uint32_t)(rng_next(&seed) % MAX_PAGES);
        uint64_t offset = (rng_next(&seed) % (RAM_PAGES - pages + 1)) * MP_PAGE;
        uint32_t length = pages * MP_PAGE;
        uint16_t index = (uint16_t)(rng_next(&seed) % (length / MC_FRAG));
        uint32_t session = (uint32_t)rng_next(&seed), seq = (uint32_t)rng_next(&seed);
        uint8_t buf[MC_DATAGRAM_LEN];
        struct mc_datagram d;
        const uint8_t *payload;
        if (make(buf, &key, session, seq, offset, length, index) != MC_DATAGRAM_LEN ||
            mc_decode(&key, buf, sizeof buf, RAM_SIZE, &d, &payload) != MC_OK || d.session != session ||
            d.seq != seq || d.offset != offset || d.length != length || d.index != index ||
            d.count != length / MC_FRAG || memcmp(payload, src + offset + (uint64_t)index * MC_FRAG, MC_FRAG))
            bad++;
    }
    CHECK(bad == 0);

    /* The edges: the first and last fragment of the largest range at the RAM's end, a one-page range. */
    uint8_t buf[MC_DATAGRAM_LEN];
    uint64_t end = RAM_SIZE - MP_MAX_REQUEST;
    CHECK(make(buf, &key, 1, 0, end, MP_MAX_REQUEST, 0) == MC_DATAGRAM_LEN && decode(buf, sizeof buf) == MC_OK);
    CHECK(make(buf, &key, 1, UINT32_MAX, end, MP_MAX_REQUEST, MC_MAX_FRAGS - 1) == MC_DATAGRAM_LEN &&
          decode(buf, sizeof buf) == MC_OK);
    CHECK(make(buf, &key, 1, 0, RAM_SIZE - MP_PAGE, MP_PAGE, 3) == MC_DATAGRAM_LEN &&
          decode(buf, sizeof buf) == MC_OK);
    /* The repair flag is known. */
    struct mc_datagram d;
    mc_fragment(&d, 1, 2, 0, MP_PAGE, 0);
    d.flags = MC_FLAG_REPAIR;
    CHECK(mc_encode(&key, &d, src, buf) == MC_DATAGRAM_LEN && decode(buf, sizeof buf) == MC_OK);
    struct mc_datagram got;
    const uint8_t *pl;
    CHECK(mc_decode(&key, buf, sizeof buf, RAM_SIZE, &got, &pl) == MC_OK && got.flags == MC_FLAG_REPAIR);
}

/* A valid datagram with a field changed (and sealed again when `reseal`): what decode says. */
static uint32_t altered(size_t at, int width, uint64_t value, int reseal) {
    uint8_t buf[MC_DATAGRAM_LEN];
    make(buf, &key, 5, 6, 16 * MP_PAGE, 4 * MP_PAGE, 3);
    if (width == 2) put16(buf + at, (uint16_t)value);
    if (width == 4) put32(buf + at, (uint32_t)value);
    if (width == 8) put64(buf + at, value);
    if (reseal)
        mc_seal(&key, buf, sizeof buf);
    return decode(buf, sizeof buf);
}

static void test_rejections(void) {
    uint8_t buf[MC_DATAGRAM_LEN + 64];
    CHECK(make(buf, &key, 5, 6, 16 * MP_PAGE, 4 * MP_PAGE, 3) == MC_DATAGRAM_LEN);
    memset(buf + MC_DATAGRAM_LEN, 0, 64);
    CHECK(decode(buf, MC_DATAGRAM_LEN) == MC_OK);

    /* Truncated, at every length, and padded. */
    int bad = 0;
    for (size_t len = 0; len < MC_DATAGRAM_LEN; len++) {
        uint32_t st = decode(buf, len);
        if (st != MC_E_SIZE)
            bad++;
    }
    CHECK(bad == 0);
    CHECK(decode(buf, 0) == MC_E_SIZE && decode(buf, 7) == MC_E_SIZE && decode(buf, MC_HEADER_LEN) == MC_E_SIZE);
    CHECK(decode(buf, MC_DATAGRAM_LEN + 1) == MC_E_SIZE);
    CHECK(decode(buf, MC_DATAGRAM_LEN + 64) == MC_E_SIZE);

    /* Each field wrong, sealed again (the check, not the MAC, refuses) and not. */
    for (int reseal = 0; reseal < 2; reseal++) {
        CHECK(altered(0, 4, 0x514d4653u, reseal) == MC_E_MAGIC);   /* a TCP request's magic */
        CHECK(altered(0, 4, 0, reseal) == MC_E_MAGIC);
        CHECK(altered(4, 2, 2, reseal) == MC_E_VERSION);
        CHECK(altered(4, 2, 0, reseal) == MC_E_VERSION);
        CHECK(altered(6, 2, 2, reseal) == MC_E_FLAGS);
        CHECK(altered(6, 2, 0x8000, reseal) == MC_E_FLAGS);
        CHECK(altered(16, 8, 16 * MP_PAGE + 1024, reseal) == MC_E_ALIGN);    /* misaligned offset */
        CHECK(altered(16, 8, 16 * MP_PAGE + 1, reseal) == MC_E_ALIGN);
        CHECK(altered(16, 8, RAM_SIZE - 2 * MP_PAGE, reseal) == MC_E_RANGE); /* runs past the end */
        CHECK(altered(16, 8, RAM_SIZE, reseal) == MC_E_RANGE);
        CHECK(altered(16, 8, UINT64_MAX - MP_PAGE + 1, reseal) == MC_E_RANGE);   /* offset + length wraps */
        CHECK(altered(24, 4, 0, reseal) == MC_E_LENGTH);
        CHECK(altered(24, 4, MP_MAX_REQUEST + MP_PAGE, reseal) == MC_E_LENGTH);
        CHECK(altered(24, 4, 4 * MP_PAGE + 1024, reseal) == MC_E_ALIGN);      /* misaligned length */
        CHECK(altered(30, 2, 15, reseal) == MC_E_COUNT);
        CHECK(altered(30, 2, 17, reseal) == MC_E_COUNT);
        CHECK(altered(30, 2, 0, reseal) == MC_E_COUNT);
        CHECK(altered(28, 2, 16, reseal) == MC_E_INDEX);
        CHECK(altered(28, 2, 0xffff, reseal) == MC_E_INDEX);
        CHECK(altered(32, 2, 512, reseal) == MC_E_PAYLOAD);
        CHECK(altered(32, 2, 0, reseal) == MC_E_PAYLOAD);
    }
    CHECK(altered(24, 4, 8 * MP_PAGE, 1) == MC_E_COUNT);   /* a longer range, count still 16 */
    /* Fields the checks do not judge: only the MAC finds them changed. */
    CHECK(altered(8, 4, 6, 0) == MC_E_MAC && altered(8, 4, 6, 1) == MC_OK);
    CHECK(altered(12, 4, 7, 0) == MC_E_MAC && altered(12, 4, 7, 1) == MC_OK);
    CHECK(altered(28, 2, 4, 0) == MC_E_MAC && altered(28, 2, 4, 1) == MC_OK);
    CHECK(altered(16, 8, 0, 0) == MC_E_MAC && altered(16, 8, 0, 1) == MC_OK);

    /* A shorter payload declared and sent: one whole fragment or nothing. */
    uint8_t small[MC_HEADER_LEN + 512];
    memcpy(small, buf, sizeof small);
    put16(small + 32, 512);
    mc_seal(&key, small, sizeof small);
    CHECK(decode(small, sizeof small) == MC_E_PAYLOAD);

    /* Inside the caller's RAM only: a smaller RAM refuses what a larger accepts. */
    struct mc_datagram d;
    const uint8_t *pl = src;
    CHECK(mc_decode(&key, buf, MC_DATAGRAM_LEN, 20 * MP_PAGE, &d, &pl) == MC_OK);
    CHECK(mc_decode(&key, buf, MC_DATAGRAM_LEN, 20 * MP_PAGE - 1, &d, &pl) == MC_E_RANGE && pl == NULL);
    CHECK(mc_decode(&key, buf, MC_DATAGRAM_LEN, 0, &d, &pl) == MC_E_RANGE);

    /* The encoder refuses to seal what a receiver would refuse. */
    uint8_t out[MC_DATAGRAM_LEN];
    struct mc_datagram e;
    mc_fragment(&e, 1, 1, 1024, MP_PAGE, 0);
    CHECK(mc_encode(&key, &e, src, out) == 0);
    mc_fragment(&e, 1, 1, 0, 0, 0);
    CHECK(mc_encode(&key, &e, src, out) == 0);
    mc_fragment(&e, 1, 1, 0, MP_PAGE, 4);
    CHECK(mc_encode(&key, &e, src, out) == 0);
    mc_fragment(&e, 1, 1, 0, MP_MAX_REQUEST + MP_PAGE, 0);
    CHECK(mc_encode(&key, &e, src, out) == 0);
    mc_fragment(&e, 1, 1, 0, MP_PAGE, 0);
    e.flags = 4;
    CHECK(mc_encode(&key, &e, src, out) == 0);
    mc_fragment(&e, 1, 1, 0, MP_PAGE, 0);
    e.count = 5;
    CHECK(mc_encode(&key, &e, src, out) == 0);
    e.count = 4;
    e.version = 2;
    CHECK(mc_encode(&key, &e, src, out) == 0);
    CHECK(mc_check(&e, RAM_SIZE) == MC_E_VERSION);
}

static void test_forgeries(void) {
    uint8_t buf[MC_DATAGRAM_LEN], forged[MC_DATAGRAM_LEN];
    CHECK(make(buf, &key, 9, 10, 64 * MP_PAGE, 8 * MP_PAGE, 17) == MC_DATAGRAM_LEN);
    CHECK(make(forged, &other_key, 9, 10, 64 * MP_PAGE, 8 * MP_PAGE, 17) == MC_DATAGRAM_LEN);
    CHECK(decode(forged, sizeof forged) == MC_E_MAC);   /* another checkpoint's key */
    CHECK(memcmp(buf, forged, MC_MAC_AT) == 0 && memcmp(buf + MC_MAC_AT, forged + MC_MAC_AT, MC_MAC_LEN) != 0);
    /* The right header and MAC with other bytes: the attack the MAC is for. */
    memcpy(forged, buf, sizeof forged);
    memset(forged + MC_HEADER_LEN, 0x90, MC_FRAG);
    CHECK(decode(forged, sizeof forged) == MC_E_MAC);
    memset(forged + MC_MAC_AT, 0, MC_MAC_LEN);
    CHECK(decode(forged, sizeof forged) == MC_E_MAC);

    /* Every single bit flipped, anywhere: never accepted; in the fields the
     * checks do not judge (session, seq, index within count, the mac, the
     * payload) it is the MAC that refuses. */
    int accepted = 0, payload_not_mac = 0, mac_not_mac = 0, seq_not_mac = 0;
    for (size_t bit = 0; bit < 8 * sizeof buf; bit++) {
        memcpy(forged, buf, sizeof forged);
        forged[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        uint32_t st = decode(forged, sizeof forged);
        size_t byte = bit / 8;
        accepted += st == MC_OK;
        if (byte >= MC_HEADER_LEN)
            payload_not_mac += st != MC_E_MAC;
        else if (byte >= MC_MAC_AT)
            mac_not_mac += st != MC_E_MAC;
        else if (byte >= 8 && byte < 16)
            seq_not_mac += st != MC_E_MAC;
    }
    CHECK(accepted == 0);
    CHECK(payload_not_mac == 0);
    CHECK(mac_not_mac == 0);
    CHECK(seq_not_mac == 0);
    /* The original still passes (nothing above changed it). */
    CHECK(decode(buf, sizeof buf) == MC_OK);

    /* An assembly never sees a forged fragment: it is refused before. */
    struct mc_assembly *a = malloc(sizeof *a);
    uint8_t *cache = calloc(1, RAM_SIZE);
    mc_assembly_init(a, cache, RAM_SIZE);
    struct mc_datagram d;
    const uint8_t *pl;
    memcpy(forged, buf, sizeof forged);
    forged[MC_HEADER_LEN + 100] ^= 1;
    CHECK(mc_decode(&key, forged, sizeof forged, RAM_SIZE, &d, &pl) == MC_E_MAC && pl == NULL);
    CHECK(mc_assembly_accept(a, &d, pl, 1) == MC_INVALID && a->invalid == 1 && a->fragments == 0);
    free(cache);
    free(a);
}

/* -- the receiver ------------------------------------------------------------- */

static struct mc_assembly *new_assembly(uint8_t **cache) {
    struct mc_assembly *a = malloc(sizeof *a);
    *cache = calloc(1, RAM_SIZE);
    mc_assembly_init(a, *cache, RAM_SIZE);
    return a;
}

static void test_assembly(void) {
    uint8_t *cache;
    struct mc_assembly *a = new_assembly(&cache);
    uint64_t off = 100 * MP_PAGE;
    uint32_t len = 2 * MP_PAGE;   /* 8 fragments */
    uint32_t seq = 0;

    /* Reordered fragments complete the range; a duplicate is counted, not stored twice. */
    static const uint16_t order[8] = {5, 0, 7, 2, 1, 6, 3, 4};
    for (int i = 0; i < 7; i++)
        CHECK(feed(a, 1, seq++, off, len, order[i], 10 + i) == MC_NEW);
    CHECK(feed(a, 1, seq++, off, len, 7, 20) == MC_DUPLICATE);
    CHECK(feed(a, 1, seq++, off, len, 0, 21) == MC_DUPLICATE);
    CHECK(a->duplicates == 2 && a->fragments == 7 && a->completed == 0);
    CHECK(memcmp(cache + off + 4 * MC_FRAG, src + off + 4 * MC_FRAG, MC_FRAG) != 0);   /* 4 not there yet */
    CHECK(feed(a, 1, seq++, off, len, 4, 22) == MC_COMPLETE);
    CHECK(a->completed == 1 && a->fragments == 8);
    CHECK(memcmp(cache + off, src + off, len) == 0);
    /* Nothing outside the range written. */
    uint8_t zero[MP_PAGE] = {0};
    CHECK(memcmp(cache + off - MP_PAGE, zero, MP_PAGE) == 0 && memcmp(cache + off + len, zero, MP_PAGE) == 0);

    /* The range sent again (another host asked after the window): all duplicates, no new partial range. */
    for (uint16_t i = 0; i < 8; i++)
        CHECK(feed(a, 1, seq++, off, len, i, 30) == MC_DUPLICATE);
    struct mc_repair rep;
    CHECK(mc_assembly_expire(a, 1000000, 0, NULL, &rep) == 0);
    CHECK(a->duplicates == 10 && a->fragments == 8);

    /* A one-page range; a range from a RAM larger than this assembly's; no payload. */
    for (uint16_t i = 0; i < 3; i++)
        CHECK(feed(a, 1, seq++, 0, MP_PAGE, i, 40) == MC_NEW);
    CHECK(feed(a, 1, seq++, 0, MP_PAGE, 3, 40) == MC_COMPLETE);
    CHECK(memcmp(cache, src, MP_PAGE) == 0);
    struct mc_datagram d;
    mc_fragment(&d, 1, seq, RAM_SIZE, MP_PAGE, 0);   /* refused before its number is noted */
    CHECK(mc_assembly_accept(a, &d, src, 50) == MC_INVALID);
    mc_fragment(&d, 1, seq, 0, MP_PAGE, 0);
    CHECK(mc_assembly_accept(a, &d, NULL, 50) == MC_INVALID);
    d.index = 4;
    CHECK(mc_assembly_accept(a, &d, src, 50) == MC_INVALID);
    CHECK(a->invalid == 3 && a->completed == 2);

    /* Two ranges interleaved (the same offset, other lengths are other ranges). */
    uint64_t o2 = 200 * MP_PAGE;
    CHECK(feed(a, 1, seq++, o2, MP_PAGE, 0, 60) == MC_NEW);
    CHECK(feed(a, 1, seq++, o2, 2 * MP_PAGE, 0, 60) == MC_NEW);
    CHECK(feed(a, 1, seq++, o2, MP_PAGE, 1, 60) == MC_NEW);
    CHECK(feed(a, 1, seq++, o2, 2 * MP_PAGE, 1, 60) == MC_NEW);
    CHECK(feed(a, 1, seq++, o2, MP_PAGE, 2, 60) == MC_NEW);
    CHECK(feed(a, 1, seq++, o2, MP_PAGE, 3, 60) == MC_COMPLETE);
    CHECK(mc_assembly_expire(a, 100, 10, NULL, &rep) == 1);
    /* Page 0 has 2 of its 4 fragments, page 1 none: one run of both. */
    CHECK(rep.offset == o2 && rep.length == 2 * MP_PAGE && rep.n_missing == 1 && rep.n_received == 0);
    CHECK(rep.missing[0].offset == o2 && rep.missing[0].length == 2 * MP_PAGE);
    CHECK(mc_assembly_expire(a, 100, 10, NULL, &rep) == 0);
    CHECK(a->expired == 1 && a->evicted == 0);
    CHECK(a->seq.lost == 0 && a->seq.received == seq && a->seq.sessions == 1);
    free(cache);
    free(a);
}

static void test_late_joiner(void) {
    uint8_t *cache;
    struct mc_assembly *a = new_assembly(&cache);
    /* A range of 4 pages (16 fragments) was under way when this host joined: it sees 6..15. */
    uint64_t r1 = 40 * MP_PAGE, r2 = 300 * MP_PAGE;
    uint32_t seq = 1000;
    for (uint16_t i = 6; i < 16; i++)
        CHECK(feed(a, 7, seq++, r1, 4 * MP_PAGE, i, 100 + i) == MC_NEW);
    /* Then a whole later range (another host's fault): complete, in the cache. */
    int statuses[64] = {0};
    for (uint16_t i = 0; i < 64; i++)
        statuses[i] = feed(a, 7, seq++, r2, 16 * MP_PAGE, i, 200 + i);
    int news = 0;
    for (int i = 0; i < 63; i++)
        news += statuses[i] == MC_NEW;
    CHECK(news == 63 && statuses[63] == MC_COMPLETE);
    CHECK(memcmp(cache + r2, src + r2, 16 * MP_PAGE) == 0);
    CHECK(a->seq.lost == 0 && a->seq.sessions == 1);   /* joining is no loss */

    /* Not due before the timeout. */
    struct mc_repair rep;
    CHECK(mc_assembly_expire(a, 115 + 499, 500, NULL, &rep) == 0);
    CHECK(mc_assembly_expire(a, 10, 500, NULL, &rep) == 0);   /* a time before the last fragment */
    CHECK(mc_assembly_expire(a, 115 + 500, 500, NULL, &rep) == 1);
    /* Pages 0 and 1 (fragments 0..5 missing) to ask for again; 2 and 3 received. */
    CHECK(rep.offset == r1 && rep.length == 4 * MP_PAGE);
    CHECK(rep.n_missing == 1 && rep.missing[0].offset == r1 && rep.missing[0].length == 2 * MP_PAGE);
    CHECK(rep.n_received == 1 && rep.received[0].offset == r1 + 2 * MP_PAGE &&
          rep.received[0].length == 2 * MP_PAGE);
    CHECK(memcmp(cache + r1 + 6 * MC_FRAG, src + r1 + 6 * MC_FRAG, 10 * MC_FRAG) == 0);
    CHECK(mc_assembly_expire(a, 1u << 30, 500, NULL, &rep) == 0);   /* forgotten; r2 never listed */

    /* Pages another range brought (memtap's present bits) are not asked for again. */
    uint8_t present[RAM_PAGES / 8] = {0};
    uint64_t r3 = 500 * MP_PAGE;
    for (uint64_t p = 0; p < 4; p++)
        page_set(present, 500 + p);        /* got by a [r3, r3 + 4 pages) range */
    for (uint16_t i = 24; i < 64; i++)     /* of [r3, r3 + 16 pages): pages 6..15 */
        feed(a, 7, seq++, r3, 16 * MP_PAGE, i, 2000);
    CHECK(mc_assembly_expire(a, 3000, 500, present, &rep) == 1);
    CHECK(rep.n_missing == 1 && rep.missing[0].offset == r3 + 4 * MP_PAGE && rep.missing[0].length == 2 * MP_PAGE);
    CHECK(rep.n_received == 1 && rep.received[0].offset == r3 + 6 * MP_PAGE &&
          rep.received[0].length == 10 * MP_PAGE);

    /* The most runs a range can need: every other page of the largest range. */
    uint64_t r4 = 1024 * MP_PAGE;
    for (uint32_t p = 0; p < MAX_PAGES; p += 2)
        for (uint16_t f = 0; f < MC_FRAGS_PER_PAGE; f++)
            feed(a, 7, seq++, r4, MP_MAX_REQUEST, (uint16_t)(p * MC_FRAGS_PER_PAGE + f), 4000);
    feed(a, 7, seq++, r4, MP_MAX_REQUEST, 1 * MC_FRAGS_PER_PAGE + 3, 4000);   /* a quarter of page 1 */
    CHECK(mc_assembly_expire(a, 5000, 500, NULL, &rep) == 1);
    CHECK(rep.n_missing == MC_RUNS_MAX && rep.n_received == MC_RUNS_MAX);
    int runs_ok = 1;
    for (uint32_t i = 0; i < MC_RUNS_MAX; i++)
        runs_ok &= rep.received[i].offset == r4 + 2 * i * MP_PAGE && rep.received[i].length == MP_PAGE &&
                   rep.missing[i].offset == r4 + (2 * i + 1) * MP_PAGE && rep.missing[i].length == MP_PAGE;
    CHECK(runs_ok);
    CHECK(a->expired == 3 && a->completed == 1 && a->evicted == 0);
    free(cache);
    free(a);
}

static void test_eviction(void) {
    uint8_t *cache;
    struct mc_assembly *a = new_assembly(&cache);
    uint32_t seq = 0;
    /* MC_SLOTS partial ranges, range i quiet since 100 + i. */
    for (uint32_t i = 0; i < MC_SLOTS; i++)
        CHECK(feed(a, 3, seq++, (uint64_t)i * 8 * MP_PAGE, 2 * MP_PAGE, 0, 100 + i) == MC_NEW);
    CHECK(a->evicted == 0);
    /* Range 0 progresses; a duplicate of range 2 is no progress. */
    CHECK(feed(a, 3, seq++, 0, 2 * MP_PAGE, 1, 200) == MC_NEW);
    CHECK(feed(a, 3, seq++, 2 * 8 * MP_PAGE, 2 * MP_PAGE, 0, 300) == MC_DUPLICATE);
    /* One more range: range 1, quiet longest, makes room. */
    uint64_t extra = (uint64_t)MC_SLOTS * 8 * MP_PAGE;
    CHECK(feed(a, 3, seq++, extra, 2 * MP_PAGE, 5, 201) == MC_NEW);
    CHECK(a->evicted == 1);
    /* Expired oldest first: 2, 3, ..., 63, then 0, then the extra one; 1 is gone. */
    struct mc_repair rep;
    uint64_t expect[MC_SLOTS];
    for (uint32_t i = 0; i < MC_SLOTS - 2; i++)
        expect[i] = (uint64_t)(i + 2) * 8 * MP_PAGE;
    expect[MC_SLOTS - 2] = 0;
    expect[MC_SLOTS - 1] = extra;
    int order_ok = 1, n = 0;
    while (mc_assembly_expire(a, 10000, 1, NULL, &rep) == 1) {
        order_ok &= n < MC_SLOTS && rep.offset == expect[n];
        n++;
    }
    CHECK(order_ok && n == MC_SLOTS);
    CHECK(a->expired == MC_SLOTS);
    /* Fragment 5 alone: no whole page. */
    CHECK(rep.offset == extra && rep.n_missing == 1 && rep.missing[0].length == 2 * MP_PAGE && rep.n_received == 0);
    /* The evicted range starts afresh when its fragments come again. */
    CHECK(feed(a, 3, seq++, 8 * MP_PAGE, 2 * MP_PAGE, 0, 20000) == MC_NEW);
    CHECK(a->evicted == 1);

    /* The done ring is bounded: a range completed MC_DONE completions ago is assembled again. */
    for (uint32_t i = 0; i <= MC_DONE; i++)
        for (uint16_t f = 0; f < 4; f++)
            feed(a, 3, seq++, (uint64_t)(1024 + i) * MP_PAGE, MP_PAGE, f, 30000);
    CHECK(a->completed == MC_DONE + 1);
    CHECK(feed(a, 3, seq++, (uint64_t)(1024 + MC_DONE) * MP_PAGE, MP_PAGE, 0, 30001) == MC_DUPLICATE);
    CHECK(feed(a, 3, seq++, 1024 * MP_PAGE, MP_PAGE, 0, 30001) == MC_NEW);
    free(cache);
    free(a);
}

/* -- sequence numbers ---------------------------------------------------------- */

static void test_seq(void) {
    struct mc_seq s;
    mc_seq_init(&s);
    mc_seq_note(&s, 1, 10);
    CHECK(s.received == 1 && s.sessions == 1 && s.lost == 0);
    mc_seq_note(&s, 1, 11);
    mc_seq_note(&s, 1, 12);
    mc_seq_note(&s, 1, 14);
    CHECK(s.lost == 1 && s.received == 4);
    mc_seq_note(&s, 1, 13);   /* late: it was reordered, not lost */
    CHECK(s.lost == 0 && s.reordered == 1 && s.received == 5);
    mc_seq_note(&s, 1, 13);
    mc_seq_note(&s, 1, 14);
    CHECK(s.duplicates == 2 && s.received == 5);
    /* Before the first one seen: 9 is just early; 7 says 8 is missing too. */
    mc_seq_note(&s, 1, 9);
    CHECK(s.lost == 0 && s.reordered == 2);
    mc_seq_note(&s, 1, 7);
    CHECK(s.lost == 1 && s.reordered == 3);
    mc_seq_note(&s, 1, 8);
    CHECK(s.lost == 0 && s.reordered == 4);
    mc_seq_note(&s, 1, 7);
    CHECK(s.duplicates == 3);
    /* Far behind: stale, not placed. */
    mc_seq_note(&s, 1, 14 - MC_SEQ_WINDOW);
    mc_seq_note(&s, 1, 14 + 0x80000000u);   /* exactly half the circle: behind, by convention */
    CHECK(s.stale == 2 && s.lost == 0 && s.received == 8);
    /* Far ahead: all between lost, and the old numbers leave the window. */
    mc_seq_note(&s, 1, 14 + 5000);
    CHECK(s.lost == 4999);
    mc_seq_note(&s, 1, 14 + 4990);
    CHECK(s.lost == 4998 && s.reordered == 5);
    /* 4 * 1024 + 10 shares its bit with 10, seen before the jump: the jump cleared it. */
    mc_seq_note(&s, 1, 4 * MC_SEQ_WINDOW + 10);
    CHECK(s.lost == 4997 && s.reordered == 6 && s.duplicates == 3);
    mc_seq_note(&s, 1, 14);
    CHECK(s.stale == 3);

    /* Across the wrap. */
    mc_seq_note(&s, 2, 0xfffffffdu);
    CHECK(s.sessions == 2 && s.lost == 4997);   /* the jump between sessions is no loss */
    mc_seq_note(&s, 2, 0xfffffffeu);
    mc_seq_note(&s, 2, 0);
    mc_seq_note(&s, 2, 1);
    mc_seq_note(&s, 2, 3);
    CHECK(s.lost == 4997 + 2);   /* 0xffffffff and 2 */
    mc_seq_note(&s, 2, 0xffffffffu);
    CHECK(s.lost == 4997 + 1 && s.reordered == 7);
    mc_seq_note(&s, 2, 0xffffffffu);
    CHECK(s.duplicates == 4);
    mc_seq_note(&s, 2, 2);
    CHECK(s.lost == 4997);
    CHECK(s.max == 3);

    /* A new session (the server restarted) forgets the old numbers. */
    uint64_t before = s.lost;
    mc_seq_note(&s, 3, 500000);
    mc_seq_note(&s, 3, 500001);
    CHECK(s.sessions == 3 && s.lost == before && s.max == 500001);
    mc_seq_note(&s, 3, 3);   /* session 2's last number, now merely stale */
    CHECK(s.stale == 4 && s.lost == before);
    /* An old session's datagram replayed: seen as a session change, nothing else. */
    mc_seq_note(&s, 2, 4);
    CHECK(s.sessions == 4 && s.lost == before);

    /* Randomized: blocks shuffled (reordering under the window), ~5% dropped, ~3% duplicated, across the wrap. */
    uint64_t seed = 77;
    enum { N = 20000, BLOCK = 256 };
    static uint32_t stream[N + N / 10];
    static uint8_t delivered[N];
    for (int round = 0; round < 4; round++) {
        struct mc_seq t;
        mc_seq_init(&t);
        uint32_t base = 0xffffffffu - (uint32_t)(rng_next(&seed) % N);
        int n = 0, dups = 0;
        memset(delivered, 0, sizeof delivered);
        for (int blk = 0; blk < N; blk += BLOCK) {
            int start = n;
            for (int i = blk; i < blk + BLOCK && i < N; i++) {
                if (rng_next(&seed) % 100 < 5)
                    continue;
                delivered[i] = 1;
                stream[n++] = base + (uint32_t)i;
                if (rng_next(&seed) % 100 < 3) {
                    stream[n++] = base + (uint32_t)i;
                    dups++;
                }
            }
            for (int i = n - 1; i > start; i--) {
                int j = start + (int)(rng_next(&seed) % (uint64_t)(i - start + 1));
                uint32_t x = stream[i];
                stream[i] = stream[j];
                stream[j] = x;
            }
        }
        for (int i = 0; i < n; i++)
            mc_seq_note(&t, 9, stream[i]);
        int lo = 0, hi = N - 1, lost = 0, got = 0;
        while (!delivered[lo]) lo++;
        while (!delivered[hi]) hi--;
        for (int i = lo; i <= hi; i++)
            lost += !delivered[i];
        for (int i = 0; i < N; i++)
            got += delivered[i];
        CHECK(t.lost == (uint64_t)lost);
        CHECK(t.duplicates == (uint64_t)dups);
        CHECK(t.received == (uint64_t)got && t.stale == 0 && t.sessions == 1);
        CHECK(t.reordered > 0 && t.max == base + (uint32_t)hi);
    }
}

/* -- the server: suppression and pacing ---------------------------------------- */

static void test_recent(void) {
    struct mc_recent r;
    mc_recent_init(&r, 1000);
    CHECK(mc_recent_should_send(&r, 0, 16 * MP_PAGE, 0) == 1);
    CHECK(mc_recent_should_send(&r, 0, 16 * MP_PAGE, 0) == 0);       /* lockstep: the same range */
    CHECK(mc_recent_should_send(&r, 0, 16 * MP_PAGE, 999) == 0);
    CHECK(mc_recent_should_send(&r, MP_PAGE, 2 * MP_PAGE, 500) == 0); /* a sub-range */
    CHECK(mc_recent_should_send(&r, 15 * MP_PAGE, MP_PAGE, 500) == 0);
    CHECK(mc_recent_should_send(&r, 15 * MP_PAGE, 2 * MP_PAGE, 500) == 1);   /* runs past it */
    CHECK(mc_recent_should_send(&r, 16 * MP_PAGE, MP_PAGE, 600) == 0);       /* inside that one */
    CHECK(mc_recent_should_send(&r, 0, 16 * MP_PAGE, 1000) == 1);    /* the window has passed */
    CHECK(mc_recent_should_send(&r, 0, 16 * MP_PAGE, 1500) == 0);    /* ... and a new one runs */
    CHECK(r.sent == 3 && r.suppressed == 6);
    /* Not ranges. */
    CHECK(mc_recent_should_send(&r, 0, 0, 2000) == -1);
    CHECK(mc_recent_should_send(&r, 0, MP_MAX_REQUEST + 1, 2000) == -1);
    CHECK(mc_recent_should_send(&r, UINT64_MAX - MP_PAGE + 1, 2 * MP_PAGE, 2000) == -1);
    CHECK(r.sent == 3 && r.suppressed == 6);

    /* Bounded: MC_RECENT others later, the first is forgotten even within the window. */
    mc_recent_init(&r, 1000000);
    for (uint32_t i = 0; i < MC_RECENT; i++)
        CHECK(mc_recent_should_send(&r, (uint64_t)i * MP_PAGE, MP_PAGE, 10) == 1);
    CHECK(mc_recent_should_send(&r, 0, MP_PAGE, 20) == 0);
    CHECK(mc_recent_should_send(&r, (uint64_t)MC_RECENT * MP_PAGE, MP_PAGE, 20) == 1);   /* overwrites 0 */
    CHECK(mc_recent_should_send(&r, 0, MP_PAGE, 30) == 1);
    CHECK(mc_recent_should_send(&r, 2 * MP_PAGE, MP_PAGE, 30) == 0);
    CHECK(r.sent == MC_RECENT + 2 && r.suppressed == 2);

    /* A clock that went back: not "within" the window, sent (twice is safe). */
    mc_recent_init(&r, 1000);
    CHECK(mc_recent_should_send(&r, 0, MP_PAGE, 5000) == 1 && mc_recent_should_send(&r, 0, MP_PAGE, 4000) == 1);

    /* A window of 0 suppresses nothing. */
    mc_recent_init(&r, 0);
    CHECK(mc_recent_should_send(&r, 0, MP_PAGE, 5) == 1 && mc_recent_should_send(&r, 0, MP_PAGE, 5) == 1);
}

static void test_pacer(void) {
    struct mc_pacer p;
    const uint64_t S = 1000000000ull;
    CHECK(mc_pacer_init(&p, 0, 100, 65536, S, 0) == -1);
    CHECK(mc_pacer_init(&p, 200, 100, 65536, S, 0) == -1);
    CHECK(mc_pacer_init(&p, 1, 100, MC_DATAGRAM_LEN - 1, S, 0) == -1);
    CHECK(mc_pacer_init(&p, 1, 100, 65536, 0, 0) == -1);
    CHECK(mc_pacer_init(&p, 1000000, 1000000000, 65536, 3 * S, 0) == 0);

    /* The rate: the lowest fresh report, clamped; the ceiling when none is fresh. */
    CHECK(mc_pacer_rate(&p, 0) == 1000000000);
    mc_pacer_report(&p, 1, 50000000, 0);
    CHECK(mc_pacer_rate(&p, 0) == 50000000);
    mc_pacer_report(&p, 2, 20000000, 1 * S);
    CHECK(mc_pacer_rate(&p, 1 * S) == 20000000);
    mc_pacer_report(&p, 3, 70000000, 1 * S);
    CHECK(mc_pacer_rate(&p, 2 * S) == 20000000);
    CHECK(mc_pacer_rate(&p, 3 * S) == 20000000);    /* 1's report is 3 s old: gone */
    mc_pacer_report(&p, 2, 90000000, 3 * S);        /* 2 caught up: its new report replaces the old */
    CHECK(mc_pacer_rate(&p, 3 * S) == 70000000);
    CHECK(mc_pacer_rate(&p, 4 * S - 1) == 70000000);
    CHECK(mc_pacer_rate(&p, 4 * S) == 90000000);    /* 3's is old now */
    CHECK(mc_pacer_rate(&p, 6 * S) == 1000000000);  /* and 2's */
    mc_pacer_report(&p, 4, 10, 6 * S);
    CHECK(mc_pacer_rate(&p, 6 * S) == 1000000);     /* the floor */
    mc_pacer_report(&p, 4, 0, 6 * S);
    CHECK(mc_pacer_rate(&p, 6 * S) == 1000000);
    mc_pacer_report(&p, 4, 5000000000ull, 6 * S);
    CHECK(mc_pacer_rate(&p, 6 * S) == 1000000000);  /* the ceiling */
    mc_pacer_report(&p, 5, 30000000, 20 * S);       /* stamped ahead of now: fresh */
    CHECK(mc_pacer_rate(&p, 7 * S) == 30000000);

    /* A full table: a new reporter replaces the oldest report. */
    mc_pacer_init(&p, 1000, 1000000000, 65536, 100 * S, 0);
    for (uint32_t i = 0; i < MC_REPORTERS; i++)
        mc_pacer_report(&p, 100 + i, i == 0 ? 5000 : 100000 + i, 1 + i);
    CHECK(mc_pacer_rate(&p, 100) == 5000);
    mc_pacer_report(&p, 999, 200000, 100);
    CHECK(mc_pacer_rate(&p, 100) == 100001);
    mc_pacer_report(&p, 101, 150000, 101);          /* a known reporter: its own entry */
    CHECK(mc_pacer_rate(&p, 101) == 100002);

    /* The bucket: starts full, refills at the rate, carries fractions, holds at most burst. */
    CHECK(mc_pacer_init(&p, 1000, 1000000000, 65536, 100 * S, 0) == 0);
    mc_pacer_report(&p, 1, 1000000, 0);             /* 1 byte per us */
    CHECK(mc_pacer_allow(&p, 65536, 0) == 1);
    CHECK(mc_pacer_allow(&p, 1, 0) == 0);
    CHECK(mc_pacer_wait_ns(&p, 1000, 0) == 1000000);
    CHECK(mc_pacer_allow(&p, 1000, 999999) == 0);
    CHECK(mc_pacer_allow(&p, 1000, 1000000) == 1);
    CHECK(mc_pacer_allow(&p, 1, 1000000) == 0);
    CHECK(mc_pacer_wait_ns(&p, 0, 1000000) == 0);
    CHECK(mc_pacer_wait_ns(&p, 65537, 1000000) == UINT64_MAX);
    CHECK(mc_pacer_allow(&p, 65537, 1 * S) == 0);   /* more than the bucket: never */
    CHECK(mc_pacer_allow(&p, 65536, 1 * S) == 1);   /* a second is 10^6 bytes: capped at 65536 */
    CHECK(mc_pacer_allow(&p, 1, 1 * S) == 0);
    CHECK(p.allowed_bytes == 65536 + 1000 + 65536 && p.denied == 5);

    mc_pacer_init(&p, 1000, 1000, 65536, S, 0);     /* 1 byte per ms */
    CHECK(mc_pacer_allow(&p, 65536, 0) == 1);
    CHECK(mc_pacer_allow(&p, 1, 500000) == 0);      /* half a byte, kept */
    CHECK(mc_pacer_allow(&p, 1, 999999) == 0);
    CHECK(mc_pacer_allow(&p, 1, 1000000) == 1);
    CHECK(mc_pacer_wait_ns(&p, 3, 1000000) == 3000000);
    CHECK(mc_pacer_wait_ns(&p, 3, 500000) == 3500000);   /* asked about a time already past */
    CHECK(mc_pacer_allow(&p, 3, 500000) == 0);
    CHECK(mc_pacer_allow(&p, 3, 4000000) == 1);

    /* A fast rate over a long idle time does not overflow. */
    mc_pacer_init(&p, 1, 1000000000000ull, 1 << 20, S, 0);
    CHECK(mc_pacer_allow(&p, 1 << 20, 0) == 1);
    CHECK(mc_pacer_allow(&p, 1 << 20, UINT64_MAX / 2) == 1);
    CHECK(mc_pacer_allow(&p, 1, UINT64_MAX / 2) == 0);
    CHECK(mc_pacer_wait_ns(&p, 1, UINT64_MAX / 2) == 1);

    /* wait_ns is exact: one ns earlier is too early, at it the bytes pass. */
    uint64_t seed = 4242, now = 0;
    mc_pacer_init(&p, 1000, 1000000000, 65536, 10 * S, 0);
    int exact = 1, never = 1;
    for (int i = 0; i < 2000; i++) {
        if (i % 50 == 0)
            mc_pacer_report(&p, (uint32_t)(rng_next(&seed) % 8), 1000 + rng_next(&seed) % 50000000, now);
        uint64_t bytes = 1 + rng_next(&seed) % 8192;
        uint64_t w = mc_pacer_wait_ns(&p, bytes, now);
        if (w > 0) {
            struct mc_pacer early = p, late = p;
            exact &= mc_pacer_allow(&early, bytes, now + w - 1) == 0 && mc_pacer_allow(&late, bytes, now + w) == 1;
            never &= w != UINT64_MAX;
        }
        now += rng_next(&seed) % 200000;
        mc_pacer_allow(&p, bytes, now);
    }
    CHECK(exact && never);

    /* A sender that waits as told sends rate x time + one bucket, within one datagram. */
    mc_pacer_init(&p, 1000, 1000000000, 16 * MC_DATAGRAM_LEN, S, 0);
    mc_pacer_report(&p, 1, 12500000, 0);            /* 100 Mbit/s */
    uint64_t sent = 0;
    now = 0;
    while (now < S) {
        if (mc_pacer_allow(&p, MC_DATAGRAM_LEN, now))
            sent += MC_DATAGRAM_LEN;
        else
            now += mc_pacer_wait_ns(&p, MC_DATAGRAM_LEN, now);
    }
    uint64_t expect = 12500000 + 16 * MC_DATAGRAM_LEN;   /* the last send is within a datagram's time of 1 s */
    CHECK(sent <= expect && sent + 2 * MC_DATAGRAM_LEN >= expect);
}

/* -- randomized: split, shuffle, drop, duplicate, assemble, repair ---------------- */

struct frag {
    uint32_t range;
    uint16_t index;
};

static void test_random(void) {
    enum { MAX_RANGES = 60 };
    static struct frag frags[RAM_PAGES * MC_FRAGS_PER_PAGE * 2];
    static uint8_t arrived[RAM_PAGES * MC_FRAGS_PER_PAGE];   /* copies delivered, per fragment of the RAM */
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (int round = 0; round < 8; round++) {
        uint64_t r_off[MAX_RANGES];
        uint32_t r_len[MAX_RANGES], nr = 0, page = 0;
        /* Non-overlapping ranges over the RAM's start, 1..256 pages, a gap now and then. */
        while (nr < MAX_RANGES) {
            uint32_t pages = 1 + (uint32_t)(rng_next(&seed) % MAX_PAGES);
            page += (uint32_t)(rng_next(&seed) % 4 == 0 ? rng_next(&seed) % 8 : 0);
            if (page + pages > RAM_PAGES)
                break;
            r_off[nr] = (uint64_t)page * MP_PAGE;
            r_len[nr++] = pages * MP_PAGE;
            page += pages;
        }
        size_t n = 0;
        memset(arrived, 0, sizeof arrived);
        for (uint32_t r = 0; r < nr; r++)
            for (uint16_t i = 0; i < r_len[r] / MC_FRAG; i++) {
                int copies = rng_next(&seed) % 100 < 4 ? 2 : 1;   /* the network duplicates some */
                for (int c = 0; c < copies; c++)
                    if (rng_next(&seed) % 100 >= 5)                /* and loses ~5% */
                        frags[n++] = (struct frag){r, i};
            }
        for (size_t i = n; i > 1; i--) {
            size_t j = (size_t)(rng_next(&seed) % i);
            struct frag x = frags[i - 1];
            frags[i - 1] = frags[j];
            frags[j] = x;
        }

        uint8_t *cache;
        struct mc_assembly *a = new_assembly(&cache);
        uint8_t present[RAM_PAGES / 8] = {0};
        int completes[MAX_RANGES] = {0}, other = 0;
        uint64_t distinct = 0;
        uint32_t session = (uint32_t)rng_next(&seed);
        for (size_t i = 0; i < n; i++) {
            uint32_t r = frags[i].range;
            uint64_t f = r_off[r] / MC_FRAG + frags[i].index;
            distinct += arrived[f]++ == 0;
            int st = feed(a, session, (uint32_t)i, r_off[r], r_len[r], frags[i].index, 1000 + i);
            if (st == MC_COMPLETE) {
                completes[r]++;
                for (uint64_t p = r_off[r] / MP_PAGE; p < (r_off[r] + r_len[r]) / MP_PAGE; p++)
                    page_set(present, p);   /* what memtap does */
            } else if (st != MC_NEW && st != MC_DUPLICATE) {
                other++;
            }
        }
        CHECK(other == 0);
        CHECK(a->fragments == distinct && a->duplicates == n - distinct);
        CHECK(a->evicted == 0 && a->invalid == 0 && a->seq.lost == 0);

        /* Which pages lost a fragment (every copy of it dropped), which ranges are whole. */
        uint8_t lost[RAM_PAGES / 8] = {0}, in_range[RAM_PAGES / 8] = {0};
        uint32_t whole = 0, partial = 0;
        int completes_ok = 1;
        for (uint32_t r = 0; r < nr; r++) {
            int complete = 1;
            for (uint64_t f = r_off[r] / MC_FRAG; f < (r_off[r] + r_len[r]) / MC_FRAG; f++) {
                page_set(in_range, f / MC_FRAGS_PER_PAGE);
                if (!arrived[f]) {
                    page_set(lost, f / MC_FRAGS_PER_PAGE);
                    complete = 0;
                }
            }
            whole += complete;
            partial += !complete;
            completes_ok &= completes[r] == complete;
        }
        CHECK(completes_ok);
        CHECK(a->completed == whole);

        /* The repair lists: exactly the lost pages; the rest of the partial ranges received. */
        uint8_t asked[RAM_PAGES / 8] = {0}, got[RAM_PAGES / 8] = {0};
        struct mc_repair *rep = malloc(sizeof *rep);
        uint32_t expired = 0;
        int runs_ok = 1, coalesced = 1;
        uint64_t now = 1000 + n + 500;
        CHECK(mc_assembly_expire(a, now, now, present, rep) == 0);   /* none quiet that long yet */
        while (mc_assembly_expire(a, now, 500, present, rep) == 1) {
            expired++;
            for (uint32_t k = 0; k < rep->n_missing; k++) {
                struct mc_run *run = &rep->missing[k];
                runs_ok &= run->length > 0 && run->length % MP_PAGE == 0 && run->length <= MP_MAX_REQUEST &&
                           run->offset >= rep->offset && run->offset + run->length <= rep->offset + rep->length;
                coalesced &= k == 0 || rep->missing[k - 1].offset + rep->missing[k - 1].length < run->offset;
                for (uint64_t p = run->offset / MP_PAGE; p < (run->offset + run->length) / MP_PAGE; p++) {
                    runs_ok &= !page_bit(asked, p);
                    page_set(asked, p);
                }
            }
            for (uint32_t k = 0; k < rep->n_received; k++) {
                struct mc_run *run = &rep->received[k];
                coalesced &= k == 0 || rep->received[k - 1].offset + rep->received[k - 1].length < run->offset;
                for (uint64_t p = run->offset / MP_PAGE; p < (run->offset + run->length) / MP_PAGE; p++) {
                    runs_ok &= !page_bit(got, p) && !page_bit(asked, p);
                    page_set(got, p);
                }
            }
        }
        free(rep);
        CHECK(runs_ok && coalesced);
        CHECK(expired == partial && a->expired == partial);
        CHECK(memcmp(asked, lost, sizeof lost) == 0);
        int got_ok = 1;
        for (uint64_t p = 0; p < RAM_PAGES; p++)
            got_ok &= page_bit(got, p) == (page_bit(in_range, p) && !page_bit(lost, p) && !page_bit(present, p));
        CHECK(got_ok);

        /* The bytes: every fragment that arrived is the source's, everything else still zero. */
        static const uint8_t zero[MC_FRAG];
        int bytes_ok = 1;
        for (uint64_t f = 0; f < RAM_PAGES * MC_FRAGS_PER_PAGE; f++)
            bytes_ok &= memcmp(cache + f * MC_FRAG, arrived[f] ? src + f * MC_FRAG : zero, MC_FRAG) == 0;
        CHECK(bytes_ok);
        free(cache);
        free(a);
    }
}

int main(void) {
    CHECK(mp_token_from_hex(TOKEN_HEX, token) == 0);
    CHECK(mp_token_from_hex(OTHER_TOKEN_HEX, other_token) == 0);
    CHECK(mc_key_init(&key, token) == 0 && key.ctx);
    CHECK(mc_key_init(&other_key, other_token) == 0 && other_key.ctx);
    if (!key.ctx || !other_key.ctx) {
        fprintf(stderr, "mcast_test: no HMAC-SHA256 from OpenSSL\n");
        return 1;
    }
    src = malloc(RAM_SIZE);
    uint64_t seed = 1;
    for (uint64_t i = 0; i < RAM_SIZE / 8; i++) {
        uint64_t v = rng_next(&seed);
        memcpy(src + 8 * i, &v, 8);
    }

    test_status_names();
    test_known_answer();
    test_round_trips();
    test_rejections();
    test_forgeries();
    test_assembly();
    test_late_joiner();
    test_eviction();
    test_seq();
    test_recent();
    test_pacer();
    test_random();

    mc_key_free(&key);
    mc_key_free(&other_key);
    CHECK(key.ctx == NULL);
    free(src);
    if (failures) {
        fprintf(stderr, "mcast_test: %lu of %lu checks failed\n", failures, checks);
        return 1;
    }
    printf("mcast_test: all %lu checks passed\n", checks);
    return 0;
}
