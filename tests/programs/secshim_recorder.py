import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("READY", flush=True)
while True:
    c, a = s.accept()
    c.settimeout(1)
    try:
        d = c.recv(100)
    except Exception:
        d = b""
    print("CONN %s:%d %r" % (a[0], a[1], d), flush=True)
    c.close()
