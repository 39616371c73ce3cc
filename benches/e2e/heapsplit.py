#!/usr/bin/env python3
"""Splits a heaptrack peak profile of leasegate into what an idle session is made of.

    heaptrack_print -f heaptrack.zst -p 0 -a 0 -T 0 -F stacks.txt --flamegraph-cost-type peak
    python3 benches/e2e/heapsplit.py stacks.txt --sessions 1000

Each stack (heaptrack's flame-graph format: frames root first, `;`-separated, then the bytes
live at the peak) that runs through hyper is the Vault HTTP client's; any other goes to the
first category whose pattern occurs in it, searching from the allocating frame towards the
root; the table gives bytes per session for --sessions sessions held at the peak.
"""

import argparse
import collections
import re

# (category, regular expression on one frame), tried in this order on each frame from the leaf.
CATEGORIES = [
    ("tokio task cell (the session future, its state machine)", r"bind_new_task|bind<> \(list\.rs\)"),
    ("Vault HTTP client (hyper pool, shared)", r"hyper|reqwest|http1|dispatch\.rs|\(client\.rs\)"),
    ("tokio mpsc channel", r"channel_from_index|channel<> \(bounded"),
    ("tokio::io::split (stream moved to the heap)", r"split<> \(split\.rs\)"),
    ("rustls deframer buffer (client TLS read)", r"prepare_read \(buffers\.rs\)"),
    ("rustls record-layer keys (aws-lc AEAD)", r"aead_ctx\.rs"),
    ("rustls connection state", r"for_server|server_conn\.rs|conn\.rs"),
    ("client certificate copy (rustls peer certs)", r"into_owned"),
    ("relay buffers", r"relay\.rs|relay_buf|bufpool"),
    ("upstream login buffers", r"login\.rs"),
    ("Vault HTTP client (hyper pool, shared)", r"hyper|reqwest|http1|dispatch\.rs"),
    ("client TLS stream (boxed in the handshake)", r"handshake\.rs"),
    ("session registry entry (sessions list)", r"register \(registry\.rs\)|credential \(registry\.rs\)"),
    ("tokio I/O registrations (the two sockets)", r"add_source<> \(driver\.rs\)"),
]

# A stack that runs through hyper is the Vault HTTP client's whatever its leaf frames say
# (its dispatch channel is a tokio mpsc channel, its read buffer grows in a `conn.rs`).
HYPER = re.compile(r"hyper|reqwest|http1|dispatch\.rs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks")
    ap.add_argument("--sessions", type=int, required=True)
    a = ap.parse_args()
    total = collections.Counter()
    for line in open(a.stacks):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")[::-1]
        cat = "other"
        for f in frames:
            hit = next((c for c, rx in CATEGORIES if re.search(rx, f)), None)
            if hit:
                cat = hit
                break
        if any(HYPER.search(f) for f in frames):
            cat = "Vault HTTP client (hyper pool, shared)"
        total[cat] += int(n)
    print(f"| heap at the peak, by what allocated it | bytes per session ({a.sessions} held) |")
    print("| --- | ---: |")
    for cat, n in total.most_common():
        print(f"| {cat} | {n / a.sessions:,.0f} |")
    print(f"| **total** | **{sum(total.values()) / a.sessions:,.0f}** |")


if __name__ == "__main__":
    main()
