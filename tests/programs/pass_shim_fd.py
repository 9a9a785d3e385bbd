import os, socket, errno, subprocess
logpath = os.path.realpath(os.environ["GCB_LOG_FILE"])
def shim_fds():
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + f) == logpath: out.append(int(f))
        except OSError: pass
    return out
fds = shim_fds(); assert len(fds) == 1, fds
n = fds[0]; assert n >= 10, n
try:
    os.close(n); print("close", "ok")
except OSError as e:
    print("close", errno.errorcode[e.errno])
os.closerange(3, 1 << 16)
assert shim_fds() == [n], ("after closerange", shim_fds())
r = os.dup2(1, n)
print("dup2", r == n)
m = shim_fds(); assert len(m) == 1 and m[0] != n, m
os.close(n)  # the program's own dup: closes fine
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1); s.close()
subprocess.run(["true"], check=True)  # close_range in the (v)fork child; exec
print("end")
