/* Multicast distribution of pages (SnowFlock's mcdist), the pure part: the
 * datagram, its MAC, the receiver's assembly of ranges, the server's lockstep
 * suppression and the pacer. No sockets, no clock (every time is passed in),
 * no malloc of ours (fixed tables); the sockets come with memtap and the
 * server.
 *
 * Requests still go by TCP (protocol.h); the server answers by UDP multicast,
 * one group per checkpoint, so every clone host's memtap receives every range
 * any host asked for. A range (page-aligned, 1..MP_MAX_REQUEST bytes) travels
 * as length / MC_FRAG datagrams, all integers little-endian:
 *
 *   u32 magic 'SFMD' | u16 version | u16 flags | u32 session | u32 seq
 *   | u64 offset | u32 length | u16 index | u16 count | u16 payload_len
 *   | u8 mac[16] | payload[payload_len]
 *
 * session: the server's random id for this checkpoint's multicast stream (a
 * restarted server has a new one); seq: per session, one more per datagram;
 * count = length / MC_FRAG, index < count, payload_len = MC_FRAG: every
 * fragment is a whole quarter page, so a lost fragment is a lost page that
 * memtap asks for again by TCP. mac: HMAC-SHA256 (OpenSSL), truncated to 16
 * bytes, of the datagram without the mac field, keyed with
 * HMAC-SHA256(token, "sfmpi multicast key") so that the token, which opens a
 * TCP connection, never keys anything else. A replayed datagram carries the
 * checkpoint's true bytes (its RAM never changes): at worst a duplicate.
 *
 * Others may call everything below. One struct mc_key per thread (its OpenSSL
 * context is reused for every MAC); the other structs are plain data, locked
 * by their owner if shared.
 */
#ifndef SFMPI_MEMORY_MCAST_H
#define SFMPI_MEMORY_MCAST_H

#include <stddef.h>
#include <stdint.h>

#include "protocol.h"

#define MC_VERSION 1
#define MC_MAGIC_DATA 0x444d4653u     /* "SFMD" as bytes on the wire */
#define MC_FLAG_REPAIR 0x0001u        /* sent again for a repair request: counted, else like any other */
#define MC_FLAGS_KNOWN MC_FLAG_REPAIR

#define MC_FRAG 1024u                 /* payload bytes: 4 per page */
#define MC_FRAGS_PER_PAGE (MP_PAGE / MC_FRAG)
#define MC_MAX_FRAGS (MP_MAX_REQUEST / MC_FRAG)   /* 1024 in a largest range */
#define MC_MAC_LEN 16
#define MC_KEY_LEN 32
#define MC_MAC_AT 34                  /* the mac field's offset */
#define MC_HEADER_LEN 50
#define MC_DATAGRAM_LEN (MC_HEADER_LEN + MC_FRAG)  /* 1074: under 1400, no IP fragmentation */

enum mc_status {
    MC_OK = 0,
    MC_E_SIZE = 1,       /* datagram not exactly header + payload (truncated, padded) */
    MC_E_MAGIC = 2,      /* not this protocol */
    MC_E_VERSION = 3,
    MC_E_FLAGS = 4,      /* a flag this version does not know */
    MC_E_LENGTH = 5,     /* range length 0 or over MP_MAX_REQUEST */
    MC_E_ALIGN = 6,      /* offset or length not a multiple of the page */
    MC_E_RANGE = 7,      /* outside the RAM */
    MC_E_COUNT = 8,      /* count is not length / MC_FRAG */
    MC_E_INDEX = 9,      /* index >= count */
    MC_E_PAYLOAD = 10,   /* payload_len is not MC_FRAG */
    MC_E_MAC = 11,       /* forged or altered (or OpenSSL failed: either way not trusted) */
    MC_STATUS_COUNT
};

const char *mc_status_name(uint32_t status);

struct mc_datagram {
    uint16_t version;
    uint16_t flags;
    uint32_t session;
    uint32_t seq;
    uint64_t offset;
    uint32_t length;
    uint16_t index;
    uint16_t count;
    uint16_t payload_len;
};

/* -- the MAC ---------------------------------------------------------------- */

struct evp_mac_ctx_st;   /* OpenSSL's EVP_MAC_CTX */

struct mc_key {
    struct evp_mac_ctx_st *ctx;   /* HMAC-SHA256, keyed once */
};

/* The multicast key of a checkpoint's token: HMAC-SHA256(token, "sfmpi multicast key"). 0 or -1. */
int mc_derive_key(const uint8_t token[MP_TOKEN_LEN], uint8_t key[MC_KEY_LEN]);
/* 0, or -1 (OpenSSL failed; k is then free). */
int mc_key_init(struct mc_key *k, const uint8_t token[MP_TOKEN_LEN]);
void mc_key_free(struct mc_key *k);
/* Writes the MAC of dgram[0, len) (mac field excluded) into its mac field;
 * len >= MC_HEADER_LEN. 0 or -1. Encoding does it; tests re-seal altered datagrams with it. */
int mc_seal(struct mc_key *k, uint8_t *dgram, size_t len);

/* -- datagrams --------------------------------------------------------------- */

/* The header of fragment `index` of [offset, offset + length): version, count
 * and payload_len filled in, flags 0. */
void mc_fragment(struct mc_datagram *d, uint32_t session, uint32_t seq, uint64_t offset, uint32_t length,
                 uint16_t index);
/* Is d a valid fragment of a RAM of ram_size bytes? MC_OK or what is wrong. */
uint32_t mc_check(const struct mc_datagram *d, uint64_t ram_size);
/* d (checked, any RAM size) and MC_FRAG bytes of payload, sealed, into out:
 * MC_DATAGRAM_LEN, or 0 for a d that is not valid or an OpenSSL failure. */
size_t mc_encode(struct mc_key *k, const struct mc_datagram *d, const uint8_t *payload,
                 uint8_t out[MC_DATAGRAM_LEN]);
/* A received datagram of len bytes: MC_OK with d filled and *payload pointing
 * into dgram, or the status that says what is wrong. The MAC is checked last,
 * in constant time: cheap checks turn junk away before an HMAC is spent on it. */
uint32_t mc_decode(struct mc_key *k, const uint8_t *dgram, size_t len, uint64_t ram_size, struct mc_datagram *d,
                   const uint8_t **payload);

/* -- sequence numbers (lost datagrams) ------------------------------------- */

#define MC_SEQ_WINDOW 1024u   /* how far back a late datagram is still placed */

/* Per session, in serial-number arithmetic (wraps at 2^32): a skipped number
 * is counted lost until it arrives (then it was reordered); one that arrives
 * more than MC_SEQ_WINDOW behind the highest is stale (and stays lost). A new
 * session id starts afresh (the counters are totals over all sessions): the
 * jump between two sessions' numbers is no loss. An old session's datagram
 * replayed looks like a new session: `sessions` shows it. */
struct mc_seq {
    int started;
    uint32_t session;
    uint32_t max;             /* highest number seen */
    uint32_t span;            /* numbers from the session's lowest seen to max, at most MC_SEQ_WINDOW */
    uint64_t bits[MC_SEQ_WINDOW / 64];   /* bit n % MC_SEQ_WINDOW: number n seen */
    uint64_t received, lost, reordered, duplicates, stale, sessions;
};

void mc_seq_init(struct mc_seq *s);
void mc_seq_note(struct mc_seq *s, uint32_t session, uint32_t seq);

/* -- the receiver: ranges being assembled ------------------------------------ */

#define MC_SLOTS 64    /* partial ranges at once */
#define MC_DONE 128    /* recently completed ranges: their fragments are duplicates */
#define MC_RUNS_MAX (MP_MAX_REQUEST / MP_PAGE / 2)   /* 128: alternating pages at most */

enum mc_accept {
    MC_NEW = 0,        /* stored: the range is still partial */
    MC_DUPLICATE = 1,  /* this fragment (or its whole range) was already had */
    MC_COMPLETE = 2,   /* stored, and the range is whole: mark it present, push it to the page cache */
    MC_INVALID = 3,    /* d is not a valid fragment of this RAM */
};

struct mc_range {
    uint64_t offset;
    uint32_t length;          /* 0: slot free */
    uint16_t count, have;
    uint64_t first_ns, last_ns;   /* first fragment, last new fragment */
    uint64_t bits[MC_MAX_FRAGS / 64];
};

struct mc_assembly {
    uint8_t *cache;           /* ram_size bytes: fragments go to cache + offset + index * MC_FRAG */
    uint64_t ram_size;
    struct mc_range slot[MC_SLOTS];
    struct { uint64_t offset; uint32_t length; } done[MC_DONE];
    uint32_t done_next;
    struct mc_seq seq;
    uint64_t fragments, duplicates, completed, evicted, expired, invalid;
};

/* A partial range given up (mc_assembly_expire): its pages as runs. */
struct mc_run {
    uint64_t offset;
    uint32_t length;
};

struct mc_repair {
    uint64_t offset;          /* the range */
    uint32_t length;
    uint32_t n_missing, n_received;
    struct mc_run missing[MC_RUNS_MAX];    /* to ask for again (TCP) */
    struct mc_run received[MC_RUNS_MAX];   /* every fragment in the cache: mark present */
};

void mc_assembly_init(struct mc_assembly *a, uint8_t *cache, uint64_t ram_size);
/* One decoded datagram. Ranges nobody here asked for are taken too (a late
 * joiner, another host's fault: everyone benefits); a new range when all
 * slots are partial evicts the one quiet longest (counted in `evicted`; its
 * pages are fetched again when touched). */
enum mc_accept mc_assembly_accept(struct mc_assembly *a, const struct mc_datagram *d, const uint8_t *payload,
                                  uint64_t now_ns);
/* The partial range quiet longest, if no new fragment of it came for
 * timeout_ns: its missing pages (a page with any fragment missing; pages set
 * in `present`, memtap's bit per page, NULL for none, left out) and received
 * pages, coalesced into runs, into out, and the range forgotten. 1, or 0 when
 * none is due. Call until 0. The timeout must exceed the server's suppression
 * window (mc_recent), or a repair could be suppressed as a repeat. */
int mc_assembly_expire(struct mc_assembly *a, uint64_t now_ns, uint64_t timeout_ns, const uint8_t *present,
                       struct mc_repair *out);

/* -- the server: lockstep suppression ---------------------------------------- */

#define MC_RECENT 256

/* Clones forked together fault on the same pages at the same time: a range
 * asked for within window_ns (about two round trips) of sending a range that
 * covers it is on its way to every host already, and is not sent again. */
struct mc_recent {
    uint64_t window_ns;
    uint32_t next;            /* the oldest entry, overwritten next */
    struct { uint64_t offset, sent_ns; uint32_t length; } e[MC_RECENT];
    uint64_t sent, suppressed;
};

void mc_recent_init(struct mc_recent *r, uint64_t window_ns);
/* 1: send it (and it is recorded as sent now); 0: covered by one sent within
 * the window; -1: not a range (length 0 or over MP_MAX_REQUEST, or past 2^64). */
int mc_recent_should_send(struct mc_recent *r, uint64_t offset, uint32_t length, uint64_t now_ns);

/* -- the server: pacing ---------------------------------------------------- */

#define MC_REPORTERS 64

/* Receiver-driven, as in mcdist: each receiver reports the rate (bytes/s) it
 * can take, the sender goes at the lowest fresh report, clamped to
 * [floor, ceiling] (the ceiling when no report is fresh); a token bucket of
 * `burst` bytes (at least one datagram) turns the rate into "may I send these
 * bytes now". A report should be what a receiver can absorb, not only what it
 * got (a receiver that lost nothing reports more), or the rate never rises. */
struct mc_pacer {
    uint64_t floor, ceiling, burst, fresh_ns;
    struct { uint32_t id; int used; uint64_t rate, at_ns; } report[MC_REPORTERS];
    uint64_t tokens;          /* bytes, at most burst */
    uint64_t frac;            /* and nano-bytes, < 10^9 */
    uint64_t last_ns;         /* tokens as of then */
    uint64_t allowed_bytes, denied;
};

/* 0, or -1 for floor 0, floor > ceiling, burst < MC_DATAGRAM_LEN or fresh_ns 0. The bucket starts full. */
int mc_pacer_init(struct mc_pacer *p, uint64_t floor, uint64_t ceiling, uint64_t burst, uint64_t fresh_ns,
                  uint64_t now_ns);
/* Receiver `id`'s rate: replaces its last report (the table full: the oldest report). */
void mc_pacer_report(struct mc_pacer *p, uint32_t id, uint64_t bytes_per_s, uint64_t now_ns);
uint64_t mc_pacer_rate(const struct mc_pacer *p, uint64_t now_ns);
/* 1 and the bytes taken from the bucket, or 0 (never for bytes > burst). */
int mc_pacer_allow(struct mc_pacer *p, uint64_t bytes, uint64_t now_ns);
/* ns until mc_pacer_allow(bytes) would pass at today's rate; 0: now; UINT64_MAX: never (bytes > burst). */
uint64_t mc_pacer_wait_ns(const struct mc_pacer *p, uint64_t bytes, uint64_t now_ns);

#endif
