import os, select, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7100))
s.listen(16)
# one wait in the shim: its event handler parks the standby connection
select.select([s], [], [], 0.5)
for _ in range(2):
    if os.fork() == 0:
        while True:
            c, _ = s.accept()
            data = b""
            while True:
                b = c.recv(65536)
                if not b:
                    break
                data += b
            c.sendall(data)
            c.close()
print("ready", flush=True)
time.sleep(300)
