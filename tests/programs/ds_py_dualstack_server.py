# A Python dual-stack TCP server as the standard library documents it:
# socket.create_server(("", PORT), family=AF_INET6, dualstack_ipv6=True). Prints
# `ADDR <repr(getsockname())>` once listening; each connection is read to EOF and answered
# with `<sha256> <bytes> <peer ip>`, then `CONN <peer ip> <peer port> <repr(local)>` is
# printed (local: getsockname() of the accepted socket).
import hashlib, socket, sys, threading
s = socket.create_server(("", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
print("ADDR %r" % (s.getsockname(),), flush=True)
def handle(c, a):
    c.settimeout(20)
    local = c.getsockname()
    h = hashlib.sha256()
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.sendall(("%s %d %s\n" % (h.hexdigest(), n, a[0])).encode())
    c.close()
    print("CONN %s %d %r" % (a[0], a[1], local), flush=True)
while True:
    c, a = s.accept()
    threading.Thread(target=handle, args=(c, a), daemon=True).start()
