# A v6-only TCP listener (IPV6_V6ONLY=1, bound to `::` PORT) next to an ordinary IPv4
# listener on PORT+1, in one process. Prints `ADDR6 <repr(getsockname())>` and
# `ADDR4 ip:port`, then checks the v6-only listener locally: connects to [::1]:PORT, sends
# 256 KiB of random bytes, reads the echo and prints `LOCAL <sha sent> <sha echoed> <peer>
# <repr(accepted socket's getsockname())>`; then echoes forever on both listeners.
import hashlib, os, socket, sys, threading
port = int(sys.argv[1])
s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s6.bind(("::", port))
s6.listen(16)
print("ADDR6 %r" % (s6.getsockname(),), flush=True)
s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s4.bind(("0.0.0.0", port + 1))
s4.listen(16)
print("ADDR4 %s:%d" % s4.getsockname(), flush=True)
accepted = {}
def echo(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b:
                return
            c.sendall(b)
def serve(s):
    while True:
        c, a = s.accept()
        accepted[a[1]] = (a[0], c.getsockname())
        threading.Thread(target=echo, args=(c,), daemon=True).start()
for s in (s6, s4):
    threading.Thread(target=serve, args=(s,), daemon=True).start()
data = os.urandom(256 * 1024)
c = socket.create_connection(("::1", port), timeout=10)
mine = c.getsockname()[1]
c.sendall(data)
c.shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    b = c.recv(65536)
    if not b:
        break
    got += b
c.close()
peer, local = accepted.get(mine, ("?", None))
print("LOCAL %s %s %s %r" % (hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), peer, local), flush=True)
threading.Event().wait()
