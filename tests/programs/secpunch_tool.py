# A pool member's connector that takes part in a TCP punch (gcb_proto::tcp_punch) by hand,
# to see what the listener's shim accepts: argv[1] the proxy, argv[2] the mode:
#   honest       the real protocol: checks the listener's proof, writes its own, DIRECT
#   forged       writes 16 random bytes instead of its proof
#   replay:HEX   writes HEX (the proof of an earlier punch) instead of this punch's
# Then writes HELLO-<MODE> on the punched connection and reports whether the listener's
# connection ended (CLOSED, RESET or OPEN after 3 s). Prints LEG_LOCAL, OFFER, CONNECTED,
# PROOF lines for the test (CONNECTED: the punched connection is up).
import hashlib, hmac, json, os, random, socket, struct, sys, time

BROKER = ("203.0.113.10", 9650)
key = open(os.environ["GCB_KEY_FILE"], "rb").read().strip()
proxy, mode = sys.argv[1], sys.argv[2]


def mac16(*parts):
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()[:16]


def request(body):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    j = json.dumps({"v": 1, "id": random.randint(1, 1 << 30), "body": body}).encode()
    head = b"GCB1\x01" + struct.pack(">QQQ", int(time.time() * 1000), int.from_bytes(os.urandom(8), "big"), 1)
    s.sendto(head + hmac.new(key, head + j, hashlib.sha256).digest() + j, BROKER)
    d, _ = s.recvfrom(65536)
    return json.loads(d[61:].decode())["body"]


def read_exact(s, n):
    got = b""
    while len(got) < n:
        d = s.recv(n - len(got))
        if not d:
            break
        got += d
    return got


reply = request({"type": "connect_request", "proxy": proxy, "transport": "tcp",
                 "connector_local": "10.2.0.11:0", "punch": True})
route = reply.get("route", {})
if route.get("kind") != "punch":
    print("NO_PUNCH", json.dumps(reply), flush=True)
    sys.exit(2)
cid = bytes.fromhex(route["connect_id"])
leg = socket.socket()
leg.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
leg.bind(("0.0.0.0", 0))
leg.settimeout(5)
leg.connect(BROKER)
leg.sendall(b"GCB-CONNECT " + mac16(b"gcb-connect", cid).hex().encode() + b"\n")
offer = read_exact(leg, 44)
if offer[:6] != b"GCB-PO":
    print("NO_OFFER", offer, flush=True)
    sys.exit(2)
peer = (socket.inet_ntoa(offer[6:10]), struct.unpack("!H", offer[10:12])[0])
nonce = offer[12:28]
print("LEG_LOCAL %s:%d" % leg.getsockname(), "OFFER %s:%d" % peer, flush=True)
d = socket.socket()
d.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
d.bind(("0.0.0.0", leg.getsockname()[1]))
d.settimeout(3)
d.connect(peer)
print("CONNECTED", flush=True)
mine = mac16(b"gcb-tcp-punch-proof", nonce)
if mode == "honest":
    sent = mine
elif mode == "forged":
    sent = os.urandom(16)
else:
    sent = bytes.fromhex(mode.split(":", 1)[1])
print("PROOF", mine.hex(), flush=True)
d.sendall(sent)
if mode == "honest":
    leg.sendall(b"D")
d.sendall(b"HELLO-" + mode.split(":")[0].upper().encode() + b"\n")
# The listener's program (the recorder) reads and closes; a refused connection is
# closed by the shim at once, without the program seeing it.
# Which one it was, only the recorder's output says.
d.settimeout(3)
try:
    print("CLOSED" if not d.recv(100) else "ANSWERED", flush=True)
except (ConnectionResetError, BrokenPipeError):
    print("RESET", flush=True)
except socket.timeout:
    print("OPEN", flush=True)
leg.close()
