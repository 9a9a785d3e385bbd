import hashlib, os, random, select, socket, sys, time
mode, rest = sys.argv[1], sys.argv[2:]
def addr(t):
    h, p = t.rsplit(":", 1)
    return (h, int(p))
def sha(b):
    return hashlib.sha256(b).hexdigest()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if "--bind" in rest:
    i = rest.index("--bind")
    s.bind(("0.0.0.0", int(rest[i + 1])))
    del rest[i:i + 2]
pause = None
if "--pause" in rest:
    i = rest.index("--pause")
    pause = (float(rest[i + 1]), int(rest[i + 2]))
    del rest[i:i + 3]
local_shown = False
def show_local():
    global local_shown
    if not local_shown:
        print("LOCAL %s:%d" % s.getsockname(), flush=True)
        local_shown = True
if mode == "echo":
    target, kind, sizes = addr(rest[0]), rest[1], [int(x) for x in rest[2:]]
    s.settimeout(5)
    for k, n in enumerate(sizes):
        if pause and k == pause[1]:
            time.sleep(pause[0])
        data = os.urandom(n)
        while data[:4] in (b"GCBT", b"GCBU", b"LATE"):
            data = os.urandom(n)
        t0 = time.time()
        s.sendto(data, target)
        show_local()
        try:
            back, frm = s.recvfrom(70000)
        except socket.timeout:
            print("TIMEOUT %d" % n, flush=True)
            continue
        rtt = (time.time() - t0) * 1000
        seen, tag, body = "-", "-", back
        if kind == "ADDR":
            head, _, body = back.partition(b"\n")
            f = head.decode("ascii", "replace").split()
            seen, tag = (f + ["?", "?"])[:2]
        print("ECHO %d %s %s %s:%d %s %s %.1f" % (n, sha(data), sha(body), frm[0], frm[1], seen, tag, rtt), flush=True)
elif mode == "stream":
    target, count = addr(rest[0]), int(rest[1])
    s.setblocking(False)
    def drain():
        while True:
            try:
                back, frm = s.recvfrom(70000)
            except BlockingIOError:
                return
            head, nl, body = back.partition(b"\n")
            f = head.decode("ascii", "replace").split()
            b = body.partition(b"\n")[0].split()
            if not nl or len(f) != 2 or len(b) != 3 or b[0] != b"GCBT":
                print("GARBLED %s" % back[:64].hex(), flush=True)
                continue
            print("REPLY %s:%d %s %s %s %s" % (frm[0], frm[1], f[0], f[1], b[1].decode("ascii", "replace"), sha(body)), flush=True)
    for seq in range(count):
        body = os.urandom(random.randint(16, 1200))
        data = b"GCBT %d %s\n" % (seq, sha(body).encode()) + body
        s.sendto(data, target)
        show_local()
        print("SENT %d %s" % (seq, sha(data)), flush=True)
        end = time.time() + 0.004
        while time.time() < end:
            select.select([s], [], [], max(0, end - time.time()))
            drain()
    end = time.time() + 4
    while time.time() < end:
        select.select([s], [], [], max(0, end - time.time()))
        drain()
elif mode == "late":
    target = addr(rest[0])
    s.settimeout(5)
    data = b"LATE" + os.urandom(20)
    s.sendto(data, target)
    show_local()
    back, frm = s.recvfrom(70000)
    print("FIRST %s:%d %s" % (frm[0], frm[1], sha(back.partition(b"\n")[2]) == sha(data)), flush=True)
    try:
        back, frm = s.recvfrom(70000)
        print("EXTRA %s:%d %r" % (frm[0], frm[1], back[:40]), flush=True)
    except socket.timeout:
        print("NOTHING-MORE", flush=True)
elif mode == "send":
    target = addr(rest[0])
    for h in rest[1:]:
        s.sendto(bytes(int(h[6:])) if h.startswith("zeros:") else bytes.fromhex(h), target)
        show_local()
        time.sleep(0.01)
elif mode == "listen":
    s.bind(("0.0.0.0", int(rest[0])))
    print("LISTENING", flush=True)
    s.settimeout(0.2)
    end = time.time() + float(rest[1])
    while time.time() < end:
        try:
            data, frm = s.recvfrom(70000)
            print("GOT %s:%d %d %s" % (frm[0], frm[1], len(data), sha(data)), flush=True)
        except socket.timeout:
            pass
