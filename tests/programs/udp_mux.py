import select, socket, sys
port, how = int(sys.argv[1]), sys.argv[2]
socks = []
for p in (port, port + 1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", p))
    print("ADDR %s:%d" % s.getsockname(), flush=True)
    socks.append(s)
byfd = {s.fileno(): s for s in socks}
if how == "poll":
    po = select.poll()
    for s in socks:
        po.register(s, select.POLLIN)
    wait = lambda: [byfd[fd] for fd, ev in po.poll()]
elif how == "epoll":
    ep = select.epoll()
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    wait = lambda: [byfd[fd] for fd, ev in ep.poll()]
else:
    wait = lambda: select.select(socks, [], [])[0]
while True:
    for s in wait():
        data, peer = s.recvfrom(65536)
        seen = "%s:%d" % peer
        print("RECV %s %d" % (seen, len(data)), flush=True)
        s.sendto(("%s RAW\n" % seen).encode() + data, peer)
