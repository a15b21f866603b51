/* edgeops-device: a minimal third-party edgeops device, written from docs/protocol.md alone.
 *
 * It shares no code with the Python package: C, libmosquitto (MQTT 3.1.1 over TLS), cJSON and
 * OpenSSL's libcrypto (Ed25519, SHA-256), all from Debian (libmosquitto-dev libcjson-dev libssl-dev).
 *
 *   edgeops-device DEVICE_DIR [--hold] [--bad-batch] [--download]
 *
 * One run: read DEVICE_DIR/device.json; connect with the device's certificate over mutual TLS
 * (TLS 1.2+, the fleet CA pinned, the broker's host name checked), with the offline will; subscribe
 * to its own desired/blocks/acks/cert topics; publish its online state (retained); receive its
 * `desired`; walk the TUF metadata through fetch/blocks (next root until "not found", timestamp,
 * the snapshot and targets versions they name), checking every file's length against the reply
 * headers' `total` and every signature against the pinned root (canonical JSON, Ed25519); with
 * --download and a desired target, stream the target in and check its signed length and sha256;
 * send one telemetry batch with one inference record and wait for the fleet's ack of its seq
 * (--bad-batch: then one batch without `dropped`, which the fleet refuses but acknowledges);
 * --hold: wait for a line (or EOF) on stdin; then publish offline (retained) and disconnect.
 *
 * Progress goes to stdout, one "step: detail" line each; a failure is one line on stderr and exit 1.
 * Every wait has a deadline.
 */
#define _GNU_SOURCE
#include <cJSON.h>
#include <errno.h>
#include <mosquitto.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_BLOCK 131072
#define WAIT_S 10.0   /* a fetch reply or an ack that does not come within this is asked for again */
#define TRIES 5
#define MAX_FILE (4 * 1024 * 1024)

struct ctx {
    char id[65], dir[4096], topic_state[160], topic_fetch[160], topic_telemetry[160];
    char topic_desired[160], topic_blocks[160], topic_acks[160], topic_cert[160], stream_topic[160];
    struct mosquitto *mosq;
    int connected, pending_subacks, connections;
    int last_mid_acked_count;       /* PUBACKs seen (on_publish) */
    int waiting_mid, waiting_mid_done;
    char *last_state;               /* republished after each reconnection */
    cJSON *desired;                 /* newest `desired`, NULL before one arrived */
    long want_req;                  /* the fetch request whose reply we wait for */
    cJSON *reply_header; unsigned char *reply_data; int reply_len;
    long want_seq; int seq_acked;   /* the telemetry seq whose ack we wait for */
    int cert_messages;
    unsigned char *stream_file; long stream_total; unsigned char *stream_have; int stream_new;
};

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "edgeops-device: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void step(const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s: ", name);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *read_file(const char *path, long *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot read %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(n + 1);
    if (fread(buf, 1, n, f) != (size_t)n) die("cannot read %s", path);
    buf[n] = 0;
    fclose(f);
    if (len) *len = n;
    return buf;
}

static const char *str_field(cJSON *obj, const char *name, const char *where) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsString(v)) die("%s: field '%s' must be a string", where, name);
    return v->valuestring;
}

static long int_field(cJSON *obj, const char *name, const char *where) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(long)v->valuedouble) die("%s: field '%s' must be an integer", where, name);
    return (long)v->valuedouble;
}

/* ---------------------------------------------------------------- MQTT plumbing */

/* Run the network loop until *flag is non-zero or `seconds` pass; returns *flag. Reconnects (with
 * backoff) when the connection drops: on_connect then subscribes again and republishes the state. */
static int pump(struct ctx *c, volatile int *flag, double seconds) {
    double deadline = now_s() + seconds, backoff = 1;
    while (!*flag && now_s() < deadline) {
        int rc = mosquitto_loop(c->mosq, 100, 1);
        if (rc == MOSQ_ERR_NO_CONN || rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_PROTOCOL || rc == MOSQ_ERR_TLS) {
            c->connected = 0;
            step("reconnect", "%s; retrying in %.0f s", mosquitto_strerror(rc), backoff);
            usleep((useconds_t)(backoff * 1e6));
            backoff = backoff * 2 > 30 ? 30 : backoff * 2;
            mosquitto_reconnect(c->mosq);
        } else if (rc != MOSQ_ERR_SUCCESS) {
            die("MQTT: %s", mosquitto_strerror(rc));
        }
    }
    return *flag;
}

static int publish(struct ctx *c, const char *topic, const char *payload, int retain) {
    int mid;
    int rc = mosquitto_publish(c->mosq, &mid, topic, (int)strlen(payload), payload, 1, retain);
    if (rc != MOSQ_ERR_SUCCESS) die("publish on %s: %s", topic, mosquitto_strerror(rc));
    return mid;
}

/* Publish with QoS 1 and wait for the broker's PUBACK. */
static void publish_acked(struct ctx *c, const char *topic, const char *payload, int retain) {
    c->waiting_mid_done = 0;
    c->waiting_mid = publish(c, topic, payload, retain);
    if (!pump(c, &c->waiting_mid_done, WAIT_S)) die("no PUBACK for the publish on %s", topic);
}

static void publish_state(struct ctx *c, const char *state) {
    free(c->last_state);
    c->last_state = strdup(state);
    publish_acked(c, c->topic_state, state, 1);
}

static void on_connect(struct mosquitto *m, void *obj, int rc) {
    struct ctx *c = obj;
    if (rc != 0) {
        fprintf(stderr, "edgeops-device: broker refused the connection: %s\n", mosquitto_connack_string(rc));
        return;
    }
    c->connected = 1;
    c->connections++;
    const char *topics[] = {c->topic_desired, c->topic_blocks, c->topic_acks, c->topic_cert};
    for (int i = 0; i < 4; i++) {
        if (mosquitto_subscribe(m, NULL, topics[i], 1) == MOSQ_ERR_SUCCESS) c->pending_subacks++;
    }
    if (c->stream_topic[0] && mosquitto_subscribe(m, NULL, c->stream_topic, 1) == MOSQ_ERR_SUCCESS) c->pending_subacks++;
    if (c->last_state) publish(c, c->topic_state, c->last_state, 1);  /* the will went out meanwhile */
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int count, const int *granted) {
    struct ctx *c = obj;
    for (int i = 0; i < count; i++)
        if (granted[i] == 0x80) die("the broker refused a subscription (ACL)");
    c->pending_subacks--;
}

static void on_publish(struct mosquitto *m, void *obj, int mid) {
    struct ctx *c = obj;
    if (mid == c->waiting_mid) c->waiting_mid_done = 1;
}

static void on_blocks(struct ctx *c, const unsigned char *payload, int len, int stream) {
    const unsigned char *nl = memchr(payload, '\n', len);
    if (!nl) { step("dropped", "a block without a header line"); return; }
    cJSON *h = cJSON_ParseWithLength((const char *)payload, nl - payload);
    if (!cJSON_IsObject(h)) { step("dropped", "a block whose header is not a JSON object"); cJSON_Delete(h); return; }
    int data_len = len - (int)(nl - payload) - 1;
    cJSON *req = cJSON_GetObjectItemCaseSensitive(h, "req");
    if (!stream || cJSON_GetObjectItemCaseSensitive(h, "error")) {
        if (!cJSON_IsNumber(req) || (long)req->valuedouble != c->want_req) { cJSON_Delete(h); return; }  /* stale */
        cJSON_Delete(c->reply_header);
        free(c->reply_data);
        c->reply_header = h;
        c->reply_data = malloc(data_len + 1);
        memcpy(c->reply_data, nl + 1, data_len);
        c->reply_len = data_len;
        return;
    }
    /* a stream block: store it at its offset if it is one we lack and its size fits its position */
    cJSON *off = cJSON_GetObjectItemCaseSensitive(h, "offset"), *tot = cJSON_GetObjectItemCaseSensitive(h, "total");
    if (c->stream_file && cJSON_IsNumber(off) && cJSON_IsNumber(tot)) {
        long offset = (long)off->valuedouble, total = (long)tot->valuedouble, index = offset / MAX_BLOCK;
        if (total != c->stream_total) die("length: a stream block says the target is %ld bytes, %ld were signed", total, c->stream_total);
        long expect = total - offset < MAX_BLOCK ? total - offset : MAX_BLOCK;
        if (offset % MAX_BLOCK == 0 && offset < total && data_len == expect && !c->stream_have[index]) {
            memcpy(c->stream_file + offset, nl + 1, data_len);
            c->stream_have[index] = 1;
            c->stream_new++;
        }
    }
    cJSON_Delete(h);
}

static void on_acks(struct ctx *c, const char *payload, int len) {
    cJSON *m = cJSON_ParseWithLength(payload, len), *seqs = cJSON_GetObjectItemCaseSensitive(m, "seqs"), *pair;
    if (!cJSON_IsArray(seqs)) { step("dropped", "an ack without seqs"); cJSON_Delete(m); return; }
    cJSON_ArrayForEach(pair, seqs) {
        if (cJSON_GetArraySize(pair) != 2) continue;
        long first = (long)cJSON_GetArrayItem(pair, 0)->valuedouble, last = (long)cJSON_GetArrayItem(pair, 1)->valuedouble;
        step("ack", "[%ld, %ld]", first, last);
        if (first <= c->want_seq && c->want_seq <= last) c->seq_acked = 1;
    }
    cJSON_Delete(m);
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg) {
    struct ctx *c = obj;
    /* Only this device's exact topics: a broker may deliver others (docs/protocol.md). */
    if (strcmp(msg->topic, c->topic_desired) == 0) {
        cJSON *d = cJSON_ParseWithLength(msg->payload, msg->payloadlen);
        cJSON *release = cJSON_GetObjectItemCaseSensitive(d, "release_id");
        if (!cJSON_IsObject(d) || !(cJSON_IsNull(release) || cJSON_IsNumber(release))) {
            step("dropped", "a malformed desired message");
            cJSON_Delete(d);
            return;
        }
        cJSON_Delete(c->desired);
        c->desired = d;
    } else if (strcmp(msg->topic, c->topic_blocks) == 0) {
        on_blocks(c, msg->payload, msg->payloadlen, 0);
    } else if (c->stream_topic[0] && strcmp(msg->topic, c->stream_topic) == 0) {
        on_blocks(c, msg->payload, msg->payloadlen, 1);
    } else if (strcmp(msg->topic, c->topic_acks) == 0) {
        on_acks(c, msg->payload, msg->payloadlen);
    } else if (strcmp(msg->topic, c->topic_cert) == 0) {
        c->cert_messages++;
        step("cert", "the fleet offers a certificate of %d bytes", msg->payloadlen);
    } else {
        step("ignored", "a message on %s, not this device's", msg->topic);
    }
}

/* ---------------------------------------------------------------- fetch / blocks */

/* A whole small file by offset requests; NULL when the fleet says it has no such file. */
static unsigned char *fetch(struct ctx *c, const char *path, long *out_len) {
    unsigned char *file = NULL;
    long offset = 0, total = -1;
    while (total < 0 || offset < total) {
        int got = 0;
        for (int attempt = 0; attempt < TRIES && !got; attempt++) {
            char req[600];
            c->want_req++;
            snprintf(req, sizeof req, "{\"req\":%ld,\"path\":\"%s\",\"offset\":%ld,\"length\":%d}", c->want_req, path, offset, MAX_BLOCK);
            cJSON_Delete(c->reply_header);
            c->reply_header = NULL;
            publish(c, c->topic_fetch, req, 0);
            double deadline = now_s() + WAIT_S;
            while (!c->reply_header && now_s() < deadline) {
                int zero = 0;
                pump(c, &zero, 0.1);
            }
            got = c->reply_header != NULL;
        }
        if (!got) die("no reply from the fleet for %s after %d tries", path, TRIES);
        cJSON *err = cJSON_GetObjectItemCaseSensitive(c->reply_header, "error");
        if (err) {
            step("fetch", "%s: %s", path, cJSON_IsString(err) ? err->valuestring : "error");
            free(file);
            return NULL;
        }
        long r_offset = int_field(c->reply_header, "offset", "block header");
        long r_total = int_field(c->reply_header, "total", "block header");
        if (r_offset != offset) die("%s: the fleet answered offset %ld, asked %ld", path, r_offset, offset);
        if (r_total > MAX_FILE) die("length: %s is %ld bytes, more than %d", path, r_total, MAX_FILE);
        if (total >= 0 && r_total != total) die("%s changed size during the fetch (%ld, then %ld)", path, total, r_total);
        if (c->reply_len > MAX_BLOCK || r_offset + c->reply_len > r_total) die("%s: a block carries more than announced", path);
        if (c->reply_len == 0 && offset < r_total) die("%s: an empty block at %ld", path, offset);
        if (total < 0) { total = r_total; file = malloc(total + 1); }
        memcpy(file + offset, c->reply_data, c->reply_len);
        offset += c->reply_len;
    }
    file[total] = 0;
    if (offset != total) die("%s: got %ld bytes, the header said %ld", path, offset, total);
    step("fetch", "%s: %ld bytes, as the reply header said", path, total);
    *out_len = total;
    return file;
}

/* ---------------------------------------------------------------- TUF: canonical JSON, Ed25519 */

struct buf { char *p; size_t n, cap; };

static void put(struct buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) { b->cap = (b->n + n + 1) * 2; b->p = realloc(b->p, b->cap); }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static int by_key(const void *a, const void *b) {
    return strcmp((*(cJSON *const *)a)->string, (*(cJSON *const *)b)->string);
}

/* OLPC canonical JSON as securesystemslib writes it: keys sorted, no whitespace, integers only,
 * strings with only '"' and '\' escaped (other bytes as they are). */
static void canonical(struct buf *b, cJSON *v) {
    if (cJSON_IsNull(v)) put(b, "null", 4);
    else if (cJSON_IsTrue(v)) put(b, "true", 4);
    else if (cJSON_IsFalse(v)) put(b, "false", 5);
    else if (cJSON_IsNumber(v)) {
        char num[32];
        if (v->valuedouble != (double)(long long)v->valuedouble) die("canonical JSON has no floats");
        snprintf(num, sizeof num, "%lld", (long long)v->valuedouble);
        put(b, num, strlen(num));
    } else if (cJSON_IsString(v)) {
        put(b, "\"", 1);
        for (const char *s = v->valuestring; *s; s++) {
            if (*s == '"' || *s == '\\') put(b, "\\", 1);
            put(b, s, 1);
        }
        put(b, "\"", 1);
    } else if (cJSON_IsArray(v)) {
        cJSON *item;
        int first = 1;
        put(b, "[", 1);
        cJSON_ArrayForEach(item, v) { if (!first) put(b, ",", 1); first = 0; canonical(b, item); }
        put(b, "]", 1);
    } else if (cJSON_IsObject(v)) {
        int n = cJSON_GetArraySize(v), i = 0;
        cJSON **items = malloc(sizeof(cJSON *) * (n ? n : 1)), *item;
        cJSON_ArrayForEach(item, v) items[i++] = item;
        qsort(items, n, sizeof(cJSON *), by_key);
        put(b, "{", 1);
        for (i = 0; i < n; i++) {
            cJSON key = {0};
            key.type = cJSON_String;
            key.valuestring = items[i]->string;
            if (i) put(b, ",", 1);
            canonical(b, &key);
            put(b, ":", 1);
            canonical(b, items[i]);
        }
        put(b, "}", 1);
        free(items);
    } else die("canonical JSON: unsupported value");
}

static int unhex(const char *hex, unsigned char *out, size_t n) {
    if (strlen(hex) != 2 * n) return 0;
    for (size_t i = 0; i < n; i++) if (sscanf(hex + 2 * i, "%2hhx", &out[i]) != 1) return 0;
    return 1;
}

/* Check `md` (a whole metadata file) is signed by at least `threshold` distinct keys of `role` in
 * `root` (root metadata's "signed"), and is of type `role`; returns md's "signed". */
static cJSON *verify(cJSON *root_signed, cJSON *md, const char *role, const char *name) {
    cJSON *signed_ = cJSON_GetObjectItemCaseSensitive(md, "signed"), *sigs = cJSON_GetObjectItemCaseSensitive(md, "signatures");
    if (!cJSON_IsObject(signed_) || !cJSON_IsArray(sigs)) die("bad-metadata: %s is not TUF metadata", name);
    if (strcmp(str_field(signed_, "_type", name), role) != 0) die("bad-metadata: %s is not %s metadata", name, role);
    cJSON *role_obj = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root_signed, "roles"), role);
    cJSON *keyids = cJSON_GetObjectItemCaseSensitive(role_obj, "keyids"), *keys = cJSON_GetObjectItemCaseSensitive(root_signed, "keys");
    long threshold = int_field(role_obj, "threshold", "root roles");
    struct buf body = {0};
    canonical(&body, signed_);
    int good = 0;
    cJSON *keyid;
    cJSON_ArrayForEach(keyid, keyids) {  /* each trusted key counts once */
        cJSON *key = cJSON_GetObjectItemCaseSensitive(keys, keyid->valuestring), *sig;
        if (!key || strcmp(str_field(key, "keytype", "key"), "ed25519") || strcmp(str_field(key, "scheme", "key"), "ed25519")) continue;
        unsigned char pub[32], raw[64];
        if (!unhex(str_field(cJSON_GetObjectItemCaseSensitive(key, "keyval"), "public", "keyval"), pub, 32)) continue;
        cJSON_ArrayForEach(sig, sigs) {
            if (strcmp(str_field(sig, "keyid", "signature"), keyid->valuestring) || !unhex(str_field(sig, "sig", "signature"), raw, 64)) continue;
            EVP_PKEY *pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, 32);
            EVP_MD_CTX *mctx = EVP_MD_CTX_new();
            int ok = pkey && EVP_DigestVerifyInit(mctx, NULL, NULL, NULL, pkey) == 1 &&
                     EVP_DigestVerify(mctx, raw, 64, (unsigned char *)body.p, body.n) == 1;
            EVP_MD_CTX_free(mctx);
            EVP_PKEY_free(pkey);
            if (ok) { good++; break; }
        }
    }
    free(body.p);
    if (good < threshold) die("bad-signature: %s has %d valid %s signatures, %ld needed", name, good, role, threshold);
    char expires[32], now[32];
    time_t t = time(NULL);
    snprintf(expires, sizeof expires, "%s", str_field(signed_, "expires", name));
    strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    if (strcmp(expires, now) <= 0) die("expired: %s expired at %s", name, expires);
    return signed_;
}

static long meta_version(cJSON *signed_, const char *file, const char *name) {
    cJSON *meta = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(signed_, "meta"), file);
    if (!meta) die("bad-metadata: %s names no %s", name, file);
    return int_field(meta, "version", name);
}

/* Walk the metadata as docs/protocol.md says; returns the verified targets metadata's "signed". */
static cJSON *refresh_metadata(struct ctx *c, cJSON **keep) {
    char path[256], *pinned_path;
    long len;
    asprintf(&pinned_path, "%s/root.json", c->dir);
    cJSON *root = cJSON_Parse(read_file(pinned_path, NULL));
    cJSON *root_signed = verify(cJSON_GetObjectItemCaseSensitive(root, "signed"), root, "root", "the pinned root.json");
    for (;;) {  /* the root chain: N+1 until "not found", each signed by the old root and by itself */
        long next = int_field(root_signed, "version", "root") + 1;
        snprintf(path, sizeof path, "metadata/%ld.root.json", next);
        unsigned char *data = fetch(c, path, &len);
        if (!data) break;
        cJSON *newer = cJSON_ParseWithLength((char *)data, len);
        verify(root_signed, newer, "root", path);
        root_signed = verify(cJSON_GetObjectItemCaseSensitive(newer, "signed"), newer, "root", path);
        if (int_field(root_signed, "version", path) != next) die("bad-metadata: %s is not version %ld", path, next);
        root = newer;
    }
    step("root", "version %ld is the newest", int_field(root_signed, "version", "root"));
    unsigned char *data = fetch(c, "metadata/timestamp.json", &len);
    if (!data) die("the fleet has no metadata/timestamp.json");
    cJSON *timestamp = verify(root_signed, cJSON_ParseWithLength((char *)data, len), "timestamp", "timestamp.json");
    long snapshot_version = meta_version(timestamp, "snapshot.json", "timestamp.json");
    step("timestamp", "version %ld, snapshot version %ld", int_field(timestamp, "version", "timestamp"), snapshot_version);
    snprintf(path, sizeof path, "metadata/%ld.snapshot.json", snapshot_version);
    if (!(data = fetch(c, path, &len))) die("the fleet has no %s", path);
    cJSON *snapshot = verify(root_signed, cJSON_ParseWithLength((char *)data, len), "snapshot", path);
    if (int_field(snapshot, "version", path) != snapshot_version) die("bad-metadata: %s is not version %ld", path, snapshot_version);
    long targets_version = meta_version(snapshot, "targets.json", path);
    snprintf(path, sizeof path, "metadata/%ld.targets.json", targets_version);
    if (!(data = fetch(c, path, &len))) die("the fleet has no %s", path);
    cJSON *targets = verify(root_signed, cJSON_ParseWithLength((char *)data, len), "targets", path);
    if (int_field(targets, "version", path) != targets_version) die("bad-metadata: %s is not version %ld", path, targets_version);
    step("targets", "version %ld, %d targets signed", targets_version,
         cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(targets, "targets")));
    *keep = root;
    return targets;
}

/* ---------------------------------------------------------------- target streams */

static void download(struct ctx *c, cJSON *targets, const char *name, const char *profile) {
    cJSON *info = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(targets, "targets"), name);
    if (!info) die("unknown-target: %s is not in the signed targets metadata", name);
    long length = int_field(info, "length", name);
    const char *sha = str_field(cJSON_GetObjectItemCaseSensitive(info, "hashes"), "sha256", name);
    cJSON *custom = cJSON_GetObjectItemCaseSensitive(info, "custom");
    if (strcmp(str_field(custom, "profile", name), profile) != 0) die("wrong-profile: %s is for another profile", name);
    long blocks = (length + MAX_BLOCK - 1) / MAX_BLOCK;
    c->stream_total = length;
    c->stream_file = malloc(length ? length : 1);
    c->stream_have = calloc(blocks ? blocks : 1, 1);
    snprintf(c->stream_topic, sizeof c->stream_topic, "edgeops/v1/streams/%s", sha);
    c->pending_subacks++;
    mosquitto_subscribe(c->mosq, NULL, c->stream_topic, 1);
    int subscribed = 0;
    for (double deadline = now_s() + WAIT_S; c->pending_subacks > 0 && now_s() < deadline;) pump(c, &subscribed, 0.1);
    if (c->pending_subacks > 0) die("no SUBACK for %s", c->stream_topic);
    for (int silent = 0; silent < TRIES;) {
        long missing = 0;
        unsigned char *bitmap = calloc(blocks / 8 + 1, 1);
        for (long i = 0; i < blocks; i++) if (!c->stream_have[i]) { bitmap[i / 8] |= 1 << (i % 8); missing++; }
        if (!missing) { free(bitmap); break; }
        int bytes = (int)(blocks / 8 + 1);
        unsigned char *b64 = malloc(4 * (bytes / 3 + 1) + 1);
        EVP_EncodeBlock(b64, bitmap, bytes);
        free(bitmap);
        char *req;
        asprintf(&req, "{\"req\":%ld,\"path\":\"targets/%s.%s\",\"want\":\"%s\"}", ++c->want_req, sha, name, b64);
        publish(c, c->topic_fetch, req, 0);
        free(req);
        free(b64);
        c->stream_new = 0;
        double quiet = now_s() + 2.0;  /* ask again after 2 s without a new block */
        while (now_s() < quiet) {
            int before = c->stream_new, zero = 0;
            pump(c, &zero, 0.1);
            if (c->stream_new > before) quiet = now_s() + 2.0;
            int done = 1;
            for (long i = 0; i < blocks; i++) done &= c->stream_have[i];
            if (done) break;
        }
        silent = c->stream_new ? 0 : silent + 1;
    }
    for (long i = 0; i < blocks; i++) if (!c->stream_have[i]) die("no block of %s after %d silent rounds", name, TRIES);
    mosquitto_unsubscribe(c->mosq, NULL, c->stream_topic);
    c->stream_topic[0] = 0;
    unsigned char digest[32];
    char hex[65];
    EVP_Digest(c->stream_file, length, digest, NULL, EVP_sha256(), NULL);
    for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", digest[i]);
    if (strcmp(hex, sha) != 0) die("hash-mismatch: %s does not match its signed sha256", name);
    step("download", "%s: %ld bytes in %ld blocks, sha256 as signed", name, length, blocks);
}

/* ---------------------------------------------------------------- telemetry */

/* The next seq: strictly increasing and never reused, also across runs (kept in DEVICE_DIR). */
static long next_seq(struct ctx *c) {
    char *path;
    long last = 0;
    asprintf(&path, "%s/thirdparty-seq", c->dir);
    FILE *f = fopen(path, "r");
    if (f) { if (fscanf(f, "%ld", &last) != 1) last = 0; fclose(f); }
    f = fopen(path, "w");
    if (!f) die("cannot write %s", path);
    fprintf(f, "%ld\n", last + 1);
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    free(path);
    return last + 1;
}

static void send_batch(struct ctx *c, const char *what, const char *drops) {
    long seq = next_seq(c);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    char batch[1024];
    snprintf(batch, sizeof batch,
             "{\"device\":\"%s\",%s\"records\":[{\"seq\":%ld,\"kind\":\"inference\",\"t\":%ld.%03ld,"
             "\"body\":{\"model\":\"thirdparty\",\"version\":\"0.1.0\",\"latency_ms\":1.25,\"ok\":true}}]}",
             c->id, drops, seq, (long)tv.tv_sec, (long)tv.tv_usec / 1000);
    c->want_seq = seq;
    c->seq_acked = 0;
    for (int attempt = 0; attempt < TRIES && !c->seq_acked; attempt++) {  /* again after 10 s without an ack */
        publish(c, c->topic_telemetry, batch, 0);
        pump(c, &c->seq_acked, WAIT_S);
    }
    if (!c->seq_acked) die("the fleet did not acknowledge seq %ld", seq);
    step("telemetry", "%s batch with seq %ld acknowledged", what, seq);
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv) {
    struct ctx c = {0};
    int hold = 0, bad_batch = 0, want_download = 0;
    if (argc < 2) die("usage: edgeops-device DEVICE_DIR [--hold] [--bad-batch] [--download]");
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--hold")) hold = 1;
        else if (!strcmp(argv[i], "--bad-batch")) bad_batch = 1;
        else if (!strcmp(argv[i], "--download")) want_download = 1;
        else die("unknown option %s", argv[i]);
    }
    snprintf(c.dir, sizeof c.dir, "%s", argv[1]);
    char *path, *ca, *cert, *key, host[256];
    int port = 8883;
    asprintf(&path, "%s/device.json", c.dir);
    cJSON *device = cJSON_Parse(read_file(path, NULL));
    if (!cJSON_IsObject(device)) die("%s is not a JSON object", path);
    snprintf(c.id, sizeof c.id, "%s", str_field(device, "id", "device.json"));
    const char *profile = str_field(device, "profile", "device.json"), *broker = str_field(device, "broker", "device.json");
    cJSON *tls = cJSON_GetObjectItemCaseSensitive(device, "tls");
    asprintf(&ca, "%s/%s", c.dir, str_field(tls, "ca", "device.json tls"));
    asprintf(&cert, "%s/%s", c.dir, str_field(tls, "cert", "device.json tls"));
    asprintf(&key, "%s/%s", c.dir, str_field(tls, "key", "device.json tls"));
    if (sscanf(broker, "mqtts://%255[^:/]:%d", host, &port) < 1) die("broker %s is not mqtts://HOST[:PORT]", broker);
    const char *leaves[] = {"state", "fetch", "telemetry", "desired", "blocks", "acks", "cert"};
    char *topics[] = {c.topic_state, c.topic_fetch, c.topic_telemetry, c.topic_desired, c.topic_blocks, c.topic_acks, c.topic_cert};
    for (int i = 0; i < 7; i++) snprintf(topics[i], 160, "edgeops/v1/devices/%s/%s", c.id, leaves[i]);

    mosquitto_lib_init();
    char client_id[100], offline[200], online[600];
    snprintf(client_id, sizeof client_id, "edgeops-agent-%s", c.id);
    snprintf(offline, sizeof offline, "{\"device\":\"%s\",\"online\":false}", c.id);
    c.mosq = mosquitto_new(client_id, false /* persistent session */, &c);
    mosquitto_int_option(c.mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(c.mosq, MOSQ_OPT_TCP_NODELAY, 1);
    if (mosquitto_will_set(c.mosq, c.topic_state, (int)strlen(offline), offline, 1, true)) die("cannot set the will");
    if (mosquitto_tls_set(c.mosq, ca, NULL, cert, key, NULL)) die("cannot load the TLS files of %s", c.dir);
    if (mosquitto_tls_opts_set(c.mosq, 1 /* verify the broker */, "tlsv1.2" /* 1.2 or newer */, NULL)) die("TLS options");
    mosquitto_tls_insecure_set(c.mosq, false);  /* check the broker's host name */
    mosquitto_connect_callback_set(c.mosq, on_connect);
    mosquitto_subscribe_callback_set(c.mosq, on_subscribe);
    mosquitto_publish_callback_set(c.mosq, on_publish);
    mosquitto_message_callback_set(c.mosq, on_message);
    int rc = mosquitto_connect(c.mosq, host, port, 30);
    if (rc != MOSQ_ERR_SUCCESS) die("cannot connect to %s: %s", broker, rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
    if (!pump(&c, &c.connected, WAIT_S)) die("no CONNACK from %s", broker);
    int subscribed = 0;
    for (double deadline = now_s() + WAIT_S; c.pending_subacks > 0 && now_s() < deadline;) pump(&c, &subscribed, 0.1);
    if (c.pending_subacks > 0) die("no SUBACK from %s", broker);
    step("connected", "%s as %s over TLS", broker, c.id);

    snprintf(online, sizeof online, "{\"device\":\"%s\",\"online\":true,\"profile\":\"%s\",\"installed\":null,\"execution\":null}",
             c.id, profile);
    publish_state(&c, online);
    step("state", "%s", online);

    int have_desired = 0;
    for (double deadline = now_s() + WAIT_S; !c.desired && now_s() < deadline;) pump(&c, &have_desired, 0.1);
    if (!c.desired) die("no desired message within %.0f s", WAIT_S);
    char *desired_text = cJSON_PrintUnformatted(c.desired);
    step("desired", "%s", desired_text);

    cJSON *root;
    cJSON *targets = refresh_metadata(&c, &root);
    cJSON *target = cJSON_GetObjectItemCaseSensitive(c.desired, "target");
    if (want_download && cJSON_IsString(target)) download(&c, targets, target->valuestring, profile);

    send_batch(&c, "a", "\"dropped\":0,\"drop_watermark\":0,\"dropped_unsequenced\":0,");
    if (bad_batch) send_batch(&c, "a malformed (no 'dropped')", "");

    if (hold) {  /* until a line or EOF on stdin, still answering the broker */
        step("holding", "until a line on stdin");
        struct pollfd in = {0, POLLIN, 0};
        int line = 0;
        while (!line) {
            pump(&c, &line, 0.1);
            if (poll(&in, 1, 0) > 0) line = 1;
        }
    }
    publish_state(&c, offline);  /* a graceful stop says what the will would */
    step("state", "%s", offline);
    mosquitto_disconnect(c.mosq);
    for (int i = 0; i < 10 && mosquitto_loop(c.mosq, 100, 1) == MOSQ_ERR_SUCCESS; i++) {}
    mosquitto_destroy(c.mosq);
    mosquitto_lib_cleanup();
    step("done", "disconnected");
    return 0;
}
