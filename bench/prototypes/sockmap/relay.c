/* relay.c - the user half of the sockmap relay prototype (see README.md).
 *
 *   relay -l LISTEN_PORT -b BACKEND_PORT [-u] [-o relay.bpf.o]
 *
 * Accepts on 127.0.0.1:LISTEN_PORT, connects each client to 127.0.0.1:BACKEND_PORT and relays
 * bytes both ways.  Default: the sockets go into a BPF sockmap whose stream verdict redirects
 * every skb to the peer socket in the kernel (user space never sees a byte).  -u: a plain
 * user-space epoll relay (one 64 KiB buffer, read then write) to compare with.  A prototype
 * for measuring, not a product: connects block, fds of closed pairs are closed only in -u
 * mode, errors end the process.  Loopback only.  Build: see README.md. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) die("bind/listen");
    return fd;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* (local port << 16 | remote port) of a connected socket: what the verdict program sees */
static uint32_t port_key(int fd) {
    struct sockaddr_in l, r;
    socklen_t ll = sizeof l, rl = sizeof r;
    if (getsockname(fd, (struct sockaddr *)&l, &ll) < 0 || getpeername(fd, (struct sockaddr *)&r, &rl) < 0)
        die("getsockname/getpeername");
    return (uint32_t)ntohs(l.sin_port) << 16 | ntohs(r.sin_port);
}

static void run_sockmap(int lfd, int bport, const char *obj_path) {
    struct bpf_object *obj = bpf_object__open_file(obj_path, NULL);
    if (!obj || bpf_object__load(obj)) die("bpf_object load");
    int socks = bpf_object__find_map_fd_by_name(obj, "socks");
    int peer = bpf_object__find_map_fd_by_name(obj, "peer");
    struct bpf_program *prog = bpf_object__find_program_by_name(obj, "relay_verdict");
    if (socks < 0 || peer < 0 || !prog) die("maps/program");
    if (bpf_prog_attach(bpf_program__fd(prog), socks, BPF_SK_SKB_STREAM_VERDICT, 0)) die("attach");
    printf("READY sockmap\n");
    fflush(stdout);
    for (uint32_t slot = 0;; slot = (slot + 2) % 65536) {
        int c = accept(lfd, NULL, NULL), one = 1;
        if (c < 0) die("accept");
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int b = connect_to(bport);
        uint32_t kc = port_key(c), kb = port_key(b), sc = slot, sb = slot + 1;
        /* peers first: once a socket is in the map its bytes go through the verdict */
        if (bpf_map_update_elem(peer, &kc, &sb, BPF_ANY) || bpf_map_update_elem(peer, &kb, &sc, BPF_ANY))
            die("peer update");
        uint32_t vc = (uint32_t)c, vb = (uint32_t)b;
        /* a socket no longer established (a client that connected and closed at once, like
         * a port probe) is refused by the map: drop the pair */
        if (bpf_map_update_elem(socks, &sb, &vb, BPF_ANY) || bpf_map_update_elem(socks, &sc, &vc, BPF_ANY)) {
            bpf_map_delete_elem(socks, &sb);
            close(c);
            close(b);
            continue;
        }
        /* bytes the client sent before its socket joined the map sit in its receive queue and
         * no verdict will see them: forward those once from here.  Safe only because the
         * generator's client waits for its echo before sending more (a real relay would add
         * the sockets before the peer may speak: for a websocket, before writing the 101). */
        char early[4096];
        ssize_t r;
        while ((r = recv(c, early, sizeof early, MSG_DONTWAIT)) > 0)
            if (send(b, early, (size_t)r, MSG_NOSIGNAL) != r) die("send early bytes");
    }
}

static void run_user(int lfd, int bport) {
    int ep = epoll_create1(0);
    static int peer_of[65536];
    static char buf[65536];
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[128];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("READY user\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 128, -1);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) {
                int c = accept(lfd, NULL, NULL), one = 1;
                if (c < 0 || c >= 65536) die("accept");
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                int b = connect_to(bport);
                if (b >= 65536) die("fd");
                peer_of[c] = b, peer_of[b] = c;
                struct epoll_event e1 = {.events = EPOLLIN, .data.fd = c}, e2 = {.events = EPOLLIN, .data.fd = b};
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &e1);
                epoll_ctl(ep, EPOLL_CTL_ADD, b, &e2);
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r <= 0) {
                if (r < 0 && errno == EINTR) continue;
                close(peer_of[fd]);
                close(fd);
                continue;
            }
            for (ssize_t off = 0; off < r;) { /* small messages: the write rarely blocks */
                ssize_t w = send(peer_of[fd], buf + off, (size_t)(r - off), MSG_NOSIGNAL);
                if (w < 0) { if (errno == EINTR) continue; break; }
                off += w;
            }
        }
    }
}

int main(int argc, char **argv) {
    int lport = 0, bport = 0, user = 0, opt;
    const char *obj = "relay.bpf.o";
    while ((opt = getopt(argc, argv, "l:b:uo:")) != -1) {
        if (opt == 'l') lport = atoi(optarg);
        else if (opt == 'b') bport = atoi(optarg);
        else if (opt == 'u') user = 1;
        else if (opt == 'o') obj = optarg;
        else return 2;
    }
    if (!lport || !bport) { fprintf(stderr, "relay -l PORT -b PORT [-u] [-o relay.bpf.o]\n"); return 2; }
    int lfd = listen_on(lport);
    if (user) run_user(lfd, bport);
    else run_sockmap(lfd, bport, obj);
    return 0;
}
