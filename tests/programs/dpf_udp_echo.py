import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ADDR %s:%d" % s.getsockname(), flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
