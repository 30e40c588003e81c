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
 * Per side modes:  FWD  = forward what is read to the other side;
 *                  DROP = read and drop until EOF, then close (Discard);
 *                  CLOSEONDATA = close on anything read (ClosingHandshake).
 * A side closes once its pending output is flushed.  When both sides are
 * closed the tunnel is finished.  No Python object is touched per chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { FWD = 0, DROP = 1, CLOSEONDATA = 2 };
enum { CLIENT = 0, BACKEND = 1 };
#define MAX_EVENTS 256

typedef struct {
    int fd;           /* -1 once closed */
    uint32_t mask;    /* registered epoll mask (0 = not registered) */
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
    int reason_errno;
    uint8_t hb[14];
    uint64_t skip;
} Tun;

typedef struct {
    PyObject *owner;
    PyObject *reason;
    uint64_t nin, nout;
} Finished;

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
    Finished *done;
    Py_ssize_t ndone, capdone;
    uint32_t gen;
} Engine;

static const uint8_t GOING_AWAY[] = {0x88, 20, 0x03, 0xE9, 'b', 'a', 'c', 'k', 'e', 'n', 'd', ' ',
                                     'g', 'o', 'i', 'n', 'g', ' ', 'a', 'w', 'a', 'y'};

/* ---- helpers ------------------------------------------------------------ */

static int is_reading(Tun *t, int i) {
    Side *s = &t->s[i];
    if (s->fd < 0 || s->want_close) return 0;
    if (s->mode != FWD) return 1;
    return !s->eof && t->s[!i].plen == 0;
}

/* Re-arm side i of the tunnel in slot ``slot`` for what it now waits for. */
static void update(Engine *e, Tun *t, Py_ssize_t slot, int i) {
    Side *s = &t->s[i];
    if (s->fd < 0) return;
    uint32_t want = (is_reading(t, i) ? EPOLLIN : 0) | (s->plen ? EPOLLOUT : 0);
    if (want == s->mask) return;
    struct epoll_event ev;
    ev.events = want;
    ev.data.u64 = ((uint64_t)t->gen << 32) | ((uint64_t)slot << 1) | (uint64_t)i;
    int op = s->mask == 0 ? EPOLL_CTL_ADD : (want == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD);
    epoll_ctl(e->epfd, op, s->fd, &ev);
    s->mask = want;
}

static int append(Side *s, const char *p, size_t n) {
    if (s->plen + n > s->pcap) {
        size_t cap = s->pcap ? s->pcap : 4096;
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
        if (s->mask) epoll_ctl(e->epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        s->fd = -1;
    }
    s->mask = 0;
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

/* The 1001 close (RFC 6455 7.1.1: then wait for the client's close and let it end). */
static void send_going_away(Engine *e, Tun *t) {
    t->going_away = 0;
    Side *c = &t->s[CLIENT];
    if (send_to(t, CLIENT, (const char *)GOING_AWAY, sizeof GOING_AWAY) < 0) {
        side_failed(e, t, CLIENT, errno);
        return;
    }
    c->mode = CLOSEONDATA;
    do_shutdown(t, CLIENT);
    t->s[BACKEND].mode = DROP;
    do_shutdown(t, BACKEND);
}

static void part_both(Tun *t) {
    t->going_away = 0;
    for (int i = 0; i < 2; i++) {
        if (t->s[i].mode == FWD) t->s[i].mode = DROP;
        do_shutdown(t, i);
    }
}

static int at_boundary(Tun *t) { return t->skip == 0 && t->hn == 0; }

/* Advance the backend->client frame cursor over p[0..n).  With stop, stop at the first
 * frame boundary reached and return the bytes consumed up to it. */
static size_t ws_scan(Tun *t, const uint8_t *p, size_t n, int stop) {
    size_t pos = 0;
    for (;;) {
        if (t->skip) {
            uint64_t take = n - pos < t->skip ? n - pos : t->skip;
            t->skip -= take;
            pos += take;
            if (stop && t->skip == 0) return pos;
        }
        if (pos >= n) return pos;
        while (t->hn < 2 && pos < n) t->hb[t->hn++] = p[pos++];
        if (t->hn < 2) return pos;
        uint8_t len7 = t->hb[1] & 0x7F;
        size_t need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((t->hb[1] & 0x80) ? 4 : 0);
        while (t->hn < need && pos < n) t->hb[t->hn++] = p[pos++];
        if (t->hn < need) return pos;
        uint64_t size = len7;
        if (len7 == 126) size = ((uint64_t)t->hb[2] << 8) | t->hb[3];
        else if (len7 == 127) {
            size = 0;
            for (int k = 2; k < 10; k++) size = (size << 8) | t->hb[k];
        }
        if ((t->hb[0] & 0x0F) == 0x8) t->saw_close = 1;
        t->hn = 0;
        t->skip = size;
        if (stop && size == 0) return pos;
    }
}

static void side_failed(Engine *e, Tun *t, int i, int err) {
    set_reason(t, i, err);
    Side *s = &t->s[i];
    s->failed = 1;
    close_fd(e, s);
    close_side(e, t, !i); /* the other side flushes what it has, then closes */
}

static void on_readable(Engine *e, Tun *t, int i) {
    Side *a = &t->s[i];
    ssize_t n = recv(a->fd, e->buf, e->bufsize, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        side_failed(e, t, i, errno);
        return;
    }
    if (n == 0) {
        a->eof = 1;
        if (a->mode != FWD) {
            close_side(e, t, i);
            return;
        }
        set_reason(t, i, 0);
        if (t->s[!i].eof || t->s[!i].fd < 0) { /* both directions done */
            close_side(e, t, !i);
            close_side(e, t, i);
        } else {
            do_shutdown(t, !i); /* pass the half-close on */
        }
        return;
    }
    a->nread += (uint64_t)n;
    if (a->mode == DROP) return;
    if (a->mode == CLOSEONDATA) {
        close_side(e, t, i);
        return;
    }
    size_t len = (size_t)n;
    if (i == BACKEND && t->ws) {
        if (t->going_away) {
            len = at_boundary(t) ? 0 : ws_scan(t, (const uint8_t *)e->buf, len, 1);
            if (len && send_to(t, CLIENT, e->buf, len) < 0) {
                side_failed(e, t, CLIENT, errno);
                return;
            }
            if (at_boundary(t)) {
                if (t->saw_close) part_both(t);
                else send_going_away(e, t);
            }
            return;
        }
        ws_scan(t, (const uint8_t *)e->buf, len, 0);
    }
    if (send_to(t, !i, e->buf, len) < 0) side_failed(e, t, !i, errno);
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
    if (s->pcap > 65536) free_pend(s); /* give big bursts' memory back */
    s->poff = 0;
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
        release_slot(e, slot);
        return;
    }
    update(e, t, slot, 0);
    update(e, t, slot, 1);
}

static void deliver_done(Engine *e) {
    while (e->ndone) {
        Finished f = e->done[--e->ndone];
        PyObject *r = NULL;
        if (f.reason) {
            r = PyObject_CallFunction(e->on_finish, "OOKK", f.owner, f.reason,
                                      (unsigned long long)f.nin, (unsigned long long)f.nout);
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
    static char *kwlist[] = {"on_finish", "bufsize", NULL};
    PyObject *cb;
    Py_ssize_t bufsize = 256 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|n", kwlist, &cb, &bufsize)) return NULL;
    if (!PyCallable_Check(cb) || bufsize < 1024) {
        PyErr_SetString(PyExc_ValueError, "on_finish must be callable and bufsize >= 1024");
        return NULL;
    }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e) return NULL;
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
    PyBuffer_Release(&partial);
    t->gen = ++e->gen;
    Py_INCREF(owner);
    t->owner = owner;
    e->slots[slot] = t;
    e->live++;
    update(e, t, slot, 0);
    update(e, t, slot, 1);
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
            if ((ev & EPOLLOUT) && t->s[i].plen) on_writable(e, t, i);
            if (t->s[i].fd >= 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                if (t->s[i].mask & EPOLLIN) on_readable(e, t, i);
                else if (ev & (EPOLLHUP | EPOLLERR)) { /* waiting to write, and the peer is gone */
                    int err = 0;
                    socklen_t len = sizeof err;
                    getsockopt(t->s[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
                    side_failed(e, t, i, err ? err : EPIPE);
                }
            }
            settle(e, t, slot);
        }
        if (n < MAX_EVENTS) break;
    }
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
        if (!t->ws || t->saw_close) part_both(t);
        else if (at_boundary(t)) send_going_away(e, t);
        else t->going_away = 1; /* finish the frame in flight first */
    }
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

static Py_ssize_t Engine_len(Engine *e) { return e->live; }

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd to watch for readability."},
    {"add", (PyCFunction)Engine_add, METH_VARARGS,
     "add(owner, client_fd, backend_fd, ws, partial, skip, saw_close) -> slot"},
    {"pump", (PyCFunction)Engine_pump, METH_NOARGS, "Forward everything ready."},
    {"counts", (PyCFunction)Engine_counts, METH_VARARGS, "counts(slot, owner) -> (in, out)"},
    {"go_away", (PyCFunction)Engine_go_away, METH_VARARGS, "go_away(slot, owner): drain"},
    {"close", (PyCFunction)Engine_close, METH_VARARGS, "close(slot, owner) -> (in, out)"},
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
