import os, socket, subprocess, sys, hashlib
path = sys.argv[1]
r = subprocess.run(["sha256sum", path], capture_output=True, check=True)
print(r.stdout.decode().split()[0])
r = subprocess.run("head -c 1000 /dev/zero | wc -c", shell=True, capture_output=True, check=True)
assert r.stdout.strip() == b"1000", r
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
port = ls.getsockname()[1]
pid = os.fork()
if pid == 0:
    # child: connect to the parent, send the file, exec-free exit
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(open(path, "rb").read()); s.close()
    os._exit(0)
c, _ = ls.accept()
h = hashlib.sha256()
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b)
_, st = os.waitpid(pid, 0)
assert st == 0
print(h.hexdigest())
