import selectors, socket, sys
port, data = int(sys.argv[1]), open(sys.argv[2], "rb").read()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
print("LISTENING", "%s:%d" % s.getsockname(), flush=True)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
while True:
    for _ in sel.select(0.5):
        c, a = s.accept()
        try:
            c.setblocking(True)
            c.sendall(data)
        except OSError:
            pass  # a peer that hangs up early must not end the server
        c.close()
