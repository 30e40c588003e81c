/* backend.c - single-threaded epoll backend for the lbproxy benchmark.
 *
 * One listener on 127.0.0.1:PORT serves, per connection, whichever the first
 * request head asks for:
 *   - a request with "Upgrade: websocket": RFC 6455 handshake (Sec-WebSocket-Accept
 *     computed), then every client frame (masked) is unmasked and echoed back as an
 *     unmasked frame with the same opcode/FIN; ping -> pong; close -> close frame echoed,
 *     then the TCP connection is closed (the server closes first, as RFC 6455 asks).
 *   - any other request: "200 ok" (2-byte body) with keep-alive; pipelined requests and
 *     Content-Length request bodies are handled; "Connection: close" closes after the reply.
 *   - with -t: raw TCP echo instead (every byte read is written back).
 *   - with -i ID: the 101 response carries "X-Bench-Backend: ID", so that a client behind
 *     a proxy knows which backend its websocket landed on (the failover scenario).
 * Derived from perf-baseline/echo_srv.c.  Loopback only.
 *   backend -p PORT [-t] [-i ID]  Build: gcc -O2 -o backend backend.c
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
#include <unistd.h>

#define RDBUF (256 * 1024)
#define MAXIN (4 * 1024 * 1024)
#define MAXHEAD 65536

enum { ST_HEAD = 0, ST_WS = 1, ST_CLOSING = 2 };

typedef struct conn {
    int fd;
    int state;
    int want_out;
    size_t body_left; /* HTTP request body bytes still to skip */
    unsigned char *in; size_t inlen, incap;
    unsigned char *out; size_t outlen, outoff, outcap;
} conn;

static int tcp_mode = 0, epfd, backend_id = 0;
static unsigned char rdbuf[RDBUF];
static const char HTTP_OK[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";

/* ---------- SHA1 + base64 (for Sec-WebSocket-Accept) ---------- */
static uint32_t rol(uint32_t v, int b) { return (v << b) | (v >> (32 - b)); }
static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t nlen = ((len + 8) / 64 + 1) * 64;
    unsigned char m[512];
    if (nlen > sizeof m) { memset(out, 0, 20); return; }
    memset(m, 0, nlen);
    memcpy(m, msg, len); m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[nlen - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t off = 0; off < nlen; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f, k;
        for (int i = 0; i < 80; i++) {
            if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
            else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
            else { f = b ^ c ^ d; k = 0xCA62C1D6; }
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = rol(b, 30); b = a; a = t;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (unsigned char)(h[i] >> (24 - 8 * j));
}
static void b64(const unsigned char *in, size_t n, char *out) {
    static const char *t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < n ? in[i + 2] : 0);
        out[o++] = t[(v >> 18) & 63]; out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < n ? t[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---------- connection helpers ---------- */
static void set_ev(conn *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}
static void conn_close(conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in); free(c->out); free(c);
}
static void out_append(conn *c, const void *p, size_t n) {
    if (c->outoff && c->outoff == c->outlen) c->outoff = c->outlen = 0;
    if (c->outlen + n > c->outcap) {
        if (c->outoff) {
            memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
            c->outlen -= c->outoff; c->outoff = 0;
        }
        if (c->outlen + n > c->outcap) {
            c->outcap = (c->outlen + n) * 2;
            c->out = realloc(c->out, c->outcap);
        }
    }
    memcpy(c->out + c->outlen, p, n); c->outlen += n;
}
/* returns -1 on fatal error, 0 if all flushed, 1 if data still pending */
static int flush_out(conn *c) {
    while (c->outoff < c->outlen) {
        ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
        if (w < 0) { if (errno == EAGAIN) return 1; if (errno == EINTR) continue; return -1; }
        c->outoff += (size_t)w;
    }
    c->outoff = c->outlen = 0;
    return 0;
}

/* value of header NAME (with colon) inside [p, end), copied into v (NUL-terminated) */
static int header_value(const char *p, const char *end, const char *name, char *v, size_t vcap) {
    size_t nl = strlen(name);
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        if ((size_t)(eol - p) > nl && strncasecmp(p, name, nl) == 0) {
            const char *s = p + nl;
            while (s < eol && (*s == ' ' || *s == '\t')) s++;
            size_t l = 0;
            while (s + l < eol && s[l] != '\r' && l + 1 < vcap) l++;
            memcpy(v, s, l); v[l] = 0;
            return 1;
        }
        p = eol + 1;
    }
    return 0;
}

/* one complete request head of hlen bytes at c->in: -1 close, 0 http, 1 switched to ws */
static int on_head(conn *c, size_t hlen) {
    const char *p = (const char *)c->in, *end = p + hlen;
    char v[256];
    if (header_value(p, end, "Upgrade:", v, sizeof v) && strcasestr(v, "websocket")) {
        char key[128];
        if (!header_value(p, end, "Sec-WebSocket-Key:", key, sizeof key) || !key[0]) return -1;
        char cat[256];
        snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
        unsigned char dg[20]; sha1((unsigned char *)cat, strlen(cat), dg);
        char acc[64]; b64(dg, 20, acc);
        char resp[320], idh[48] = "";
        if (backend_id) snprintf(idh, sizeof idh, "X-Bench-Backend: %d\r\n", backend_id);
        int n = snprintf(resp, sizeof resp,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n", acc, idh);
        out_append(c, resp, (size_t)n);
        c->state = ST_WS;
        return 1;
    }
    out_append(c, HTTP_OK, sizeof HTTP_OK - 1);
    if (header_value(p, end, "Content-Length:", v, sizeof v)) c->body_left = (size_t)strtoull(v, NULL, 10);
    if (header_value(p, end, "Connection:", v, sizeof v) && strcasestr(v, "close")) return -1;
    return 0;
}

/* consume HTTP requests from c->in; -1 close (after flushing), 0 ok */
static int http_process(conn *c) {
    size_t off = 0;
    for (;;) {
        if (c->body_left) {
            size_t take = c->inlen - off < c->body_left ? c->inlen - off : c->body_left;
            off += take; c->body_left -= take;
            if (c->body_left) break;
        }
        unsigned char *end = memmem(c->in + off, c->inlen - off, "\r\n\r\n", 4);
        if (!end) { if (c->inlen - off > MAXHEAD) return -1; break; }
        size_t hlen = (size_t)(end - (c->in + off)) + 4;
        memmove(c->in, c->in + off, c->inlen - off); c->inlen -= off; off = 0;
        int r = on_head(c, hlen);
        off = hlen;
        if (r < 0) { flush_out(c); return -1; }
        if (r == 1) break;
    }
    if (off) { memmove(c->in, c->in + off, c->inlen - off); c->inlen -= off; }
    return 0;
}

static void unmask(unsigned char *pl, uint64_t plen, const unsigned char m[4]) {
    uint64_t m8; unsigned char mm[8];
    for (int i = 0; i < 8; i++) mm[i] = m[i & 3];
    memcpy(&m8, mm, 8);
    size_t i = 0;
    for (; i + 8 <= plen; i += 8) { uint64_t v; memcpy(&v, pl + i, 8); v ^= m8; memcpy(pl + i, &v, 8); }
    for (; i < plen; i++) pl[i] ^= m[i & 3];
}

static int ws_process(conn *c) { /* -1 close */
    size_t off = 0;
    for (;;) {
        size_t av = c->inlen - off;
        unsigned char *f = c->in + off;
        if (av < 2) break;
        int fin_op = f[0], masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7f; size_t hl = 2;
        if (plen == 126) { if (av < 4) break; plen = (uint64_t)f[2] << 8 | f[3]; hl = 4; }
        else if (plen == 127) {
            if (av < 10) break;
            plen = 0; for (int i = 0; i < 8; i++) plen = plen << 8 | f[2 + i];
            hl = 10;
        }
        size_t mk = hl; if (masked) hl += 4;
        if (plen > MAXIN) return -1;
        if (av < hl + plen) break;
        unsigned char *pl = f + hl;
        if (masked) unmask(pl, plen, f + mk);
        int op = fin_op & 0x0f;
        if (op == 9) fin_op = (fin_op & 0xf0) | 0xA; /* ping -> pong */
        unsigned char oh[10]; size_t ohl;
        oh[0] = (unsigned char)fin_op;
        if (plen < 126) { oh[1] = (unsigned char)plen; ohl = 2; }
        else if (plen < 65536) { oh[1] = 126; oh[2] = (unsigned char)(plen >> 8); oh[3] = (unsigned char)plen; ohl = 4; }
        else { oh[1] = 127; for (int i = 0; i < 8; i++) oh[2 + i] = (unsigned char)(plen >> (56 - 8 * i)); ohl = 10; }
        if (op != 0xA) { out_append(c, oh, ohl); out_append(c, pl, plen); } /* ignore client pongs */
        off += hl + plen;
        if (op == 8) { c->state = ST_CLOSING; break; }
    }
    if (off) { memmove(c->in, c->in + off, c->inlen - off); c->inlen -= off; }
    return 0;
}

/* after a flush: close once the close-frame echo has gone out */
static int finish_write(conn *c) {
    int fr = flush_out(c);
    if (fr < 0 || (fr == 0 && c->state == ST_CLOSING)) { conn_close(c); return -1; }
    set_ev(c, fr == 1);
    return fr;
}

static void on_readable(conn *c) {
    for (;;) {
        ssize_t r = read(c->fd, rdbuf, RDBUF);
        if (r == 0) { conn_close(c); return; }
        if (r < 0) { if (errno == EAGAIN) return; if (errno == EINTR) continue; conn_close(c); return; }
        if (tcp_mode) {
            out_append(c, rdbuf, (size_t)r);
        } else {
            if (c->inlen + (size_t)r > c->incap) {
                c->incap = (c->inlen + (size_t)r) * 2;
                c->in = realloc(c->in, c->incap);
            }
            memcpy(c->in + c->inlen, rdbuf, (size_t)r); c->inlen += (size_t)r;
            if (c->state == ST_HEAD && http_process(c) < 0) { conn_close(c); return; }
            if (c->state == ST_WS && ws_process(c) < 0) { conn_close(c); return; }
        }
        if (finish_write(c) != 0) return; /* closed, or output pending: wait for EPOLLOUT */
        if ((size_t)r < RDBUF) return;
    }
}

static void accept_all(int ls) {
    int one = 1;
    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) return;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn *nc = calloc(1, sizeof *nc);
        nc->fd = fd;
        struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e2);
    }
}

int main(int argc, char **argv) {
    int port = 0, opt;
    while ((opt = getopt(argc, argv, "p:ti:")) != -1) {
        if (opt == 'p') port = atoi(optarg);
        else if (opt == 't') tcp_mode = 1;
        else if (opt == 'i') backend_id = atoi(optarg);
        else { fprintf(stderr, "usage: %s -p PORT [-t] [-i ID]\n", argv[0]); return 2; }
    }
    if (port <= 0) { fprintf(stderr, "usage: %s -p PORT [-t] [-i ID]\n", argv[0]); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); return 1; }
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[512];
    fprintf(stderr, "backend listening 127.0.0.1:%d mode=%s\n", port, tcp_mode ? "tcp" : "http+ws");
    for (;;) {
        int n = epoll_wait(epfd, evs, 512, -1);
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (!c) { accept_all(ls); continue; }
            if (c->want_out) {
                if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLOUT)) { conn_close(c); continue; }
                if (finish_write(c) == 0) on_readable(c); /* may have unprocessed input */
            } else {
                on_readable(c);
            }
        }
    }
}
