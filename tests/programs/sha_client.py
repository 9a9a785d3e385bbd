import hashlib, os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n)
c = socket.create_connection((host, port), timeout=5)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
r = b""
while True:
    b = c.recv(4096)
    if not b:
        break
    r += b
print("SENT %s %d" % (hashlib.sha256(data).hexdigest(), n))
print("GOT %s" % r.decode().strip(), flush=True)
