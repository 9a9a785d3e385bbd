import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7100))
s.listen(16)
print("PARENT %s:%d" % s.getsockname(), flush=True)
s.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-u", sys.argv[1], str(s.fileno())])
