#!/usr/bin/env python3
"""Upstream DNS server of the soak benchmark (UDP, loopback): answers every A question with
192.0.2.<n> (n from a hash of the name). Names starting with `cached.` get TTL 60, so the
gateway caches them; every other name TTL 0, so each query is a real upstream round trip.
Other types: NOERROR without answers. Usage: dnsup.py HOST PORT"""
import socket
import sys
import zlib


def answer(query: bytes) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags = query[0:2], int.from_bytes(query[2:4], "big")
    if flags & 0x8000 or int.from_bytes(query[4:6], "big") != 1:
        return None
    i, labels = 12, []
    while i < len(query) and query[i] != 0:
        n = query[i]
        labels.append(query[i + 1:i + 1 + n])
        i += 1 + n
    end = i + 5  # root label, qtype, qclass
    if end > len(query):
        return None
    qtype = int.from_bytes(query[i + 1:i + 3], "big")
    question = query[12:end]
    name = b".".join(labels).lower()
    rd = flags & 0x0100
    head = qid + (0x8080 | rd).to_bytes(2, "big") + b"\x00\x01"
    if qtype != 1:
        return head + b"\x00\x00\x00\x00\x00\x00" + question
    ttl = 60 if name.startswith(b"cached.") else 0
    ip = bytes([192, 0, 2, 1 + zlib.crc32(name) % 250])
    rr = b"\xc0\x0c\x00\x01\x00\x01" + ttl.to_bytes(4, "big") + b"\x00\x04" + ip
    return head + b"\x00\x01\x00\x00\x00\x00" + question + rr


def main() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("READY", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        reply = answer(data)
        if reply:
            s.sendto(reply, peer)


main()
