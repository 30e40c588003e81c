// SPDX-License-Identifier: GPL-2.0
/* relay.bpf.c - the kernel half of the sockmap relay prototype (see README.md).
 *
 * A stream-verdict program on the sockmap `socks`: every skb that arrives on a socket in the
 * map is looked up by (local port, remote port) in `peer`, which names the sockmap slot of the
 * socket on the other side of the relay; the skb is redirected to that socket's send queue
 * without ever waking user space.  No stream parser: bytes are forwarded as they arrive (a
 * websocket-aware version would add a parser returning frame lengths, so that a verdict is
 * taken per frame and the relay could still insert pings or close frames at boundaries). */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, 65536);
    __type(key, __u32);
    __type(value, __u32);
} socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u32);   /* local port << 16 | remote port, host order */
    __type(value, __u32); /* the peer socket's slot in socks */
} peer SEC(".maps");

SEC("sk_skb/stream_verdict")
int relay_verdict(struct __sk_buff *skb) {
    /* remote_port holds the port in network order; local_port in host order */
    __u32 key = (skb->local_port << 16) | (bpf_ntohl(skb->remote_port) & 0xffff);
    __u32 *slot = bpf_map_lookup_elem(&peer, &key);
    if (!slot) return SK_PASS;
    return bpf_sk_redirect_map(skb, &socks, *slot, 0);
}

char LICENSE[] SEC("license") = "GPL";
