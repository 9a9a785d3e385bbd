import socket, os
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
c.sendall(b"ping"); assert s.recv(4) == b"ping"
s.close(); c.close(); ls.close()
if os.fork() == 0: os._exit(0)
os.wait()
print("done")
