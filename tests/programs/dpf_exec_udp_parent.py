import os, socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 0))
u.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-u", sys.argv[1], str(u.fileno())])
