import os, select, socket, time
s = socket.socket()
s.bind(("0.0.0.0", 9004))
s.listen(8)
print("ADDR %s:%d" % s.getsockname(), flush=True)
r, w = os.pipe()
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLIN)
ep.register(r, select.EPOLLIN)
ep.poll(0.3)
ep.unregister(s.fileno())
s.close()  # unregisters at the broker; its answer arrives on the shim's control socket
stray = []
end = time.time() + 3
while time.time() < end:
    for fd, ev in ep.poll(0.5):
        if fd != r:
            stray.append(fd)
print("STRAY %d %s" % (len(stray), stray[:5]), flush=True)
time.sleep(30)
