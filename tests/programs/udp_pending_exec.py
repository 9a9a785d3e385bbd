import os, socket, sys, time
if len(sys.argv) > 2 and sys.argv[1] == "after":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0, int(sys.argv[2]))
    print("AFTER %s:%d" % s.getsockname(), flush=True)
    data, peer = s.recvfrom(70000)
    s.sendto(("%s:%d RAW\n" % peer).encode() + data, peer)
    print("SERVED %d" % len(data), flush=True)
    time.sleep(600)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
os.set_inheritable(s.fileno(), True)
os.execv(sys.executable, [sys.executable, "-u", sys.argv[0], "after", str(s.fileno())])
