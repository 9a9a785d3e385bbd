import select, socket, sys, time
def addr(t):
    h, p = t.rsplit(":", 1)
    return (h, int(p))
first, second = addr(sys.argv[1]), addr(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(3)
for n, (to, wait) in enumerate([(first, 1.0), (second, 0), (first, 0)]):
    msg = b"PING-%d-" % n + bytes(range(256)) * 4
    s.sendto(msg, to)
    try:
        data, peer = s.recvfrom(65536)
        good = data.endswith(msg) and peer == to
        print("%s %d" % ("OK" if good else "BAD", n), flush=True)
    except socket.timeout:
        print("TIMEOUT %d" % n, flush=True)
    end = time.time() + wait
    while time.time() < end:
        if select.select([s], [], [], max(0, end - time.time()))[0]:
            print("UNEXPECTED %r" % (s.recvfrom(65536),), flush=True)
