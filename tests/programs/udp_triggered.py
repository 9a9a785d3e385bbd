import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
trigger = sys.argv[2]
print("ADDR %s:%d" % s.getsockname(), flush=True)
s.settimeout(0.1)
while True:
    try:
        data, peer = s.recvfrom(65536)
        s.sendto(("%s:%d RAW\n" % peer).encode() + data, peer)
    except socket.timeout:
        pass
    if os.path.exists(trigger):
        to, payload = open(trigger).read().split()
        os.remove(trigger)
        host, port = to.rsplit(":", 1)
        s.sendto(bytes.fromhex(payload), (host, int(port)))
        print("SENT %s" % to, flush=True)
