import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen(64)
print("ADDR %s:%d" % s.getsockname(), flush=True)
for i in range(3):
    if os.fork() == 0:
        serve(s, "w%d" % i)
s.close()  # the parent keeps no copy: only the workers hold the socket
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
