import errno, socket, struct, sys, time
tv = struct.pack("ll", 0, 300000)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 7300))
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
print("UDP", *u.getsockname(), flush=True)
t = socket.socket()
t.bind(("0.0.0.0", 7301))
t.listen(4)
t.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
for what, call in (("recvfrom", lambda: u.recvfrom(2048)), ("accept", t.accept)):
    t0 = time.monotonic()
    try:
        call()
        print(what, "RETURNED", flush=True)
    except OSError as e:
        print(what, errno.errorcode.get(e.errno, e.errno), round(time.monotonic() - t0, 2), flush=True)
u.settimeout(10)
data, peer = u.recvfrom(2048)
print("GOT", data.decode(), flush=True)
