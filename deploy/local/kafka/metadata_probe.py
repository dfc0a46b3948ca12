#!/usr/bin/env python3
"""Asks a Kafka broker for cluster metadata (Metadata v4, no topics) and says whether the cluster
is ready: the broker answers, a controller is elected and at least --brokers brokers are
registered. Exit status 0 when ready, 1 otherwise. The local scripts use it instead of a sleep.

Usage: metadata_probe.py HOST:PORT [--brokers N]
"""

import socket
import struct
import sys


def read_exact(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def metadata(host, port, timeout_s=2.0):
    client_id = b"tandem-probe"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    # Metadata v4 body: an empty topic array (brokers only), allow_auto_topic_creation=false.
    body = struct.pack(">ib", 0, 0)
    request = header + body
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        response = read_exact(sock, size)
    offset = 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from(fmt, response, offset)
        offset += struct.calcsize(fmt)
        return values

    def string():
        (length,) = take(">h")
        if length < 0:
            return None
        nonlocal offset
        value = response[offset:offset + length].decode()
        offset += length
        return value

    (correlation_id,) = take(">i")
    if correlation_id != 7:
        raise ValueError("unexpected correlation id")
    take(">i")  # throttle_time_ms
    (broker_count,) = take(">i")
    brokers = []
    for _ in range(broker_count):
        (node_id,) = take(">i")
        broker_host = string()
        (broker_port,) = take(">i")
        string()  # rack
        brokers.append((node_id, broker_host, broker_port))
    cluster_id = string()
    (controller_id,) = take(">i")
    return brokers, cluster_id, controller_id


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = args[0].rpartition(":")
    wanted = 1
    if "--brokers" in args:
        wanted = int(args[args.index("--brokers") + 1])
    try:
        brokers, cluster_id, controller_id = metadata(host, int(port))
    except (OSError, ValueError, struct.error) as error:
        print(f"not ready: {error}", file=sys.stderr)
        return 1
    if controller_id < 0 or len(brokers) < wanted:
        print(f"not ready: {len(brokers)} of {wanted} brokers, controller {controller_id}", file=sys.stderr)
        return 1
    print(f"cluster {cluster_id}: {len(brokers)} broker(s), controller {controller_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
