/* lbproxy._splice: the native tunnel engine.
 *
 * Once a websocket (or an L4 connection) is established, Python hands both
 * sockets (duplicated fds) to an Engine.  The engine owns one epoll set; the
 * event loop watches that epoll fd with add_reader() and calls pump(), which
 * forwards every ready tunnel in C: recv into one shared buffer, send to the
 * peer, and only if the peer cannot take it all, keep the rest for that peer
 * and stop reading the source (flow control).  Python decides everything
 * else: it asks for a drain (go_away: a 1001 close at a frame boundary, the
 * same rules as tunnel.WsLink), an abort (idle timeout), byte counts (metrics,
 * sweeps), and is told once when a tunnel has finished (on_finish callback).
 *
 * Per side modes (tunnel_rules.Mode, same codes):
 *                  FWD  = forward what is read to the other side;
 *                  DROP = read and drop until EOF, then close;
 *                  CLOSEONDATA = close on anything read (the client after a 1001).
 * The go-away rule and the 1001 frame are not written here: the engine receives them
 * at start (tunnel_rules.engine_setup) and only looks them up when a drain happens.
 * A side closes once its pending output is flushed.  When both sides are
 * closed the tunnel is finished.  No Python object is touched per chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { FWD = 0, DROP = 1, CLOSEONDATA = 2 };             /* tunnel_rules.Mode */
enum { WAIT_BOUNDARY = 0, PART = 1, CLOSE_FRAME = 2 };    /* tunnel_rules.GoAway */
#define NRULES 14 /* tunnel_rules.engine_rules(): 8 go-away entries, 3 x (client, backend) */
#define MAX_CLOSE_FRAME 127
enum { CLIENT = 0, BACKEND = 1 };
enum { K_NONE = 0, K_DRAIN = 1, K_TOO_BIG = 2, K_RATE = 3, K_DEAD = 4, NKINDS = 5 }; /* CloseKind */
enum { OP_STARTS = 1, OP_CONTINUES = 2, OP_DATA = 4 };                              /* ws_rules */
#define MAX_EVENTS 128

typedef struct {
    int fd;           /* -1 once closed */
    uint8_t rd;       /* input (or EOF) may be waiting: edge-triggered, cleared on EAGAIN */
    uint8_t hup;      /* the peer closed or failed: read on to the end despite short reads */
    char *pend;       /* bytes waiting to be written to this side */
    size_t plen, poff, pcap;
    uint64_t nread;   /* bytes read from this side */
    uint8_t eof, shut, want_shut, want_close, mode, failed;
} Side;

typedef struct {
    Side s[2];
    PyObject *owner;  /* NULL: free slot */
    uint32_t gen;
    uint8_t ws, saw_close, going_away, hn, reason_side, reason_set;
    uint8_t pending;   /* backend only, handshake not yet spliced: input goes to on_data */
    uint8_t connected; /* (pending) the connect succeeded: the request went out or bytes came */
    uint8_t hold;      /* (pending) bytes were reported: read no more until resume() */
    int reason_errno;
    uint8_t hb[14];
    uint64_t skip;
    /* ---- websocket policy state (ws_rules; plain fields, so a hand-over can export them) */
    uint8_t chb[14];      /* client->backend: a frame header split across reads */
    uint8_t chn;          /* its bytes so far (held back, not forwarded, while limits are on) */
    uint8_t ws_close;     /* ws_rules.CloseKind lbproxy closes it for (0 = none yet) */
    uint8_t pinged;       /* a ping went to the client in its current silence */
    uint8_t want_ping;    /* inject a ping at the next backend->client frame boundary */
    uint8_t climits;      /* the engine's limits were on when the tunnel started */
    uint8_t first_close;  /* who sent the first close frame: 1 the client, 2 the backend */
    uint8_t reported;     /* sweep() has reported its ws_close to Python */
    uint64_t cskip;       /* payload bytes left of the current client frame */
    uint64_t cmsg;        /* bytes of the client's current data message (all fragments) */
    uint64_t tat;         /* message rate (GCRA): theoretical arrival time, ns */
    uint64_t msgs[2];     /* data messages counted at their final frame: [CLIENT] client->
                           * backend, [BACKEND] backend->client */
    uint64_t heard;       /* the client's nread at the last sweep */
    uint64_t heard_at;    /* sweep time (ns, CLOCK_MONOTONIC) the client was last heard */
} Tun;

typedef struct {
    PyObject *owner;
    PyObject *reason;
    uint64_t nin, nout;
    uint64_t msgs_in, msgs_out; /* websocket data messages each way */
    int ws_close;               /* ws_rules.CloseKind */
    int first_close;            /* 1: the client sent the first close frame, 2: the backend */
} Finished;

typedef struct {
    PyObject *owner;
    PyObject *data; /* bytes read, b"" for EOF, NULL with err */
    int err;
} Report;

typedef struct {
    PyObject_HEAD
    int epfd;
    Tun **slots;
    Py_ssize_t nslots, cap, live;
    Py_ssize_t *freelist;
    Py_ssize_t nfree;
    char *buf;
    size_t bufsize;
    PyObject *on_finish;
    PyObject *on_data;
    Report *reports;
    Py_ssize_t nreports, capreports;
    int delivering;
    Finished *done;
    Py_ssize_t ndone, capdone;
    uint32_t gen;
    uint8_t rules[NRULES];
    uint8_t close_frame[MAX_CLOSE_FRAME];
    size_t close_len;
    /* ---- websocket policy (ws_rules.engine_ws_setup, via ws_policy()) ---- */
    uint8_t optab[16];       /* ws_rules.OPCODES: STARTS / CONTINUES / DATA per opcode */
    uint8_t limits;          /* max_message or a message rate: decide headers before forwarding */
    uint64_t ping_interval, ping_timeout, max_message, emission, tolerance; /* ns, bytes */
    uint8_t wsframe[NKINDS][2][MAX_CLOSE_FRAME]; /* per CloseKind: to the client, the backend */
    uint8_t wsflen[NKINDS][2];
    uint8_t ping[MAX_CLOSE_FRAME];
    size_t ping_len;
} Engine;

/* ---- helpers ------------------------------------------------------------ */

static int is_reading(Tun *t, int i) {
    Side *s = &t->s[i];
    if (s->fd < 0 || s->want_close) return 0;
    if (s->mode != FWD) return 1;
    return !s->eof && t->s[!i].plen == 0;
}

/* Both sides are registered once, edge-triggered, for input and output (as NGINX does):
 * no epoll_ctl per pause/resume, and no re-poll of a level-triggered fd per batch. */
static int watch(Engine *e, Tun *t, Py_ssize_t slot, int i) {
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = ((uint64_t)t->gen << 32) | ((uint64_t)slot << 1) | (uint64_t)i;
    return epoll_ctl(e->epfd, EPOLL_CTL_ADD, t->s[i].fd, &ev);
}

static int append(Side *s, const char *p, size_t n) {
    if (s->plen + n > s->pcap) {
        size_t cap = s->pcap ? s->pcap : (n + 255) & ~(size_t)255; /* first: just enough */
        while (cap < s->plen + n) cap *= 2;
        if (s->poff) { /* compact first */
            memmove(s->pend, s->pend + s->poff, s->plen);
            s->poff = 0;
        }
        char *np = realloc(s->pend, cap);
        if (!np) return -1;
        s->pend = np;
        s->pcap = cap;
    } else if (s->poff + s->plen + n > s->pcap) {
        memmove(s->pend, s->pend + s->poff, s->plen);
        s->poff = 0;
    }
    memcpy(s->pend + s->poff + s->plen, p, n);
    s->plen += n;
    return 0;
}

static void free_pend(Side *s) {
    free(s->pend);
    s->pend = NULL;
    s->plen = s->poff = s->pcap = 0;
}

static void set_reason(Tun *t, int side, int err) {
    if (t->reason_set) return;
    t->reason_set = 1;
    t->reason_side = (uint8_t)side;
    t->reason_errno = err;
}

static void close_fd(Engine *e, Side *s) {
    if (s->fd >= 0) {
        /* No EPOLL_CTL_DEL: closing the last descriptor of the socket removes it from the
         * epoll set.  (Right after the hand-over, the stdlib loop may still hold the
         * original fd until its next iteration: a stale event until then is ignored.) */
        close(s->fd);
        s->fd = -1;
    }
    free_pend(s);
}

static void side_failed(Engine *e, Tun *t, int i, int err);

/* Close side i once its pending output is flushed. */
static void close_side(Engine *e, Tun *t, int i) {
    Side *s = &t->s[i];
    if (s->fd < 0) return;
    if (s->plen && !s->failed) {
        s->want_close = 1;
        return;
    }
    close_fd(e, s);
}

static void do_shutdown(Tun *t, int i) {
    Side *s = &t->s[i];
    if (s->fd < 0 || s->shut) return;
    if (s->plen) {
        s->want_shut = 1;
        return;
    }
    s->shut = 1;
    s->want_shut = 0;
    shutdown(s->fd, SHUT_WR);
}

/* Write to side i (pending output first); returns -1 on a socket error. */
static int send_to(Tun *t, int i, const char *p, size_t n) {
    Side *s = &t->s[i];
    if (s->fd < 0 || s->shut) return 0; /* nowhere to go: dropped, as a closed transport does */
    if (s->plen) return append(s, p, n) < 0 ? -1 : 0;
    ssize_t w = send(s->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) return -1;
        w = 0;
    }
    if ((size_t)w < n && append(s, p + w, n - (size_t)w) < 0) return -1;
    return 0;
}

static int at_boundary(Tun *t) { return t->skip == 0 && t->hn == 0; }

/* A websocket frame header's length (2-14 bytes) from its second byte. */
static inline size_t header_len(uint8_t b1) {
    uint8_t len7 = b1 & 0x7F;
    return 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((b1 & 0x80) ? 4 : 0);
}

/* The payload length of the complete frame header at h (7-, 16- or 64-bit form). */
static inline uint64_t payload_len(const uint8_t *h) {
    uint8_t len7 = h[1] & 0x7F;
    if (len7 < 126) return len7;
    if (len7 == 126) return ((uint64_t)h[2] << 8) | h[3];
    uint64_t size = 0;
    for (int k = 2; k < 10; k++) size = (size << 8) | h[k];
    return size;
}

/* Advance the backend->client frame cursor over p[0..n).  With stop, stop at the first
 * frame boundary reached and return the bytes consumed up to it. */
static size_t ws_scan(Engine *e, Tun *t, const uint8_t *p, size_t n, int stop) {
    size_t pos = 0;
    for (;;) {
        if (t->skip) {
            uint64_t take = n - pos < t->skip ? n - pos : t->skip;
            t->skip -= take;
            pos += take;
            if (stop && t->skip == 0) return pos;
        }
        if (pos >= n) return pos;
        const uint8_t *h; /* the complete header: in the buffer, or gathered in hb */
        if (!t->hn && n - pos >= 2 && n - pos >= header_len(p[pos + 1])) {
            h = p + pos;
            pos += header_len(p[pos + 1]);
        } else {
            while (t->hn < 2 && pos < n) t->hb[t->hn++] = p[pos++];
            if (t->hn < 2) return pos;
            size_t need = header_len(t->hb[1]);
            while (t->hn < need && pos < n) t->hb[t->hn++] = p[pos++];
            if (t->hn < need) return pos;
            h = t->hb;
            t->hn = 0;
        }
        uint64_t size = payload_len(h);
        if ((h[0] & 0x0F) == 0x8) {
            t->saw_close = 1;
            if (!t->first_close) t->first_close = 2;
        }
        if ((h[0] & 0x80) && (e->optab[h[0] & 0x0F] & OP_DATA)) t->msgs[BACKEND]++;
        t->skip = size;
        if (stop && size == 0) return pos;
    }
}

/* Drain: look the action up in the rules (tunnel_rules.go_away) and apply it: the close
 * frame first if the action says so, then each side's new mode (AFTER) and a FIN. */
static void go_away_now(Engine *e, Tun *t) {
    int act = e->rules[(t->ws << 2) | (t->saw_close << 1) | at_boundary(t)];
    if (act == WAIT_BOUNDARY) { /* finish the frame in flight first */
        t->going_away = 1;
        return;
    }
    t->going_away = 0;
    t->want_ping = 0;
    if (act == CLOSE_FRAME) { /* the close frames of the kind (ws_rules.closes) */
        int k = t->ws_close ? t->ws_close : K_DRAIN;
        const char *cf = (const char *)e->wsframe[k][CLIENT];
        size_t cl = e->wsflen[k][CLIENT];
        if (k == K_DRAIN) { /* a drain's frame is the one the engine was made with */
            cf = (const char *)e->close_frame;
            cl = e->close_len;
        }
        if (cl && send_to(t, CLIENT, cf, cl) < 0) {
            side_failed(e, t, CLIENT, errno);
            return;
        }
        if (e->wsflen[k][BACKEND] &&
            send_to(t, BACKEND, (const char *)e->wsframe[k][BACKEND], e->wsflen[k][BACKEND]) < 0) {
            side_failed(e, t, BACKEND, errno);
            return;
        }
    }
    for (int i = 0; i < 2; i++) {
        t->s[i].mode = e->rules[8 + 2 * act + i];
        do_shutdown(t, i);
    }
}

static void side_failed(Engine *e, Tun *t, int i, int err) {
    set_reason(t, i, err);
    Side *s = &t->s[i];
    s->failed = 1;
    close_fd(e, s);
    close_side(e, t, !i); /* the other side flushes what it has, then closes */
}

/* ---- websocket policy (ws_rules): client frames, limits, pings, dead peers ---- */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ws_rules.frame_verdict at a client frame header: K_NONE to forward the frame, else the
 * CloseKind (K_TOO_BIG, K_RATE). */
static int client_verdict(Engine *e, Tun *t, uint8_t op, uint64_t plen) {
    uint8_t f = e->optab[op];
    uint64_t total = plen;
    if (f & OP_CONTINUES) total += t->cmsg;
    if (e->max_message && (total > e->max_message || total < plen)) return K_TOO_BIG;
    if ((f & OP_STARTS) && e->emission) { /* GCRA */
        uint64_t now = now_ns();
        uint64_t next = (t->tat > now ? t->tat : now) + e->emission;
        if (next - now > e->tolerance) return K_RATE;
        t->tat = next;
    }
    if (f & (OP_STARTS | OP_CONTINUES)) t->cmsg = total;
    return K_NONE;
}

/* lbproxy closes a websocket for a refused client frame: nothing more of the client's goes
 * on; the close frames (client, backend) go out at the backend->client boundary. */
static void ws_refuse(Engine *e, Tun *t, int kind) {
    if (!t->ws_close) t->ws_close = (uint8_t)kind; /* (a drain waiting for a boundary stays one) */
    t->s[CLIENT].mode = DROP;
    go_away_now(e, t);
}

static int to_backend(Engine *e, Tun *t, const char *p, size_t n) {
    if (n && send_to(t, BACKEND, p, n) < 0) {
        side_failed(e, t, BACKEND, errno);
        return 0;
    }
    return 1;
}

/* Forward n client bytes to the backend, following the client's frames: count messages
 * and, with limits on (t->climits), decide each header before any of it is forwarded (a
 * header split across reads is held in chb).  A refused frame: only what precedes it is
 * forwarded.  1 when reading may go on. */
static int client_frames(Engine *e, Tun *t, const char *p, size_t n) {
    const uint8_t *u = (const uint8_t *)p;
    size_t pos = 0, hstart = 0;
    size_t held = t->climits ? t->chn : 0; /* header bytes of earlier reads, not forwarded */
    for (;;) {
        if (t->cskip) {
            uint64_t take = n - pos < t->cskip ? n - pos : t->cskip;
            t->cskip -= take;
            pos += take;
        }
        if (pos >= n) break;
        const uint8_t *h; /* the complete header: in the buffer, or gathered in chb */
        if (!t->chn && n - pos >= 2 && n - pos >= header_len(u[pos + 1])) {
            hstart = pos;
            h = u + pos;
            pos += header_len(u[pos + 1]);
        } else { /* split across reads */
            if (!t->chn) hstart = pos;
            while (t->chn < 2 && pos < n) t->chb[t->chn++] = u[pos++];
            if (t->chn < 2) goto partial;
            size_t need = header_len(t->chb[1]);
            while (t->chn < need && pos < n) t->chb[t->chn++] = u[pos++];
            if (t->chn < need) goto partial;
            h = t->chb;
            t->chn = 0;
        }
        uint64_t size = payload_len(h);
        uint8_t b0 = h[0], op = b0 & 0x0F;
        if (op == 0x8 && !t->first_close) t->first_close = 1;
        if (t->climits) {
            int kind = client_verdict(e, t, op, size);
            if (kind) { /* forward what precedes the frame, then close */
                if (!held && !to_backend(e, t, p, hstart)) return 0;
                ws_refuse(e, t, kind);
                return 0;
            }
            if (held) { /* the header began in an earlier read: its bytes go first */
                if (!to_backend(e, t, (const char *)t->chb, held)) return 0;
                held = 0;
            }
        }
        if ((b0 & 0x80) && (e->optab[op] & OP_DATA)) { /* a message's final frame */
            t->msgs[CLIENT]++;
            t->cmsg = 0;
        }
        t->cskip = size;
    }
    return to_backend(e, t, p, n);
partial:
    if (!t->climits) return to_backend(e, t, p, n);
    return to_backend(e, t, p, held ? 0 : hstart); /* the header's bytes wait for the rest */
}

/* The backend->client stream waits for a frame boundary (a drain's close frame, a ping):
 * forward up to it, then act.  1 when reading may go on. */
static int backend_to_boundary(Engine *e, Tun *t, size_t len) {
    size_t k = at_boundary(t) ? 0 : ws_scan(e, t, (const uint8_t *)e->buf, len, 1);
    if (k && send_to(t, CLIENT, e->buf, k) < 0) {
        side_failed(e, t, CLIENT, errno);
        return 0;
    }
    if (!at_boundary(t)) return 1;
    if (t->going_away) { /* (what follows the boundary is not forwarded) */
        go_away_now(e, t);
        return 1;
    }
    t->want_ping = 0;
    if (send_to(t, CLIENT, (const char *)e->ping, e->ping_len) < 0) {
        side_failed(e, t, CLIENT, errno);
        return 0;
    }
    if (k < len) {
        ws_scan(e, t, (const uint8_t *)e->buf + k, len - k, 0);
        if (send_to(t, CLIENT, e->buf + k, len - k) < 0) {
            side_failed(e, t, CLIENT, errno);
            return 0;
        }
    }
    return 1;
}

/* The client was silent past ping_interval + ping_timeout: its TCP is closed now; the
 * backend gets the 1001 if its stream is at a client frame boundary, and a FIN. */
static void dead_peer(Engine *e, Tun *t) {
    Side *c = &t->s[CLIENT];
    t->ws_close = K_DEAD;
    t->want_ping = 0;
    c->failed = 1;
    close_fd(e, c);
    int boundary = t->cskip == 0 && (t->climits || t->chn == 0);
    t->chn = 0;
    if (boundary && e->wsflen[K_DEAD][BACKEND] &&
        send_to(t, BACKEND, (const char *)e->wsframe[K_DEAD][BACKEND],
                e->wsflen[K_DEAD][BACKEND]) < 0) {
        side_failed(e, t, BACKEND, errno);
        return;
    }
    t->s[BACKEND].mode = DROP;
    do_shutdown(t, BACKEND);
}

/* One sweep tick for tunnel t (ws_rules.sweep_action); 1 when it was found dead. */
static int ws_tick(Engine *e, Tun *t, uint64_t now) {
    Side *c = &t->s[CLIENT];
    if (c->nread != t->heard || !t->heard_at) { /* any byte from the client: alive */
        t->heard = c->nread;
        t->heard_at = now;
        t->pinged = 0;
        return 0;
    }
    uint64_t silent = now > t->heard_at ? now - t->heard_at : 0;
    if (silent < e->ping_interval) return 0;
    if (silent >= e->ping_interval + e->ping_timeout) {
        dead_peer(e, t);
        return 1;
    }
    if (t->pinged) return 0;
    t->pinged = 1;
    if (!at_boundary(t) || t->going_away) {
        t->want_ping = 1; /* at the end of the frame in flight */
        return 0;
    }
    if (send_to(t, CLIENT, (const char *)e->ping, e->ping_len) < 0) side_failed(e, t, CLIENT, errno);
    return 0;
}

/* One read from side i and what follows from it; 1 when reading may go on. */
static int read_once(Engine *e, Tun *t, int i) {
    Side *a = &t->s[i];
    ssize_t n = recv(a->fd, e->buf, e->bufsize, 0);
    if (n < 0) {
        if (errno == EINTR) return 1;
        a->rd = 0;
        if (errno != EAGAIN) side_failed(e, t, i, errno);
        return 0;
    }
    if (n == 0) {
        a->rd = 0;
        a->eof = 1;
        if (a->mode != FWD) {
            close_side(e, t, i);
            return 0;
        }
        set_reason(t, i, 0);
        if (t->s[!i].eof || t->s[!i].fd < 0) { /* both directions done */
            close_side(e, t, !i);
            close_side(e, t, i);
        } else {
            do_shutdown(t, !i); /* pass the half-close on */
        }
        return 0;
    }
    a->nread += (uint64_t)n;
    /* A short read drained the socket (new data brings a new edge) unless the peer has
     * closed: then read on until EOF, whose edge may already have been consumed. */
    if ((size_t)n < e->bufsize && !a->hup) a->rd = 0;
    if (a->mode == DROP) return 1;
    if (a->mode == CLOSEONDATA) {
        close_side(e, t, i);
        return 0;
    }
    size_t len = (size_t)n;
    if (t->ws) {
        if (i == CLIENT) return client_frames(e, t, e->buf, len);
        if (t->going_away | t->want_ping) return backend_to_boundary(e, t, len);
        ws_scan(e, t, (const uint8_t *)e->buf, len, 0);
    }
    if (send_to(t, !i, e->buf, len) < 0) {
        side_failed(e, t, !i, errno);
        return 0;
    }
    return 1;
}

/* Read side i while it has input and may be read (the other side not backed up). */
static void read_side(Engine *e, Tun *t, int i) {
    while (t->s[i].rd && is_reading(t, i) && read_once(e, t, i)) {
    }
}



static void on_writable(Engine *e, Tun *t, int i) {
    Side *s = &t->s[i];
    while (s->plen) {
        ssize_t w = send(s->fd, s->pend + s->poff, s->plen, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            side_failed(e, t, i, errno);
            return;
        }
        s->poff += (size_t)w;
        s->plen -= (size_t)w;
    }
    free_pend(s); /* drained: an idle tunnel holds no buffer */
    if (s->want_close) {
        close_fd(e, s);
        return;
    }
    if (s->want_shut) do_shutdown(t, i);
}

/* ---- slot table ----------------------------------------------------------- */

static Py_ssize_t alloc_slot(Engine *e) {
    if (e->nfree) return e->freelist[--e->nfree];
    if (e->nslots == e->cap) {
        Py_ssize_t cap = e->cap ? e->cap * 2 : 1024;
        Tun **ns = PyMem_Realloc(e->slots, (size_t)cap * sizeof(Tun *));
        Py_ssize_t *nf = PyMem_Realloc(e->freelist, (size_t)cap * sizeof(Py_ssize_t));
        if (!ns || !nf) {
            if (ns) e->slots = ns;
            if (nf) e->freelist = nf;
            return -1;
        }
        e->slots = ns;
        e->freelist = nf;
        e->cap = cap;
    }
    e->slots[e->nslots] = NULL;
    return e->nslots++;
}

static void release_slot(Engine *e, Py_ssize_t slot) {
    Tun *t = e->slots[slot];
    e->slots[slot] = NULL;
    free_pend(&t->s[0]);
    free_pend(&t->s[1]);
    PyMem_Free(t);
    e->freelist[e->nfree++] = slot;
    e->live--;
}

/* ---- native upstream connects (the handshake phase of a websocket) ---------- */

static int report(Engine *e, PyObject *owner, PyObject *data, int err) {
    if (e->nreports == e->capreports) {
        Py_ssize_t cap = e->capreports ? e->capreports * 2 : 64;
        Report *nr = PyMem_Realloc(e->reports, (size_t)cap * sizeof(Report));
        if (!nr) return -1;
        e->reports = nr;
        e->capreports = cap;
    }
    Py_INCREF(owner);
    e->reports[e->nreports++] = (Report){owner, data, err};
    return 0;
}

/* The pending connection ends (error or EOF before the splice): close, report, free. */
static void pending_end(Engine *e, Tun *t, Py_ssize_t slot, int err) {
    PyObject *data = err ? NULL : PyBytes_FromStringAndSize(NULL, 0);
    if (report(e, t->owner, data, err ? err : (data ? 0 : ENOMEM)) < 0) Py_XDECREF(data);
    close_fd(e, &t->s[BACKEND]);
    Py_DECREF(t->owner);
    release_slot(e, slot);
}

static void pending_event(Engine *e, Tun *t, Py_ssize_t slot, uint32_t ev) {
    Side *b = &t->s[BACKEND];
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        b->rd = 1;
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) b->hup = 1;
    }
    while (b->plen && (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
        ssize_t w = send(b->fd, b->pend + b->poff, b->plen, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            pending_end(e, t, slot, errno);
            return;
        }
        t->connected = 1;
        b->poff += (size_t)w;
        b->plen -= (size_t)w;
        if (!b->plen) free_pend(b);
    }
    while (b->rd && !t->hold) {
        ssize_t n = recv(b->fd, e->buf, e->bufsize, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                b->rd = 0;
                break;
            }
            pending_end(e, t, slot, errno);
            return;
        }
        if (n == 0) {
            pending_end(e, t, slot, 0);
            return;
        }
        t->connected = 1;
        b->nread += (uint64_t)n;
        if ((size_t)n < e->bufsize && !b->hup) b->rd = 0;
        PyObject *data = PyBytes_FromStringAndSize(e->buf, n);
        if (!data || report(e, t->owner, data, 0) < 0) {
            Py_XDECREF(data);
            PyErr_Clear();
            pending_end(e, t, slot, ENOMEM);
            return;
        }
        /* Python decides before anything more is read (so an EOF right behind a response
         * stays in the socket for whoever takes it: the tunnel or the Python client). */
        t->hold = 1;
    }
}

static void deliver_reports(Engine *e) {
    if (e->delivering) return; /* (a resume() from a callback: the loop below gets it) */
    e->delivering = 1;
    for (Py_ssize_t k = 0; k < e->nreports; k++) { /* in order: data before an EOF */
        Report r = e->reports[k];
        /* (vectorcall: no format string to parse, no argument tuple, once per report) */
        PyObject *err = PyLong_FromLong(r.err);
        PyObject *res = NULL;
        if (err) {
            PyObject *argv[3] = {r.owner, r.data ? r.data : Py_None, err};
            res = PyObject_Vectorcall(e->on_data, argv, 3, NULL);
            Py_DECREF(err);
        }
        if (!res) PyErr_WriteUnraisable(e->on_data);
        Py_XDECREF(res);
        Py_XDECREF(r.data);
        Py_DECREF(r.owner);
    }
    e->nreports = 0;
    e->delivering = 0;
}

static PyObject *reason_text(Tun *t) {
    const char *who = t->reason_side == CLIENT ? "client" : "backend";
    if (!t->reason_set) return PyUnicode_FromString("closed");
    if (t->reason_errno == 0) return PyUnicode_FromFormat("%s closed", who);
    return PyUnicode_FromFormat("%s error: [Errno %d] %s", who, t->reason_errno,
                                strerror(t->reason_errno));
}

/* After handling an event: finish the tunnel if both sides are closed, else re-arm. */
static void settle(Engine *e, Tun *t, Py_ssize_t slot) {
    if (t->s[0].fd < 0 && t->s[1].fd < 0) {
        if (e->ndone == e->capdone) {
            Py_ssize_t cap = e->capdone ? e->capdone * 2 : 64;
            Finished *nd = PyMem_Realloc(e->done, (size_t)cap * sizeof(Finished));
            if (!nd) return; /* keep the slot; retried at the next event */
            e->done = nd;
            e->capdone = cap;
        }
        Finished *f = &e->done[e->ndone++];
        f->owner = t->owner; /* the reference moves to the finished list */
        f->reason = reason_text(t);
        f->nin = t->s[CLIENT].nread;
        f->nout = t->s[BACKEND].nread;
        f->msgs_in = t->msgs[CLIENT];
        f->msgs_out = t->msgs[BACKEND];
        f->ws_close = t->ws_close;
        f->first_close = t->first_close;
        release_slot(e, slot);
        return;
    }
}

static void deliver_done(Engine *e) {
    while (e->ndone) {
        Finished f = e->done[--e->ndone];
        PyObject *r = NULL;
        if (f.reason) { /* (vectorcall, as in deliver_reports) */
            PyObject *argv[8] = {f.owner,
                                 f.reason,
                                 PyLong_FromUnsignedLongLong((unsigned long long)f.nin),
                                 PyLong_FromUnsignedLongLong((unsigned long long)f.nout),
                                 PyLong_FromUnsignedLongLong((unsigned long long)f.msgs_in),
                                 PyLong_FromUnsignedLongLong((unsigned long long)f.msgs_out),
                                 PyLong_FromLong(f.ws_close),
                                 PyLong_FromLong(f.first_close)};
            int ok = 1;
            for (int k = 2; k < 8; k++) ok = ok && argv[k] != NULL;
            if (ok) r = PyObject_Vectorcall(e->on_finish, argv, 8, NULL);
            for (int k = 2; k < 8; k++) Py_XDECREF(argv[k]);
        }
        if (!r) PyErr_WriteUnraisable(e->on_finish);
        Py_XDECREF(r);
        Py_XDECREF(f.reason);
        Py_DECREF(f.owner);
    }
}

static Tun *lookup(Engine *e, Py_ssize_t slot, PyObject *owner) {
    if (slot < 0 || slot >= e->nslots || !e->slots[slot] || e->slots[slot]->owner != owner) {
        PyErr_SetString(PyExc_KeyError, "no such tunnel");
        return NULL;
    }
    return e->slots[slot];
}

/* ---- Python API ----------------------------------------------------------- */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"on_finish", "on_data", "bufsize", "rules", "close_frame", NULL};
    PyObject *cb, *cb_data = Py_None;
    Py_ssize_t bufsize = 256 * 1024;
    const char *rules = NULL, *frame = NULL;
    Py_ssize_t nrules = 0, nframe = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|On$y#y#", kwlist, &cb, &cb_data, &bufsize,
                                     &rules, &nrules, &frame, &nframe))
        return NULL;
    if (!PyCallable_Check(cb) || (cb_data != Py_None && !PyCallable_Check(cb_data)) ||
        bufsize < 1024) {
        PyErr_SetString(PyExc_ValueError, "callbacks must be callable and bufsize >= 1024");
        return NULL;
    }
    if (!rules || nrules != NRULES || !frame || nframe < 2 || nframe > MAX_CLOSE_FRAME) {
        PyErr_SetString(PyExc_ValueError, "rules (14 bytes) and close_frame (2-127 bytes) "
                                          "are required: see tunnel_rules.engine_setup()");
        return NULL;
    }
    for (int k = 0; k < NRULES; k++) {
        /* a total table: codes in range, and a decision (not WAIT) at every boundary */
        unsigned char r = (unsigned char)rules[k];
        if (r > (k < 8 ? CLOSE_FRAME : CLOSEONDATA) || (k < 8 && (k & 1) && r == WAIT_BOUNDARY)) {
            PyErr_SetString(PyExc_ValueError, "bad rules table");
            return NULL;
        }
    }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    memcpy(e->rules, rules, NRULES);
    memcpy(e->close_frame, frame, (size_t)nframe);
    e->close_len = (size_t)nframe;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->buf = PyMem_Malloc((size_t)bufsize);
    if (e->epfd < 0 || !e->buf) {
        if (e->epfd >= 0) close(e->epfd);
        e->epfd = -1;
        int nomem = e->buf == NULL;
        Py_DECREF(e);
        return nomem ? PyErr_NoMemory() : PyErr_SetFromErrno(PyExc_OSError);
    }
    e->bufsize = (size_t)bufsize;
    Py_INCREF(cb);
    e->on_finish = cb;
    Py_INCREF(cb_data);
    e->on_data = cb_data;
    return (PyObject *)e;
}

static void close_all(Engine *e) {
    for (Py_ssize_t i = 0; i < e->nslots; i++) {
        Tun *t = e->slots[i];
        if (!t) continue;
        close_fd(e, &t->s[0]);
        close_fd(e, &t->s[1]);
        Py_DECREF(t->owner);
        release_slot(e, i);
    }
}

static void Engine_dealloc(Engine *e) {
    close_all(e);
    while (e->ndone) {
        Finished f = e->done[--e->ndone];
        Py_XDECREF(f.reason);
        Py_DECREF(f.owner);
    }
    if (e->epfd >= 0) close(e->epfd);
    PyMem_Free(e->slots);
    PyMem_Free(e->freelist);
    PyMem_Free(e->done);
    for (Py_ssize_t k = 0; k < e->nreports; k++) {
        Py_XDECREF(e->reports[k].data);
        Py_DECREF(e->reports[k].owner);
    }
    PyMem_Free(e->reports);
    Py_XDECREF(e->on_data);
    PyMem_Free(e->buf);
    Py_XDECREF(e->on_finish);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_fileno(Engine *e, PyObject *noargs) { return PyLong_FromLong(e->epfd); }

static PyObject *Engine_add(Engine *e, PyObject *args) {
    PyObject *owner;
    int cfd, bfd, ws, saw_close;
    unsigned long long skip;
    Py_buffer partial;
    if (!PyArg_ParseTuple(args, "Oiipy*Kp", &owner, &cfd, &bfd, &ws, &partial, &skip, &saw_close))
        return NULL;
    if (partial.len > 13 || (partial.len && skip)) {
        PyBuffer_Release(&partial);
        PyErr_SetString(PyExc_ValueError, "bad frame cursor");
        return NULL;
    }
    Py_ssize_t slot = alloc_slot(e);
    Tun *t = slot < 0 ? NULL : PyMem_Calloc(1, sizeof(Tun));
    if (!t) {
        PyBuffer_Release(&partial);
        if (slot >= 0) e->freelist[e->nfree++] = slot;
        return PyErr_NoMemory();
    }
    t->s[CLIENT].fd = cfd;
    t->s[BACKEND].fd = bfd;
    t->ws = (uint8_t)ws;
    t->saw_close = (uint8_t)saw_close;
    t->skip = skip;
    memcpy(t->hb, partial.buf, (size_t)partial.len);
    t->hn = (uint8_t)partial.len;
    t->climits = e->limits;
    PyBuffer_Release(&partial);
    t->gen = ++e->gen;
    Py_INCREF(owner);
    t->owner = owner;
    e->slots[slot] = t;
    e->live++;
    if (watch(e, t, slot, CLIENT) < 0 || watch(e, t, slot, BACKEND) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        t->s[CLIENT].fd = t->s[BACKEND].fd = -1; /* the caller still owns (and closes) them */
        Py_DECREF(t->owner);
        release_slot(e, slot);
        return NULL;
    }
    return PyLong_FromSsize_t(slot);
}

static PyObject *Engine_pump(Engine *e, PyObject *noargs) {
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(e->epfd, evs, MAX_EVENTS, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int k = 0; k < n; k++) {
            uint64_t d = evs[k].data.u64;
            uint32_t gen = (uint32_t)(d >> 32);
            Py_ssize_t slot = (Py_ssize_t)((d & 0xFFFFFFFFu) >> 1);
            int i = (int)(d & 1);
            if (slot >= e->nslots) continue;
            Tun *t = e->slots[slot];
            if (!t || t->gen != gen || t->s[i].fd < 0) continue; /* stale event */
            uint32_t ev = evs[k].events;
            if (t->pending) {
                pending_event(e, t, slot, ev);
                continue;
            }
            Side *s = &t->s[i];
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                s->rd = 1;
                if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->hup = 1;
            }
            if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && s->plen) {
                on_writable(e, t, i);
                if (!s->plen) read_side(e, t, !i); /* drained: its source reads again */
            }
            read_side(e, t, i);
            settle(e, t, slot);
        }
        /* One round per call: what is left makes the epoll fd readable again, and the event
         * loop calls back after its own iteration.  That iteration is also when the loop
         * closes the fds of the transports whose sockets were duplicated into the engine,
         * so a storm of upgrades holds at most MAX_EVENTS extra fds at a time. */
        break;
    }
    deliver_reports(e);
    deliver_done(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_counts(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    return Py_BuildValue("KK", (unsigned long long)t->s[CLIENT].nread,
                         (unsigned long long)t->s[BACKEND].nread);
}

static PyObject *Engine_go_away(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    if (t->s[CLIENT].mode == FWD && t->s[BACKEND].mode == FWD) {
        if (!t->ws_close) t->ws_close = K_DRAIN;
        go_away_now(e, t);
    }
    read_side(e, t, CLIENT); /* (sides now dropping input read even if backed up) */
    read_side(e, t, BACKEND);
    settle(e, t, slot);
    deliver_done(e);
    Py_RETURN_NONE;
}

/* Close both sockets now (idle timeout, grace expired, shutdown); returns the byte
 * counts.  on_finish is not called: the caller finishes the tunnel itself. */
static PyObject *Engine_close(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    PyObject *r = Py_BuildValue("KK", (unsigned long long)t->s[CLIENT].nread,
                                (unsigned long long)t->s[BACKEND].nread);
    close_fd(e, &t->s[0]);
    close_fd(e, &t->s[1]);
    Py_DECREF(t->owner);
    release_slot(e, slot);
    return r;
}

/* connect(owner, host, port, request) -> slot: a non-blocking connect to an IP literal;
 * the request is sent once connected, what the backend answers goes to on_data until
 * splice() or release().  ValueError for a host that is not an IP address. */
static PyObject *Engine_connect(Engine *e, PyObject *args) {
    PyObject *owner;
    const char *host;
    int port;
    Py_buffer req;
    if (!PyArg_ParseTuple(args, "Osiy*", &owner, &host, &port, &req)) return NULL;
    if (e->on_data == Py_None) {
        PyBuffer_Release(&req);
        PyErr_SetString(PyExc_RuntimeError, "engine made without on_data");
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        sslen = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        sslen = sizeof *v6;
    } else {
        PyBuffer_Release(&req);
        PyErr_SetString(PyExc_ValueError, "not an IP address");
        return NULL;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        PyBuffer_Release(&req);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&ss, sslen) < 0 && errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        PyBuffer_Release(&req);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_ssize_t slot = alloc_slot(e);
    Tun *t = slot < 0 ? NULL : PyMem_Calloc(1, sizeof(Tun));
    if (!t || append(&t->s[BACKEND], req.buf, (size_t)req.len) < 0) {
        if (t) PyMem_Free(t);
        if (slot >= 0) e->freelist[e->nfree++] = slot;
        close(fd);
        PyBuffer_Release(&req);
        return PyErr_NoMemory();
    }
    PyBuffer_Release(&req);
    t->s[CLIENT].fd = -1;
    t->s[BACKEND].fd = fd;
    t->pending = 1;
    t->gen = ++e->gen;
    Py_INCREF(owner);
    t->owner = owner;
    e->slots[slot] = t;
    e->live++;
    if (watch(e, t, slot, BACKEND) < 0) {
        int err = errno;
        close_fd(e, &t->s[BACKEND]);
        Py_DECREF(t->owner);
        release_slot(e, slot);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(slot);
}

/* splice(slot, owner, new_owner, client_fd, to_client, to_backend, ws, partial, skip,
 * saw_close): the handshake is done; the pending connection becomes a tunnel. */
static PyObject *Engine_splice(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner, *new_owner;
    int cfd, ws, saw_close;
    Py_buffer to_client, to_backend, partial;
    unsigned long long skip;
    if (!PyArg_ParseTuple(args, "nOOiy*y*py*Kp", &slot, &owner, &new_owner, &cfd, &to_client,
                          &to_backend, &ws, &partial, &skip, &saw_close))
        return NULL;
    PyObject *result = NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) goto done;
    if (!t->pending || partial.len > 13 || (partial.len && skip)) {
        PyErr_SetString(PyExc_ValueError, "not a pending connection, or a bad frame cursor");
        goto done;
    }
    t->pending = 0;
    t->s[CLIENT].fd = cfd;
    t->ws = (uint8_t)ws;
    t->saw_close = (uint8_t)saw_close;
    t->skip = skip;
    memcpy(t->hb, partial.buf, (size_t)partial.len);
    t->hn = (uint8_t)partial.len;
    t->climits = e->limits;
    t->s[BACKEND].nread = 0; /* counts start at the tunnel (the caller counted the head) */
    Py_INCREF(new_owner);
    Py_SETREF(t->owner, new_owner);
    if (watch(e, t, slot, CLIENT) < 0) {
        side_failed(e, t, CLIENT, errno);
    } else {
        if (to_client.len && send_to(t, CLIENT, to_client.buf, (size_t)to_client.len) < 0)
            side_failed(e, t, CLIENT, errno);
        if (to_backend.len) { /* (client frames that came with the upgrade request) */
            if (t->ws) client_frames(e, t, to_backend.buf, (size_t)to_backend.len);
            else if (send_to(t, BACKEND, to_backend.buf, (size_t)to_backend.len) < 0)
                side_failed(e, t, BACKEND, errno);
        }
        read_side(e, t, BACKEND); /* (input that came with or after the head) */
        read_side(e, t, CLIENT);
    }
    settle(e, t, slot);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&to_client);
    PyBuffer_Release(&to_backend);
    PyBuffer_Release(&partial);
    if (result) deliver_done(e);
    return result;
}

/* release(slot, owner) -> fd: a pending connection leaves the engine (its caller now owns
 * the socket, e.g. to read a response that is not a 101 with the Python client). */
static PyObject *Engine_release(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    if (!t->pending || t->s[BACKEND].plen) {
        PyErr_SetString(PyExc_ValueError, "not a pending connection with its request sent");
        return NULL;
    }
    int fd = t->s[BACKEND].fd;
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
    t->s[BACKEND].fd = -1;
    Py_DECREF(t->owner);
    release_slot(e, slot);
    return PyLong_FromLong(fd);
}

/* resume(slot, owner): the bytes reported so far were not enough (an incomplete head). */
static PyObject *Engine_resume(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    if (!t->pending) {
        PyErr_SetString(PyExc_ValueError, "not a pending connection");
        return NULL;
    }
    t->hold = 0;
    pending_event(e, t, slot, 0);
    deliver_reports(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_connected(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    return PyBool_FromLong(t->connected || !t->pending);
}

/* ws_policy((ping_interval, ping_timeout, max_message, emission, tolerance), opcodes,
 * frames, ping): ws_rules.engine_ws_setup(); applies to the tunnels started after it. */
static PyObject *Engine_ws_policy(Engine *e, PyObject *args) {
    unsigned long long v[5];
    const char *optab, *ping;
    Py_ssize_t nop, nping;
    PyObject *frames;
    if (!PyArg_ParseTuple(args, "(KKKKK)y#O!y#", &v[0], &v[1], &v[2], &v[3], &v[4], &optab,
                          &nop, &PyTuple_Type, &frames, &ping, &nping))
        return NULL;
    if (nop != 16 || PyTuple_GET_SIZE(frames) != 2 * NKINDS || nping < 2 ||
        nping > MAX_CLOSE_FRAME || (v[3] && !v[4])) {
        PyErr_SetString(PyExc_ValueError, "see ws_rules.engine_ws_setup()");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < 2 * NKINDS; k++) {
        PyObject *f = PyTuple_GET_ITEM(frames, k);
        if (!PyBytes_Check(f) || PyBytes_GET_SIZE(f) > MAX_CLOSE_FRAME) {
            PyErr_SetString(PyExc_ValueError, "frames: bytes of at most 127");
            return NULL;
        }
    }
    for (Py_ssize_t k = 0; k < 2 * NKINDS; k++) {
        PyObject *f = PyTuple_GET_ITEM(frames, k);
        memcpy(e->wsframe[k / 2][k % 2], PyBytes_AS_STRING(f), (size_t)PyBytes_GET_SIZE(f));
        e->wsflen[k / 2][k % 2] = (uint8_t)PyBytes_GET_SIZE(f);
    }
    e->ping_interval = v[0];
    e->ping_timeout = v[1];
    e->max_message = v[2];
    e->emission = v[3];
    e->tolerance = v[4];
    e->limits = v[2] || v[3];
    memcpy(e->optab, optab, 16);
    memcpy(e->ping, ping, (size_t)nping);
    e->ping_len = (size_t)nping;
    Py_RETURN_NONE;
}

/* sweep(now_ns) -> [(owner, kind), ...]: one sweep per engine, from the listener's tick:
 * pings silent clients and closes dead ones (ws_tick); returns the tunnels lbproxy closed
 * itself since the last sweep (dead peers, refused frames: ws_rules.CloseKind), so that
 * Python gives their peers the same grace as a drain's. */
static PyObject *Engine_sweep(Engine *e, PyObject *arg) {
    uint64_t now = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    PyObject *closed = PyList_New(0);
    if (!closed) return NULL;
    for (Py_ssize_t slot = 0; slot < e->nslots; slot++) {
        Tun *t = e->slots[slot];
        if (!t || t->pending || !t->ws) continue;
        int kind = 0;
        PyObject *owner = t->owner;
        Py_INCREF(owner);
        if (t->ws_close > K_DRAIN) {
            kind = t->reported ? 0 : t->ws_close;
        } else if (e->ping_interval && t->s[CLIENT].fd >= 0 && t->s[CLIENT].mode == FWD &&
                   t->s[BACKEND].mode == FWD) {
            kind = ws_tick(e, t, now) ? K_DEAD : 0;
        }
        if (kind) t->reported = 1;
        settle(e, t, slot);
        PyObject *item = kind ? Py_BuildValue("(Oi)", owner, kind) : NULL;
        Py_DECREF(owner);
        if (kind && (!item || PyList_Append(closed, item) < 0)) {
            Py_XDECREF(item);
            Py_DECREF(closed);
            deliver_done(e);
            return NULL;
        }
        Py_XDECREF(item);
    }
    deliver_done(e);
    return closed;
}

static PyObject *Engine_messages(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    return Py_BuildValue("KKii", (unsigned long long)t->msgs[CLIENT],
                         (unsigned long long)t->msgs[BACKEND], (int)t->ws_close,
                         (int)t->first_close);
}

/* ---- hand-over (`lbproxy upgrade`): freeze a tunnel here, rebuild it in another engine ---
 * export() takes a tunnel out of this engine: out of the epoll set, its two fds given to
 * the caller (-1 for a side already closed), its state as a dict; import_tunnel() rebuilds
 * it (in another process, from the same fds passed with SCM_RIGHTS) and forwards on from
 * exactly there: the bytes held unsent go out first, the frame cursor goes on counting.
 * The fields that move are listed once, here: adding one is one line in one list. */
#define TUN_STATE(X)                                                                       \
    X("ws", t->ws) X("saw_close", t->saw_close) X("going_away", t->going_away)             \
    X("skip", t->skip) X("reason_side", t->reason_side) X("reason_set", t->reason_set)     \
    X("reason_errno", t->reason_errno) X("ws_close", t->ws_close) X("pinged", t->pinged)     \
    X("want_ping", t->want_ping) X("climits", t->climits) X("first_close", t->first_close)   \
    X("reported", t->reported) X("cskip", t->cskip) X("cmsg", t->cmsg) X("tat", t->tat)     \
    X("msgs_in", t->msgs[CLIENT]) X("msgs_out", t->msgs[BACKEND]) X("heard", t->heard)       \
    X("heard_at", t->heard_at)
#define SIDE_STATE(X)                                                                      \
    X("nread", s->nread) X("hup", s->hup) X("eof", s->eof) X("shut", s->shut)              \
    X("want_shut", s->want_shut) X("want_close", s->want_close) X("mode", s->mode)         \
    X("failed", s->failed)

static const char *SIDE_KEYS[2] = {"client", "backend"};

static int put_int(PyObject *d, const char *key, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return r;
}

static int put_bytes(PyObject *d, const char *key, const char *p, size_t n) {
    PyObject *o = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    int r = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return r;
}

/* A missing key reads as 0 (a field the other generation does not know yet). */
static int get_int(PyObject *d, const char *key, unsigned long long *v) {
    PyObject *o = PyDict_GetItemString(d, key);
    *v = 0;
    if (!o) return 0;
    *v = PyLong_AsUnsignedLongLong(o);
    return PyErr_Occurred() ? -1 : 0;
}

static int get_bytes(PyObject *d, const char *key, const char **p, Py_ssize_t *n) {
    PyObject *o = PyDict_GetItemString(d, key);
    *p = "";
    *n = 0;
    if (!o) return 0;
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: bytes expected", key);
        return -1;
    }
    *p = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

static PyObject *export_state(Tun *t) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#define PUT(key, field) if (put_int(d, key, (unsigned long long)(field)) < 0) goto fail;
    TUN_STATE(PUT)
    if (put_bytes(d, "hb", (const char *)t->hb, t->hn) < 0) goto fail;
    if (put_bytes(d, "chb", (const char *)t->chb, t->chn) < 0) goto fail;
    for (int i = 0; i < 2; i++) {
        Side *s = &t->s[i];
        PyObject *sd = PyDict_New();
        if (!sd || PyDict_SetItemString(d, SIDE_KEYS[i], sd) < 0) {
            Py_XDECREF(sd);
            goto fail;
        }
        Py_DECREF(sd); /* (d holds it) */
        PyObject *dd = d;
        d = sd;
        SIDE_STATE(PUT)
        if (put_bytes(d, "pend", s->pend ? s->pend + s->poff : "", s->plen) < 0 ||
            put_int(d, "open", s->fd >= 0) < 0) {
            d = dd;
            goto fail;
        }
        d = dd;
    }
#undef PUT
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* export(slot, owner) -> (client_fd, backend_fd, state): the tunnel leaves this engine;
 * the caller owns both fds now (-1: that side was closed already). */
static PyObject *Engine_export(Engine *e, PyObject *args) {
    Py_ssize_t slot;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "nO", &slot, &owner)) return NULL;
    Tun *t = lookup(e, slot, owner);
    if (!t) return NULL;
    if (t->pending) {
        PyErr_SetString(PyExc_ValueError, "a connection still being set up does not move");
        return NULL;
    }
    PyObject *state = export_state(t);
    if (!state) return NULL;
    int fds[2];
    for (int i = 0; i < 2; i++) {
        fds[i] = t->s[i].fd;
        if (fds[i] >= 0) epoll_ctl(e->epfd, EPOLL_CTL_DEL, fds[i], NULL);
        t->s[i].fd = -1;
    }
    PyObject *r = Py_BuildValue("iiN", fds[0], fds[1], state);
    Py_DECREF(t->owner);
    release_slot(e, slot);
    return r;
}

static int import_side(Tun *t, int i, PyObject *sd, int fd) {
    Side *s = &t->s[i];
    unsigned long long v;
    const char *p;
    Py_ssize_t n;
#define GET(key, field)                                                                    \
    if (get_int(sd, key, &v) < 0) return -1;                                               \
    field = v;
    SIDE_STATE(GET)
#undef GET
    if (s->mode > CLOSEONDATA) {
        PyErr_SetString(PyExc_ValueError, "bad side mode");
        return -1;
    }
    if (get_bytes(sd, "pend", &p, &n) < 0) return -1;
    if (n && append(s, p, (size_t)n) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    s->fd = fd;
    s->rd = fd >= 0; /* look at the socket once: what waits there was not read yet */
    if (fd >= 0) { /* (O_NONBLOCK is the socket's, but make sure: reads must never wait) */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

static int import_state(Tun *t, PyObject *state, int cfd, int bfd) {
    unsigned long long v;
    const char *p;
    Py_ssize_t n;
#define GET(key, field)                                                                    \
    if (get_int(state, key, &v) < 0) return -1;                                            \
    field = v;
    TUN_STATE(GET)
#undef GET
    if (get_bytes(state, "hb", &p, &n) < 0) return -1;
    if (n > 13 || (n && t->skip)) {
        PyErr_SetString(PyExc_ValueError, "bad frame cursor");
        return -1;
    }
    memcpy(t->hb, p, (size_t)n);
    t->hn = (uint8_t)n;
    if (get_bytes(state, "chb", &p, &n) < 0) return -1;
    if (n > 13) {
        PyErr_SetString(PyExc_ValueError, "bad client frame cursor");
        return -1;
    }
    memcpy(t->chb, p, (size_t)n);
    t->chn = (uint8_t)n;
    int fds[2] = {cfd, bfd};
    for (int i = 0; i < 2; i++) {
        PyObject *sd = PyDict_GetItemString(state, SIDE_KEYS[i]);
        if (!sd || !PyDict_Check(sd)) {
            PyErr_Format(PyExc_ValueError, "state.%s missing", SIDE_KEYS[i]);
            return -1;
        }
        if (import_side(t, i, sd, fds[i]) < 0) return -1;
    }
    return 0;
}

/* import_tunnel(owner, client_fd, backend_fd, state) -> slot: a tunnel exported by another
 * engine goes on here (the engine owns the fds once this returns). */
static PyObject *Engine_import(Engine *e, PyObject *args) {
    PyObject *owner, *state;
    int cfd, bfd;
    if (!PyArg_ParseTuple(args, "OiiO!", &owner, &cfd, &bfd, &PyDict_Type, &state)) return NULL;
    Py_ssize_t slot = alloc_slot(e);
    Tun *t = slot < 0 ? NULL : PyMem_Calloc(1, sizeof(Tun));
    if (!t) {
        if (slot >= 0) e->freelist[e->nfree++] = slot;
        return PyErr_NoMemory();
    }
    t->s[0].fd = t->s[1].fd = -1;
    t->gen = ++e->gen;
    Py_INCREF(owner);
    t->owner = owner;
    e->slots[slot] = t;
    e->live++;
    if (import_state(t, state, cfd, bfd) < 0) {
        t->s[0].fd = t->s[1].fd = -1; /* the caller still owns (and closes) them */
        Py_DECREF(t->owner);
        release_slot(e, slot);
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        if (t->s[i].fd >= 0 && watch(e, t, slot, i) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            t->s[0].fd = t->s[1].fd = -1;
            Py_DECREF(t->owner);
            release_slot(e, slot);
            return NULL;
        }
    }
    for (int i = 0; i < 2; i++) { /* what was held unsent goes first, then input again */
        if (t->s[i].fd >= 0 && t->s[i].plen) on_writable(e, t, i);
    }
    for (int i = 0; i < 2; i++) {
        if (t->s[i].fd >= 0 && !t->s[i].plen && t->s[i].want_shut) do_shutdown(t, i);
        if (t->s[i].fd >= 0 && !t->s[i].plen && t->s[i].want_close) close_fd(e, &t->s[i]);
    }
    read_side(e, t, BACKEND);
    read_side(e, t, CLIENT);
    PyObject *r = PyLong_FromSsize_t(slot);
    settle(e, t, slot);
    deliver_done(e);
    return r;
}

static Py_ssize_t Engine_len(Engine *e) { return e->live; }

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd to watch for readability."},
    {"add", (PyCFunction)Engine_add, METH_VARARGS,
     "add(owner, client_fd, backend_fd, ws, partial, skip, saw_close) -> slot"},
    {"pump", (PyCFunction)Engine_pump, METH_NOARGS, "Forward everything ready."},
    {"counts", (PyCFunction)Engine_counts, METH_VARARGS, "counts(slot, owner) -> (in, out)"},
    {"go_away", (PyCFunction)Engine_go_away, METH_VARARGS, "go_away(slot, owner): drain"},
    {"close", (PyCFunction)Engine_close, METH_VARARGS, "close(slot, owner) -> (in, out)"},
    {"connect", (PyCFunction)Engine_connect, METH_VARARGS,
     "connect(owner, host, port, request) -> slot"},
    {"splice", (PyCFunction)Engine_splice, METH_VARARGS,
     "splice(slot, owner, new_owner, client_fd, to_client, to_backend, ws, partial, skip, "
     "saw_close)"},
    {"release", (PyCFunction)Engine_release, METH_VARARGS, "release(slot, owner) -> fd"},
    {"resume", (PyCFunction)Engine_resume, METH_VARARGS, "resume(slot, owner): read on"},
    {"connected", (PyCFunction)Engine_connected, METH_VARARGS, "connected(slot, owner) -> bool"},
    {"ws_policy", (PyCFunction)Engine_ws_policy, METH_VARARGS,
     "ws_policy(params, opcodes, frames, ping): see ws_rules.engine_ws_setup()"},
    {"sweep", (PyCFunction)Engine_sweep, METH_O,
     "sweep(now_ns) -> [(owner, close_kind)]: pings; the tunnels lbproxy closed"},
    {"messages", (PyCFunction)Engine_messages, METH_VARARGS,
     "messages(slot, owner) -> (in, out, close_kind, first_close)"},
    {"export", (PyCFunction)Engine_export, METH_VARARGS,
     "export(slot, owner) -> (client_fd, backend_fd, state): the tunnel leaves the engine"},
    {"import_tunnel", (PyCFunction)Engine_import, METH_VARARGS,
     "import_tunnel(owner, client_fd, backend_fd, state) -> slot"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Engine_seq = {.sq_length = (lenfunc)Engine_len};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lbproxy._splice.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native tunnel engine: one epoll set forwarding established tunnels.",
    .tp_methods = Engine_methods,
    .tp_as_sequence = &Engine_seq,
    .tp_new = Engine_new,
};

static struct PyModuleDef splice_module = {
    PyModuleDef_HEAD_INIT, "lbproxy._splice", "Native tunnel engine.", -1, NULL,
};

PyMODINIT_FUNC PyInit__splice(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&splice_module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
