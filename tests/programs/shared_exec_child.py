import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
print("CHILD %s:%d" % s.getsockname(), flush=True)
serve(s, "child")
