import hashlib, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
data = os.urandom(300000)
c = socket.create_connection((host, port), timeout=20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = c.recv(65536)
    if not b:
        break
    got += b
print("ok" if got == data else "MISMATCH %d of %d" % (len(got), len(data)))
