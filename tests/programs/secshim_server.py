import selectors, socket, sys, threading, time
mode, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
def report():
    last = None
    while True:
        n = "%s:%d" % s.getsockname()
        if n != last:
            print("NAME", n, flush=True)
            last = n
        time.sleep(0.1)
threading.Thread(target=report, daemon=True).start()
def serve(c):
    try:
        c.setblocking(True)
        c.sendall(data)
    except OSError:
        pass  # a peer that hangs up early (the recorders do) must not end the server
    c.close()
if mode == "accept":
    while True:
        c, a = s.accept()
        serve(c)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
while True:
    for _ in sel.select(0.5):
        c, a = s.accept()
        serve(c)
