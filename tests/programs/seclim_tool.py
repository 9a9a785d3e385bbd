import os, selectors, socket, sys, time, json, errno
mode = sys.argv[1]

def frame(body, i):
    return b"GCB1\x00" + json.dumps({"v": 1, "id": i, "body": body}).encode()

if mode == "hold":
    # hold HOST PORT N FIRST_BYTES: keep N TCP connections open (re-open the closed ones),
    # each having sent FIRST_BYTES (may be empty).
    host, port, n, first = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()
    sel = selectors.DefaultSelector()
    opened = 0
    def one():
        global opened
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, port))
            if first:
                s.send(first)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            opened += 1
        except OSError:
            s.close()
    for _ in range(n):
        one()
    print("OPENED", opened, flush=True)
    while True:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                d = s.recv(4096)
            except OSError:
                d = b""
            if not d:
                sel.unregister(s)
                s.close()
                one()

elif mode == "connect_flood":
    # connect_flood BROKER:PORT PROXY N
    host, port = sys.argv[2].rsplit(":", 1)
    proxy, n = sys.argv[3], int(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5555))
    for i in range(n):
        body = {"type": "connect_request", "proxy": proxy, "transport": "tcp",
                "connector_local": "203.0.113.11:5555"}
        s.sendto(frame(body, 1000 + i), (host, int(port)))
        if i % 50 == 49:
            time.sleep(0.01)
    print("SENT", n, flush=True)

elif mode == "register_flood":
    # register_flood BROKER:PORT SOCKETS PER_SOCKET
    host, port = sys.argv[2].rsplit(":", 1)
    socks, per = int(sys.argv[3]), int(sys.argv[4])
    sent = 0
    for k in range(socks):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(per):
            body = {"type": "register", "transport": "tcp",
                    "local": "10.9.%d.%d:%d" % (k, i % 250, 1000 + i)}
            s.sendto(frame(body, 1 + i), (host, int(port)))
            sent += 1
        s.close()
    print("SENT", sent, flush=True)

elif mode == "udp_spray":
    # udp_spray PROXY_IP PROXY_PORT N: one datagram from each of N source ports
    ip, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 20000 + i))  # distinct source ports, even after closing
        s.sendto(b"spray %d" % i, (ip, port))
        socks.append(s)
        if i % 20 == 19:
            time.sleep(0.002)  # no drops in the proxy socket's buffer
        if len(socks) >= 500:
            for x in socks:
                x.close()
            socks = []
    print("SENT", n, flush=True)

elif mode == "udp_echo_server":
    # udp_echo_server PORT: echoes every datagram
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    print("BOUND", s.getsockname(), flush=True)
    while True:
        d, a = s.recvfrom(65536)
        s.sendto(d, a)

elif mode == "udp_ask":
    # udp_ask IP PORT PAYLOAD_HEX: sends, waits for the echo (retries), prints it
    ip, port, data = sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    for _ in range(10):
        s.sendto(data, (ip, port))
        try:
            d, a = s.recvfrom(65536)
            print("ECHO", d.hex(), flush=True)
            sys.exit(0)
        except socket.timeout:
            pass
    print("NO_ECHO", flush=True)
    sys.exit(1)

elif mode == "sink":
    # sink PORT: accepts one connection, reads until the end, says how it ended
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(sys.argv[2])))
    l.listen(4)
    print("LISTENING", flush=True)
    c, a = l.accept()
    n = 0
    try:
        while True:
            d = c.recv(65536)
            if not d:
                print("EOF", n, flush=True)
                break
            n += len(d)
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, e.errno), n, flush=True)

elif mode == "slow_send":
    # slow_send IP PORT MIB: sends MIB MiB at ~6 MB/s
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    chunk = b"x" * 65536
    sent = 0
    try:
        for _ in range(int(sys.argv[4]) * 16):
            s.sendall(chunk)
            sent += len(chunk)
            time.sleep(0.01)
        s.shutdown(socket.SHUT_WR)
        print("SENT", sent, flush=True)
    except OSError as e:
        print("SEND_ERR", e, sent, flush=True)

elif mode == "heartbeat_victim":
    # heartbeat_victim BROKER:PORT SECONDS: one minimal unauthenticated heartbeat naming
    # a proxy the broker does not know; counts what comes back to this address.
    host, port = sys.argv[2].rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    req = frame({"type": "heartbeat", "proxies": ["203.0.113.10:40000"]}, 77)
    s.sendto(req, (host, int(port)))
    got, n = 0, 0
    end = time.time() + float(sys.argv[3])
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try:
            d, a = s.recvfrom(65536)
            got += len(d)
            n += 1
        except socket.timeout:
            break
    print("SENT", len(req), "GOT", got, "DATAGRAMS", n, flush=True)
