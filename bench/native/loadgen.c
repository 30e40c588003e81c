/* loadgen.c - single-threaded epoll load generator for the lbproxy benchmark.
 * Derived from perf-baseline/loadgen.c.  Target is 127.0.0.1 only.
 *
 *   loadgen -m MODE -p PORT [-c CONNS] [-s SIZE] [-d SECS] [-n DEPTH] [-u PATH]
 *           [-W WARMUP] [-P PHASES] [-k CONCURRENCY] [-T ALARM] [-b BACKOFF_MS] [-R SECS]
 *           [-r PACE_MS]
 *
 * Modes (all websocket modes use binary frames, masked with a random key per connection):
 *   echo     closed loop on CONNS websockets: DEPTH messages of SIZE bytes in flight each;
 *            a message counts when its full echo came back (latency = round trip).
 *   tcp      the same over raw TCP (no handshake).
 *   http     closed loop of keep-alive "GET PATH" requests on CONNS connections, one in
 *            flight each; a request counts when its whole response (Content-Length) is in.
 *   connect  CONNS concurrent slots, each repeating: connect, websocket handshake, one SIZE
 *            message and its echo, close frame (1000), wait for the server's close frame and
 *            its FIN, close; latency = the whole cycle.
 *   idle     open CONNS websockets (handshake + one SIZE exchange each) in PHASES equal
 *            batches, at most CONCURRENCY opening at a time; after each batch print
 *            "PHASE k OPEN n ERRORS e" and wait for a line on stdin; then close everything.
 *   storm    open CONNS websockets like idle; print "OPEN n ERRORS e"; wait for a line;
 *            close them all; print "CLOSED"; wait for a line; then reconnect all CONNS at
 *            once (each: handshake + one exchange; a failed attempt is retried after
 *            10-100 ms); latency = time from the storm start to that client's echo.
 *   failover CONNS websockets in a closed echo loop (like echo, depth 1) through a proxy to two
 *            backends that name themselves in the 101 ("X-Bench-Backend: ID", backend -i).
 *            Once every client has echoed and WARMUP has passed: print "READY echoing on1 on2".
 *            The driver writes "KILL ID PID" on stdin: the generator takes t_kill, counts the
 *            clients on each backend, then sends SIGKILL to PID (the backend with that ID).
 *            With -r PACE_MS each client sends its next message PACE_MS after it sent the
 *            previous one (or at once, if the echo came back later): a paced load that
 *            leaves every proxy CPU to spare, so that recover_s measures the failover rather
 *            than which proxy's echo traffic leaves more CPU to the reconnects; without -r,
 *            a closed loop (the next message as soon as the echo is back).
 *            A client whose connection closes reconnects after a
 *            jittered exponential backoff (attempt n waits U(0.5, 1) x min(1 s, BACKOFF_MS x
 *            2^(n-1))).  The run ends SECS after the kill once every client echoes again, or at
 *            RECOVER_TIMEOUT (-R) after the kill; then no new message is sent and outstanding
 *            echoes get up to 2 s (DRAIN_S) to come back.  Extra RESULT fields, exactly:
 *              recover_s: t_kill -> the moment the last client got the echo of a message it
 *                sent after t_kill (-1 if not every client did before RECOVER_TIMEOUT);
 *              recover_p50_s: the median of that time over the clients of the killed backend
 *                (-1 if none recovered);
 *              failed_handshakes: reconnect attempts after t_kill that did not end in a 101
 *                (= hs_5xx + hs_other_status + hs_resets: a 5xx, another status, or a reset /
 *                EOF / connect error before the response head);
 *              in_flight_at_kill: messages sent and not answered on connections to the killed
 *                backend when those closed (lost with the backend, not by the proxy);
 *              lost_echoes: messages sent and never answered on a connection to a backend that
 *                stayed alive: still outstanding DRAIN_S after the last send on a connection
 *                that stayed up to the end, or outstanding when the proxy closed such a
 *                connection (those closes are also counted in survivor_closed);
 *              on_killed / on_survivor: clients echoing on each backend at t_kill;
 *              killed_closed: connections to the killed backend closed; reconnected: 101s
 *                after t_kill; recovered: clients echoing again.
 * Timed modes print "MEASURE_START" and "MEASURE_END" around the measurement window.
 * Every mode ends with one line "RESULT {json}".  Build: gcc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---------- log-linear latency histogram (microseconds, <0.1% resolution) ---------- */
#define HLIN 2048
#define HSUB 1024
#define HBUCKETS (HLIN + 30 * HSUB)
static uint64_t hist[HBUCKETS];
static uint64_t hist_n = 0, hist_max = 0;

static void hist_add(double secs) {
    uint64_t v = secs <= 0 ? 0 : (uint64_t)(secs * 1e6);
    size_t idx;
    if (v < HLIN) idx = (size_t)v;
    else {
        int e = 63 - __builtin_clzll(v); /* >= 11 */
        idx = HLIN + (size_t)(e - 11) * HSUB + (size_t)((v >> (e - 10)) & (HSUB - 1));
        if (idx >= HBUCKETS) idx = HBUCKETS - 1;
    }
    hist[idx]++; hist_n++;
    if (v > hist_max) hist_max = v;
}
static uint64_t bucket_value(size_t idx) {
    if (idx < HLIN) return idx;
    size_t e = 11 + (idx - HLIN) / HSUB, sub = (idx - HLIN) % HSUB;
    return (uint64_t)(HSUB + sub) << (e - 10);
}
static uint64_t hist_quantile(double q) {
    if (!hist_n) return 0;
    uint64_t want = (uint64_t)(q * (double)hist_n + 0.5), cum = 0;
    if (want < 1) want = 1;
    for (size_t i = 0; i < HBUCKETS; i++) { cum += hist[i]; if (cum >= want) return bucket_value(i); }
    return hist_max;
}

/* ---------- connections ---------- */
enum { S_IDLE_SLOT, S_CONNECTING, S_HS, S_RUN, S_HTTP, S_ECHO1, S_CLOSING, S_WAIT_EOF, S_OPEN, S_DEAD };
enum { M_ECHO, M_TCP, M_HTTP, M_CONNECT, M_IDLE, M_STORM, M_FAILOVER };

typedef struct conn {
    int fd, state, want_out, attempts;
    unsigned char mask[4];
    unsigned char *msg; size_t msglen, echolen; /* echo mode: one message as sent, bytes back */
    size_t sendoff; uint64_t to_send, rx_bytes;
    double t_sent[64]; unsigned head, tail;
    const unsigned char *out; size_t outlen, outoff; /* pending small write */
    char rb[1024]; size_t rblen;                   /* handshake / response head */
    size_t body_left;                              /* http body bytes still expected */
    double t_start, retry_at, next_send; /* failover -r: when the next message is due */
    int backend_id, recovered; /* failover: backend named in the 101; echoing again after kill */
    int hs_status;             /* failover: this attempt's non-101 status was counted */
    int was_killed;            /* failover: its connection to the killed backend closed */
    uint64_t echoes;
} conn;

static int epfd, mode = M_ECHO, measuring = 0, port = 0, depth = 1;
static size_t size = 100;
static const char *path = "/";
static struct sockaddr_in addr;
static uint64_t ops = 0, errors = 0, dropped = 0;
static double t_end = 0, storm_t0 = 0, storm_last = 0;
static int opened = 0, pending_open = 0;
static unsigned char rbuf[1 << 20];
static char upgrade_req[512], http_req[512];
static int upgrade_len, http_len;
static unsigned char *payload;
static unsigned char small_frame[2 + 4 + 125], close_frame[2 + 4 + 2];
static size_t small_len;
/* failover counters (see the header for their exact meaning) */
#define DRAIN_S 2.0
static double t_kill = 0, t_recovered = 0, backoff_s = 0.05, pace_s = 0;
static int killed_id = 0, stopping = 0, stdin_eof = 0, recovered = 0;
static uint64_t failed_handshakes = 0, hs_5xx = 0, hs_other = 0, hs_resets = 0, lost_echoes = 0;
static uint64_t in_flight_at_kill = 0, survivor_closed = 0, killed_closed = 0, reconnected = 0;
static int on_killed = 0, on_survivor = 0;
static char extra_json[1024] = "";
static conn *all_conns; /* failover: every client, for the counts taken at the kill */
static int all_n;
static double *killed_recovery; /* failover: t_kill -> echoing again, per client of the killed backend */
static int killed_recovered = 0;

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static void say(const char *s) { fputs(s, stdout); fputc('\n', stdout); fflush(stdout); }
static int wait_line(void) { char line[64]; return fgets(line, sizeof line, stdin) != NULL; }

static void set_out(conn *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}
static void drop_fd(conn *c) {
    if (c->fd >= 0) { epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); c->fd = -1; }
}
static int start_conn(conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    int one = 1; setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->rblen = 0; c->rx_bytes = 0; c->outlen = c->outoff = 0; c->want_out = 1;
    c->state = S_CONNECTING; c->t_start = now();
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd); c->fd = -1; return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}
/* small writes (requests, frames): -1 error, 0 done, 1 pending */
static int send_small(conn *c, const void *p, size_t n) {
    c->out = p; c->outlen = n; c->outoff = 0;
    while (c->outoff < c->outlen) {
        ssize_t w = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EINTR) continue; if (errno == EAGAIN) { set_out(c, 1); return 1; } return -1; }
        c->outoff += (size_t)w;
    }
    c->outlen = c->outoff = 0; set_out(c, 0);
    return 0;
}

static void fail(conn *c);

/* ---------- echo / tcp: closed loop of DEPTH messages ---------- */
static void build_msg(conn *c) {
    if (mode == M_TCP) { c->msg = payload; c->msglen = size; c->echolen = size; return; }
    size_t hl = size < 126 ? 2 : size < 65536 ? 4 : 10;
    c->msglen = hl + 4 + size; c->msg = malloc(c->msglen);
    c->msg[0] = 0x82;
    if (size < 126) c->msg[1] = 0x80 | (unsigned char)size;
    else if (size < 65536) { c->msg[1] = 0x80 | 126; c->msg[2] = (unsigned char)(size >> 8); c->msg[3] = (unsigned char)size; }
    else { c->msg[1] = 0x80 | 127; for (int k = 0; k < 8; k++) c->msg[2 + k] = (unsigned char)((uint64_t)size >> (56 - 8 * k)); }
    memcpy(c->msg + hl, c->mask, 4);
    for (size_t k = 0; k < size; k++) c->msg[hl + 4 + k] = payload[k] ^ c->mask[k & 3];
    c->echolen = hl + size;
}
static void pump_send(conn *c) {
    while (c->to_send) {
        if (c->sendoff == 0) c->t_sent[c->head & 63] = now();
        ssize_t w = send(c->fd, c->msg + c->sendoff, c->msglen - c->sendoff, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EAGAIN) { set_out(c, 1); return; } if (errno == EINTR) continue; fail(c); return; }
        if (c->sendoff == 0) c->head++; /* in flight from its first byte on */
        c->sendoff += (size_t)w;
        if (c->sendoff == c->msglen) { c->sendoff = 0; c->to_send--; }
        else { set_out(c, 1); return; }
    }
    set_out(c, 0);
}
static void echo_data(conn *c, size_t n) {
    c->rx_bytes += n;
    while (c->rx_bytes >= c->echolen) {
        c->rx_bytes -= c->echolen;
        double t = now(), sent = c->t_sent[c->tail & 63];
        if (measuring) { ops++; hist_add(t - sent); }
        c->tail++; c->echoes++;
        if (t_kill > 0 && sent >= t_kill && !c->recovered) {
            c->recovered = 1; recovered++; t_recovered = t;
            if (c->was_killed && killed_recovered < all_n) killed_recovery[killed_recovered++] = t - t_kill;
        }
        if (stopping) continue;
        if (pace_s > 0) c->next_send = sent + pace_s; /* paced: paced_sends() sends it */
        else c->to_send++;
    }
    if (c->to_send) pump_send(c);
}

/* ---------- http: keep-alive requests ---------- */
static void http_send(conn *c) {
    c->state = S_HTTP; c->rblen = 0; c->body_left = 0; c->t_start = now();
    if (send_small(c, http_req, (size_t)http_len) < 0) fail(c);
}
static void http_data(conn *c, const unsigned char *p, size_t n) {
    while (n) {
        if (c->body_left == 0) { /* reading a head */
            size_t cp = n < sizeof c->rb - 1 - c->rblen ? n : sizeof c->rb - 1 - c->rblen;
            memcpy(c->rb + c->rblen, p, cp); c->rblen += cp; c->rb[c->rblen] = 0;
            char *end = strstr(c->rb, "\r\n\r\n");
            if (!end) { if (c->rblen >= sizeof c->rb - 1) fail(c); return; }
            size_t hlen = (size_t)(end + 4 - c->rb), used = hlen - (c->rblen - cp);
            p += used; n -= used;
            if (strncmp(c->rb, "HTTP/1.1 200", 12) != 0) { fprintf(stderr, "http: %.60s\n", c->rb); fail(c); return; }
            char *cl = strcasestr(c->rb, "\r\nContent-Length:");
            if (!cl || cl > end) { fprintf(stderr, "http: no Content-Length\n"); fail(c); return; }
            c->body_left = (size_t)strtoull(cl + 17, NULL, 10);
            c->rblen = 0;
            if (c->body_left == 0) c->body_left = (size_t)-1; /* marker: complete now */
        }
        if (c->body_left != (size_t)-1) {
            size_t take = n < c->body_left ? n : c->body_left;
            c->body_left -= take; p += take; n -= take;
            if (c->body_left) return;
        }
        c->body_left = 0;
        if (measuring) { ops++; hist_add(now() - c->t_start); }
        if (n) { fail(c); return; } /* bytes beyond the response: nothing was pipelined */
        if (measuring || t_end == 0 || now() < t_end) http_send(c);
        return;
    }
}

/* ---------- websocket handshake and the single-exchange modes ---------- */
static void after_connect(conn *c) {
    int err = 0; socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) { fail(c); return; }
    if (mode == M_TCP) { c->state = S_RUN; c->to_send = (uint64_t)depth; pump_send(c); return; }
    if (mode == M_HTTP) { http_send(c); return; }
    c->state = S_HS;
    if (send_small(c, upgrade_req, (size_t)upgrade_len) < 0) fail(c);
}
static void got_open(conn *c) {
    c->state = S_OPEN; opened++; pending_open--;
    double t = now();
    if (mode == M_STORM && storm_t0 > 0) { hist_add(t - storm_t0); storm_last = t; ops++; }
    else if (mode == M_IDLE) hist_add(t - c->t_start);
}
static void frames_data(conn *c, size_t n) {
    c->rx_bytes += n;
    if (c->state == S_ECHO1 && c->rx_bytes >= 2 + size) {
        c->rx_bytes -= 2 + size;
        if (mode != M_CONNECT) { got_open(c); return; }
        c->state = S_CLOSING;
        if (send_small(c, close_frame, sizeof close_frame) < 0) { fail(c); return; }
    }
    if (c->state == S_CLOSING && c->rx_bytes >= 4) c->state = S_WAIT_EOF;
}
static void hs_data(conn *c, const unsigned char *p, size_t n) {
    size_t cp = n < sizeof c->rb - 1 - c->rblen ? n : sizeof c->rb - 1 - c->rblen;
    memcpy(c->rb + c->rblen, p, cp); c->rblen += cp; c->rb[c->rblen] = 0;
    char *end = strstr(c->rb, "\r\n\r\n");
    if (!end) { if (c->rblen >= sizeof c->rb - 1) fail(c); return; }
    if (strncmp(c->rb, "HTTP/1.1 101", 12) != 0) {
        if (errors + failed_handshakes < 5) fprintf(stderr, "handshake failed: %.60s\n", c->rb);
        if (mode == M_FAILOVER && t_kill > 0) { c->hs_status = 1; if (c->rb[9] == '5') hs_5xx++; else hs_other++; }
        fail(c); return;
    }
    size_t extra = c->rblen - (size_t)(end + 4 - c->rb) + (n - cp);
    if (mode == M_FAILOVER) {
        char *id = strcasestr(c->rb, "\r\nX-Bench-Backend:");
        c->backend_id = id && id < end ? atoi(id + 19) : 0;
        c->attempts = 0; if (t_kill > 0) reconnected++;
        c->head = c->tail = 0; c->sendoff = 0; c->rx_bytes = 0;
        c->state = S_RUN; c->to_send = stopping ? 0 : 1; pump_send(c);
        if (c->fd >= 0 && extra) echo_data(c, extra);
        return;
    }
    if (mode == M_ECHO) { c->state = S_RUN; c->to_send = (uint64_t)depth; pump_send(c); if (extra) echo_data(c, extra); return; }
    c->state = S_ECHO1;
    if (send_small(c, small_frame, small_len) < 0) { fail(c); return; }
    if (extra) frames_data(c, extra);
}

/* ---------- failure / retry policy per mode ---------- */
/* failover: a connection closed or failed; account for it, reconnect after a jittered backoff */
static void failover_closed(conn *c) {
    uint64_t inflight = c->head - c->tail;
    if (c->state == S_RUN && t_kill > 0 && c->backend_id == killed_id) { killed_closed++; in_flight_at_kill += inflight; c->was_killed = 1; }
    else if (c->state == S_RUN && t_kill > 0) { survivor_closed++; lost_echoes += inflight; }
    else if (t_kill > 0) { failed_handshakes++; if (!c->hs_status) hs_resets++; }
    else errors++; /* before the kill: the proxy failed a client with both backends up */
    drop_fd(c);
    c->head = c->tail = 0; c->to_send = 0; c->sendoff = 0; c->rx_bytes = 0; c->rblen = 0; c->hs_status = 0;
    c->next_send = 0;
    int n = c->attempts < 5 ? c->attempts : 5; /* attempts since the last 101; 1 s cap below */
    double delay = backoff_s * (double)(1 << n);
    if (delay > 1.0) delay = 1.0;
    c->state = S_IDLE_SLOT; c->retry_at = now() + delay * (0.5 + 0.5 * (rand() / (double)RAND_MAX));
}
static void fail(conn *c) {
    if (c->state == S_DEAD) return;
    if (mode == M_FAILOVER) { failover_closed(c); return; }
    errors++;
    drop_fd(c);
    if (mode == M_CONNECT) { c->state = S_IDLE_SLOT; c->retry_at = now(); return; }
    if ((mode == M_IDLE || mode == M_STORM) && c->state != S_OPEN && c->attempts < 20) {
        c->state = S_IDLE_SLOT; c->retry_at = now() + 0.01 + (rand() % 90) / 1000.0; return;
    }
    if (c->state != S_OPEN && (mode == M_IDLE || mode == M_STORM)) pending_open--;
    c->state = S_DEAD;
}
static void connect_cycle_done(conn *c) {
    drop_fd(c);
    if (measuring) { ops++; hist_add(now() - c->t_start); }
    c->state = S_IDLE_SLOT; c->retry_at = now();
}
static void on_eof(conn *c) {
    if (c->state == S_WAIT_EOF) { connect_cycle_done(c); return; }
    if (c->state == S_OPEN) { dropped++; drop_fd(c); c->state = S_DEAD; return; }
    fail(c);
}

static void on_event(conn *c, uint32_t e) {
    if (c->state == S_CONNECTING) {
        if (e & (EPOLLERR | EPOLLHUP)) { fail(c); return; }
        if (e & EPOLLOUT) after_connect(c);
        return;
    }
    if (e & EPOLLIN) {
        for (;;) {
            ssize_t r = recv(c->fd, rbuf, sizeof rbuf, 0);
            if (r == 0) { on_eof(c); return; }
            if (r < 0) { if (errno != EAGAIN && errno != EINTR) on_eof(c); break; }
            switch (c->state) {
            case S_HS: hs_data(c, rbuf, (size_t)r); break;
            case S_RUN: echo_data(c, (size_t)r); break;
            case S_HTTP: http_data(c, rbuf, (size_t)r); break;
            case S_ECHO1: case S_CLOSING: frames_data(c, (size_t)r); break;
            default: break; /* S_WAIT_EOF / S_OPEN: ignore stray bytes */
            }
            if (c->fd < 0 || (size_t)r < sizeof rbuf) break;
        }
    }
    if (c->fd < 0) return;
    if (e & EPOLLOUT) {
        if (c->state == S_RUN) pump_send(c);
        else if (!c->outlen) set_out(c, 0);
        else if (send_small(c, c->out + c->outoff, c->outlen - c->outoff) < 0) fail(c);
    }
    if (c->fd >= 0 && (e & (EPOLLERR | EPOLLHUP)) && !(e & EPOLLIN)) on_eof(c);
}

/* failover: the driver's "KILL ID PID" line on stdin (EOF: the driver is gone, stop) */
static void on_stdin(void) {
    char line[64];
    ssize_t r = read(0, line, sizeof line - 1);
    if (r <= 0) { stdin_eof = 1; epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL); return; }
    line[r] = 0;
    int pid = 0;
    if (t_kill > 0 || sscanf(line, "KILL %d %d", &killed_id, &pid) != 2 || pid <= 0) return;
    t_kill = now();
    for (int i = 0; i < all_n; i++) {
        conn *c = &all_conns[i];
        c->recovered = 0;
        if (c->state == S_RUN) { if (c->backend_id == killed_id) on_killed++; else on_survivor++; }
    }
    /* the kill itself comes after t_kill and the counts: no close can be seen "before" it */
    if (kill((pid_t)pid, SIGKILL) != 0) perror("kill");
}

static void poll_once(int timeout_ms) {
    static struct epoll_event evs[1024];
    int n = epoll_wait(epfd, evs, 1024, timeout_ms);
    for (int i = 0; i < n; i++) {
        conn *c = evs[i].data.ptr;
        if (!c) { on_stdin(); continue; }
        if (c->fd >= 0) on_event(c, evs[i].events);
    }
}

/* (re)start slots whose retry time has come; at most `limit` connecting at once */
static void launch(conn *cs, int from, int to, int limit, int *in_flight_open) {
    double t = now();
    for (int i = from; i < to; i++) {
        conn *c = &cs[i];
        if (c->state != S_IDLE_SLOT || c->retry_at > t) continue;
        if (limit && *in_flight_open >= limit) return;
        c->attempts++;
        if (start_conn(c) == 0) { (*in_flight_open)++; continue; }
        if (mode == M_FAILOVER && t_kill > 0) { failed_handshakes++; hs_resets++; } else errors++;
        c->retry_at = t + 0.05;
        if ((mode == M_IDLE || mode == M_STORM) && c->attempts >= 20) { c->state = S_DEAD; pending_open--; }
    }
}

static int count_state(conn *cs, int n, int st) {
    int k = 0;
    for (int i = 0; i < n; i++) k += cs[i].state == st;
    return k;
}

/* open cs[from..to) (idle/storm), bounded concurrency; returns when all are open or dead */
static void open_batch(conn *cs, int from, int to, int conc, double deadline) {
    for (int i = from; i < to; i++) { cs[i].state = S_IDLE_SLOT; cs[i].retry_at = 0; cs[i].attempts = 0; }
    pending_open += to - from;
    while (pending_open > 0 && now() < deadline) {
        int busy = 0;
        for (int i = from; i < to; i++) busy += cs[i].state != S_IDLE_SLOT && cs[i].state != S_OPEN && cs[i].state != S_DEAD;
        launch(cs, from, to, conc, &busy);
        poll_once(5);
    }
}

static void print_result(double secs, int nconn) {
    printf("RESULT {\"mode\":\"%s\",\"conns\":%d,\"size\":%zu,\"depth\":%d,\"secs\":%.4f,\"ops\":%llu,"
           "\"ops_per_s\":%.1f,\"payload_mb_per_s\":%.2f,\"errors\":%llu,\"dropped\":%llu,\"opened\":%d,"
           "\"p50_us\":%llu,\"p90_us\":%llu,\"p99_us\":%llu,\"p999_us\":%llu,\"max_us\":%llu,%s\"cdf\":[",
           (const char *[]){"echo", "tcp", "http", "connect", "idle", "storm", "failover"}[mode], nconn, size, depth,
           secs, (unsigned long long)ops, secs > 0 ? (double)ops / secs : 0.0,
           secs > 0 ? (double)ops * (double)size / secs / 1e6 : 0.0, (unsigned long long)errors,
           (unsigned long long)dropped, opened, (unsigned long long)hist_quantile(0.5),
           (unsigned long long)hist_quantile(0.9), (unsigned long long)hist_quantile(0.99),
           (unsigned long long)hist_quantile(0.999), (unsigned long long)hist_max, extra_json);
    static const double qs[] = {0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                                0.98, 0.99, 0.995, 0.999, 1.0};
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++)
        printf("%s[%.3f,%llu]", i ? "," : "", qs[i], (unsigned long long)(qs[i] >= 1.0 ? hist_max : hist_quantile(qs[i])));
    printf("]}\n");
    fflush(stdout);
}

static void run_timed(conn *cs, int nconn, double warmup, double dur) {
    for (int i = 0; i < nconn; i++) { cs[i].state = S_IDLE_SLOT; cs[i].retry_at = 0; }
    int zero = 0;
    launch(cs, 0, nconn, 0, &zero);
    double t0 = now(), t_meas = 0;
    if (mode == M_CONNECT) { measuring = 1; t_meas = t0; t_end = t0 + dur; say("MEASURE_START"); }
    for (;;) {
        double t = now();
        if (!measuring) {
            int ready = count_state(cs, nconn, S_RUN) + count_state(cs, nconn, S_HTTP);
            int dead = count_state(cs, nconn, S_DEAD);
            if ((ready + dead >= nconn && t - t0 >= warmup) || t - t0 > 10 + warmup) {
                measuring = 1; t_meas = now(); t_end = t_meas + dur; say("MEASURE_START");
            }
        }
        if (measuring && t >= t_end) break;
        if (mode == M_CONNECT) launch(cs, 0, nconn, 0, &zero);
        poll_once(mode == M_CONNECT ? 1 : 20);
    }
    double el = now() - t_meas;
    measuring = 0;
    say("MEASURE_END");
    print_result(el, nconn);
}

static void run_idle(conn *cs, int nconn, int phases, int conc) {
    int per = nconn / phases;
    double t0 = now();
    for (int ph = 1; ph <= phases; ph++) {
        int to = ph == phases ? nconn : ph * per;
        open_batch(cs, (ph - 1) * per, to, conc, now() + 120);
        poll_once(0);
        printf("PHASE %d OPEN %d ERRORS %llu DROPPED %llu\n", ph, count_state(cs, nconn, S_OPEN),
               (unsigned long long)errors, (unsigned long long)dropped);
        fflush(stdout);
        if (!wait_line()) break;
    }
    poll_once(0);
    opened = count_state(cs, nconn, S_OPEN);
    ops = (uint64_t)opened;
    double el = now() - t0;
    for (int i = 0; i < nconn; i++) drop_fd(&cs[i]);
    print_result(el, nconn);
}

static void run_storm(conn *cs, int nconn, int conc) {
    open_batch(cs, 0, nconn, conc, now() + 120);
    printf("OPEN %d ERRORS %llu\n", count_state(cs, nconn, S_OPEN), (unsigned long long)errors);
    fflush(stdout);
    if (!wait_line()) return;
    for (int i = 0; i < nconn; i++) drop_fd(&cs[i]);
    say("CLOSED");
    if (!wait_line()) return;
    memset(hist, 0, sizeof hist); hist_n = hist_max = 0;
    errors = 0; dropped = 0; opened = 0; ops = 0; pending_open = 0;
    storm_t0 = now();
    open_batch(cs, 0, nconn, 0, storm_t0 + 60); /* no concurrency limit: all at once */
    poll_once(0);
    double el = (storm_last > 0 ? storm_last : now()) - storm_t0;
    say("STORM_DONE");
    opened = count_state(cs, nconn, S_OPEN);
    for (int i = 0; i < nconn; i++) drop_fd(&cs[i]);
    print_result(el, nconn);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* failover: see the header.  post = seconds after the kill, recover_timeout = the hard limit */
/* failover -r: send the next message of every echoing client whose time has come */
static void paced_sends(conn *cs, int nconn) {
    double t = now();
    for (int i = 0; i < nconn; i++) {
        conn *c = &cs[i];
        if (c->state != S_RUN || c->next_send <= 0 || c->next_send > t || c->head != c->tail) continue;
        c->next_send = 0; c->to_send++; pump_send(c);
    }
}

static void run_failover(conn *cs, int nconn, int conc, double warmup, double post, double recover_timeout) {
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    for (int i = 0; i < nconn; i++) { cs[i].state = S_IDLE_SLOT; cs[i].retry_at = 0; }
    double t0 = now(), t_ready = 0;
    all_conns = cs; all_n = nconn;
    killed_recovery = calloc((size_t)nconn, sizeof *killed_recovery);
    while (!stdin_eof) {
        double t = now();
        if (t_ready == 0) {
            int echoing = 0, on1 = 0;
            for (int i = 0; i < nconn; i++) if (cs[i].state == S_RUN && cs[i].echoes > 0) { echoing++; on1 += cs[i].backend_id == 1; }
            if ((echoing == nconn && t - t0 >= warmup) || t - t0 > 60) {
                t_ready = t; measuring = 1;
                printf("READY %d %d %d\n", echoing, on1, echoing - on1); fflush(stdout);
            }
        }
        if (t_kill > 0 && ((recovered == nconn && t >= t_kill + post) || t >= t_kill + recover_timeout)) break;
        int busy = 0;
        for (int i = 0; i < nconn; i++) busy += cs[i].state == S_CONNECTING || cs[i].state == S_HS;
        launch(cs, 0, nconn, conc, &busy);
        if (pace_s > 0 && !stopping) paced_sends(cs, nconn);
        poll_once(pace_s > 0 ? 1 : 5);
    }
    double t_stop = now();
    stopping = 1; measuring = 0;
    for (;;) { /* no new sends; outstanding echoes on open connections get DRAIN_S */
        uint64_t out = 0;
        for (int i = 0; i < nconn; i++) if (cs[i].state == S_RUN) out += cs[i].head - cs[i].tail;
        if (out == 0 || now() >= t_stop + DRAIN_S) { lost_echoes += out; break; }
        poll_once(5);
    }
    double rec = recovered == nconn && t_kill > 0 ? t_recovered - t_kill : -1;
    qsort(killed_recovery, (size_t)killed_recovered, sizeof *killed_recovery, cmp_double);
    double rec_p50 = killed_recovered ? killed_recovery[killed_recovered / 2] : -1;
    snprintf(extra_json, sizeof extra_json,
             "\"recover_s\":%.4f,\"recover_p50_s\":%.4f,\"failed_handshakes\":%llu,\"hs_5xx\":%llu,\"hs_other_status\":%llu,"
             "\"hs_resets\":%llu,\"lost_echoes\":%llu,\"in_flight_at_kill\":%llu,\"survivor_closed\":%llu,"
             "\"killed_closed\":%llu,\"reconnected\":%llu,\"recovered\":%d,\"on_killed\":%d,\"on_survivor\":%d,"
             "\"killed\":%d,",
             rec, rec_p50, (unsigned long long)failed_handshakes, (unsigned long long)hs_5xx, (unsigned long long)hs_other,
             (unsigned long long)hs_resets, (unsigned long long)lost_echoes, (unsigned long long)in_flight_at_kill,
             (unsigned long long)survivor_closed, (unsigned long long)killed_closed, (unsigned long long)reconnected,
             recovered, on_killed, on_survivor, t_kill > 0);
    opened = count_state(cs, nconn, S_RUN);
    for (int i = 0; i < nconn; i++) drop_fd(&cs[i]);
    print_result(t_ready > 0 ? t_stop - t_ready : 0, nconn);
}

int main(int argc, char **argv) {
    int nconn = 100, opt, phases = 2, conc = 256, alarm_s = 300;
    double dur = 10, warmup = 0.3, recover_timeout = 30;
    const char *m = "echo";
    while ((opt = getopt(argc, argv, "m:p:c:s:d:n:u:W:P:k:T:b:R:r:")) != -1) {
        switch (opt) {
        case 'm': m = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 's': size = (size_t)atol(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'n': depth = atoi(optarg); break;
        case 'u': path = optarg; break;
        case 'W': warmup = atof(optarg); break;
        case 'P': phases = atoi(optarg); break;
        case 'k': conc = atoi(optarg); break;
        case 'T': alarm_s = atoi(optarg); break;
        case 'b': backoff_s = atof(optarg) / 1000.0; break;
        case 'R': recover_timeout = atof(optarg); break;
        case 'r': pace_s = atof(optarg) / 1000.0; break;
        default: fprintf(stderr, "see the header of loadgen.c for usage\n"); return 2;
        }
    }
    const char *names[] = {"echo", "tcp", "http", "connect", "idle", "storm", "failover"};
    mode = -1;
    for (int i = 0; i < 7; i++) if (strcmp(m, names[i]) == 0) mode = i;
    if (mode < 0 || !port || depth < 1 || depth > 64 || nconn < 1 || phases < 1 || phases > nconn) {
        fprintf(stderr, "bad args\n"); return 2;
    }
    if (mode == M_FAILOVER && (depth != 1 || backoff_s <= 0 || recover_timeout <= 0)) { fprintf(stderr, "failover: -n 1, -b > 0, -R > 0\n"); return 2; }
    if (mode >= M_CONNECT && mode != M_FAILOVER && size > 125) { fprintf(stderr, "-s must be <= 125 in mode %s\n", m); return 2; }
    alarm((unsigned)alarm_s); /* bounded in time whatever happens */
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)getpid());
    epfd = epoll_create1(0);
    addr.sin_family = AF_INET; addr.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    payload = malloc(size ? size : 1);
    for (size_t i = 0; i < size; i++) payload[i] = (unsigned char)('a' + i % 26);
    upgrade_len = snprintf(upgrade_req, sizeof upgrade_req,
                           "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", path, port);
    http_len = snprintf(http_req, sizeof http_req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", path, port);
    /* one small masked frame (mask 0: payload unchanged) and a masked close frame, code 1000 */
    if (size <= 125) {
        small_frame[0] = 0x82; small_frame[1] = 0x80 | (unsigned char)size;
        memset(small_frame + 2, 0, 4); memcpy(small_frame + 6, payload, size); small_len = 6 + size;
    }
    unsigned char cm[4] = {0x11, 0x22, 0x33, 0x44};
    close_frame[0] = 0x88; close_frame[1] = 0x82; memcpy(close_frame + 2, cm, 4);
    close_frame[6] = 0x03 ^ cm[0]; close_frame[7] = 0xe8 ^ cm[1];
    conn *cs = calloc((size_t)nconn, sizeof *cs);
    for (int i = 0; i < nconn; i++) {
        cs[i].fd = -1;
        for (int k = 0; k < 4; k++) cs[i].mask[k] = (unsigned char)rand();
        if (mode == M_ECHO || mode == M_TCP || mode == M_FAILOVER) build_msg(&cs[i]);
    }
    if (mode == M_IDLE) run_idle(cs, nconn, phases, conc);
    else if (mode == M_STORM) run_storm(cs, nconn, conc);
    else if (mode == M_FAILOVER) run_failover(cs, nconn, conc, warmup, dur, recover_timeout);
    else run_timed(cs, nconn, warmup, dur);
    return 0;
}
