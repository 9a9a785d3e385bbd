import os, socket, sys, time
h, p = sys.argv[1].rsplit(":", 1)
public, trigger = (h, int(p)), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
s.settimeout(5)
for n in (1, 1400, 8000):
    data = os.urandom(n)
    s.sendto(data, public)
    back, frm = s.recvfrom(70000)
    print("ECHO %s %d" % ("ok" if back.endswith(data) and frm == public else "BAD", n), flush=True)
print("TALKED", flush=True)
while not os.path.exists(trigger):
    time.sleep(0.02)
print("LOCAL %s:%d" % s.getsockname(), flush=True)
s.settimeout(20)
data, peer = s.recvfrom(70000)
s.sendto(("%s:%d RAW\n" % peer).encode() + data, peer)
print("SERVED %d" % len(data), flush=True)
time.sleep(600)
