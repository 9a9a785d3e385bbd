import os, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("PARENT %s:%d" % s.getsockname(), flush=True)
s.set_inheritable(True)
echo = sys.argv[2]
child = [sys.executable, "-u", echo, "fd=%d" % s.fileno()]
if sys.argv[3] == "exec":
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("0.0.0.0", int(sys.argv[1]) + 1))
    print("OTHER %s:%d" % other.getsockname(), flush=True)
    os.execv(sys.executable, child)
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, child)
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    select.select([], [], [], 0.2)
print("CHILD-EXITED", flush=True)
fd = s.detach()
sys.argv = [echo, "fd=%d" % fd]
exec(compile(open(echo).read(), echo, "exec"))
