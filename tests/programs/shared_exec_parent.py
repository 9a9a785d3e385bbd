import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9001))
s.listen(64)
print("PARENT %s:%d" % s.getsockname(), flush=True)
s.set_inheritable(True)
os.execv(sys.executable, [sys.executable, sys.argv[1], str(s.fileno())])
