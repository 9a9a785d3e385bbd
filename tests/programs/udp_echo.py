import hashlib, socket, sys, threading
if sys.argv[1].startswith("fd="):
    s = socket.socket(fileno=int(sys.argv[1][3:]))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
print("ADDR %s:%d" % s.getsockname(), flush=True)
while True:
    data, peer = s.recvfrom(65536)
    if data == b"QUIT":
        s.close()
        print("CLOSED", flush=True)
        sys.exit(0)
    seen = "%s:%d" % peer
    tag = "RAW"
    if data.startswith(b"GCBT "):
        head, _, body = data.partition(b"\n")
        f = head.split()
        tag = "OK" if len(f) == 3 and hashlib.sha256(body).hexdigest().encode() == f[2] else "BAD"
    print("RECV %s %d %s %s" % (seen, len(data), hashlib.sha256(data).hexdigest(), tag), flush=True)
    s.sendto(("%s %s\n" % (seen, tag)).encode() + data, peer)
    if data.startswith(b"LATE"):
        threading.Timer(3.0, s.sendto, (b"LATE-REPLY", peer)).start()
