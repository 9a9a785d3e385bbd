import hashlib, socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ADDR %s:%d" % s.getsockname(), flush=True)
def handle(c, a):
    c.settimeout(20)
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
    print("PEER %s %d" % (a[0], n), flush=True)
while True:
    c, a = s.accept()
    threading.Thread(target=handle, args=(c, a), daemon=True).start()
