import asyncio, select, socket, sys

mode, port = sys.argv[1], int(sys.argv[2])

def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    s.setblocking(False)
    print("listening", *s.getsockname(), flush=True)
    return s

def loop(wait):
    srv = listener()
    conns = {}
    while True:
        rl = [srv] + [c for c, st in conns.items() if not st[1]]
        wl = [c for c, st in conns.items() if st[0]]
        readable, writable = wait(rl, wl)
        for s in readable:
            if s is srv:
                try:
                    c, peer = srv.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                conns[c] = [bytearray(), False]
                # accept()'s address, then getpeername()'s: both must be the real peer.
                print("accepted", *peer, "peername", *c.getpeername(), flush=True)
                continue
            st = conns.get(s)
            if st is None:
                continue
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                s.close(); del conns[s]; continue
            if d:
                st[0] += d
            else:
                st[1] = True
        for s in writable:
            st = conns.get(s)
            if st is None or not st[0]:
                continue
            try:
                n = s.send(st[0])
                del st[0][:n]
            except BlockingIOError:
                pass
            except OSError:
                s.close(); del conns[s]
        for s, st in list(conns.items()):
            if st[1] and not st[0]:
                s.close(); del conns[s]

def wait_select(rl, wl):
    r, w, _ = select.select(rl, wl, [])
    return r, w

def wait_poll(rl, wl):
    p = select.poll()
    by_fd = {}
    for s in rl:
        by_fd[s.fileno()] = s
        p.register(s, select.POLLIN)
    for s in wl:
        by_fd[s.fileno()] = s
        p.register(s, (select.POLLIN if s in rl else 0) | select.POLLOUT)
    r, w = [], []
    for fd, ev in p.poll():
        s = by_fd[fd]
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            if s in rl:
                r.append(s)
        if ev & select.POLLOUT:
            w.append(s)
    return r, w

async def handle(reader, writer):
    sock = writer.get_extra_info("socket")
    print("accepted", *writer.get_extra_info("peername"), "peername", *sock.getpeername(),
          flush=True)
    while True:
        d = await reader.read(65536)
        if not d:
            break
        writer.write(d)
        await writer.drain()
    writer.close()
    await writer.wait_closed()

async def amain():
    print("selector", type(asyncio.get_running_loop()._selector).__name__, flush=True)
    srv = await asyncio.start_server(handle, sock=listener())
    async with srv:
        await srv.serve_forever()

if mode == "asyncio":
    asyncio.run(amain())
elif mode == "poll":
    loop(wait_poll)
else:
    loop(wait_select)
