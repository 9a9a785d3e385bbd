# A TCP server that reads, for each connection it accepts, what servers read from an
# accepted connection: SO_DOMAIN, the options it set on its listener (SO_KEEPALIVE,
# TCP_NODELAY), the arrival interface IP_PKTOPTIONS reports (IP_PKTINFO set on the
# listener), and getsockname/getpeername. argv: FAMILY (4: AF_INET on 0.0.0.0,
# 6: dual-stack AF_INET6 on ::) PORT. Prints `listening <getsockname>` and one JSON line
# per connection, tagged with the first line the client sends.
import json, socket, struct, sys

IP_PKTINFO, IP_PKTOPTIONS = 8, 9

def pktinfo_ifindex(c):
    raw = c.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, 256)
    off = 0
    while off + 16 <= len(raw):
        ln, level, typ = struct.unpack_from("QII", raw, off)
        if level == socket.IPPROTO_IP and typ == IP_PKTINFO:
            return struct.unpack_from("i", raw, off + 16)[0]
        off += (ln + 7) & ~7
    return None

family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(sys.argv[2])))
s.listen(16)
print("listening", s.getsockname(), flush=True)
while True:
    c, _ = s.accept()
    tag = c.makefile("rb").readline().decode().strip()
    idx = pktinfo_ifindex(c)
    print(json.dumps({
        "tag": tag,
        "domain": c.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
        "keepalive": c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "nodelay": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "ifindex": idx,
        "ifname": socket.if_indextoname(idx) if idx else None,
        "sock": list(c.getsockname()[:2]),
        "peer": list(c.getpeername()[:2]),
    }), flush=True)
    c.sendall(b"ok\n")
    c.close()
