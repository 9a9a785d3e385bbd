"""Small process I/O helpers shared by the bench parts."""
import select
import time


def read_line(p, timeout=15, what="line"):
    end = time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([p.stdout], [], [], max(0.05, end - time.time()))
        if r:
            line = p.stdout.readline()
            if line:
                return line.strip()
            break
        if p.poll() is not None:
            break
    raise RuntimeError("no %s from %s (exit %s)" % (what, getattr(p, "logname", "?"), p.poll()))
