import selectors, socket, sys
sel = selectors.SelectSelector() if sys.argv[2] == "select" else selectors.PollSelector()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1]))); ls.listen(128); ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ, None)
pending = {}
while True:
    for key, ev in sel.select():
        s = key.fileobj
        if s is ls:
            c, _ = ls.accept(); c.setblocking(False)
            pending[c] = b""
            sel.register(c, selectors.EVENT_READ, None)
            continue
        if ev & selectors.EVENT_READ:
            try: b = s.recv(65536)
            except BlockingIOError: continue
            if not b:
                s.setblocking(True); s.sendall(pending.pop(s)); sel.unregister(s); s.close()
                continue
            pending[s] += b
