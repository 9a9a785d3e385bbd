import hashlib, socket, sys, threading, time
def serve(s):
    while True:
        try:
            c, a = s.accept()
        except OSError:
            return
        h = hashlib.sha256()
        n = 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            h.update(b)
            n += len(b)
        c.sendall(("%s %d %s\n" % (h.hexdigest(), n, a[0])).encode())
        c.close()
socks = []
for spec in sys.argv[1:]:
    parts = spec.split(":")
    kind, port = parts[0], int(parts[-1])
    ip = parts[1] if len(parts) == 3 else "0.0.0.0"
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        s.bind((ip, port))
    except OSError as e:
        print("%s %d ERR %d" % (kind, port, e.errno), flush=True)
        s.close()
        continue
    try:
        # (For a port-0 socket DPF forwards here, at listen() or getsockname().)
        if kind == "tcp":
            s.listen(8)
        name = s.getsockname()
    except OSError as e:
        print("%s %d ERR %d" % (kind, port, e.errno), flush=True)
        s.close()
        continue
    if kind == "tcp":
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("%s %d OK %s:%d" % ((kind, port) + name), flush=True)
    socks.append(s)
print("READY", flush=True)
if not sys.stdin.readline():
    time.sleep(600)
for s in socks:
    s.close()
print("CLOSED", flush=True)
time.sleep(60)
