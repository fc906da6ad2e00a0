#!/usr/bin/python3
"""Send one ICMP echo to each address given; exit 1 naming those that did not answer.

Preflight runs this on a host, before anything is installed there, to check
that the private network carries traffic from it to the hosts of the tier it
will talk to: ICMP, which the project's firewall always accepts, as no port
of the other tier may be listening yet. Needs root (a raw socket) unless the
kernel allows unprivileged ICMP sockets (net.ipv4.ping_group_range).
"""

import os
import select
import socket
import struct
import sys
import time

TIMEOUT = 3.0
TRIES = 3


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def open_socket(family):
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        return socket.socket(family, socket.SOCK_RAW, proto), True
    except PermissionError:
        return socket.socket(family, socket.SOCK_DGRAM, proto), False


def answers(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock, raw = open_socket(family)
    request, reply = (128, 129) if family == socket.AF_INET6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    with sock:
        for seq in range(1, TRIES + 1):
            payload = b"chat-preflight"
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            # The kernel fills in ICMPv6's checksum (it covers the IPv6 header).
            if family == socket.AF_INET:
                header = struct.pack("!BBHHH", request, 0, checksum(header + payload), ident, seq)
            sock.sendto(header + payload, (address, 0))
            deadline = time.monotonic() + TIMEOUT / TRIES
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                packet, source = sock.recvfrom(2048)
                # A raw IPv4 socket hands over the IP header too.
                if raw and family == socket.AF_INET:
                    packet = packet[(packet[0] & 0x0F) * 4:]
                kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", packet[:8])
                # An unprivileged socket's id is the kernel's, not ours.
                if source[0] == address and kind == reply and got_seq == seq and (got_ident == ident or not raw):
                    return True
    return False


def main(addresses):
    silent = [address for address in addresses if not answers(address)]
    if silent:
        print(" ".join(silent))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
