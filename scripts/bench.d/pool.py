"""The broker pool part of scripts/bench (issue 16): `bench --only pool`.

Three gcb-brokerd on p1's extra addresses 203.0.113.14/.15/.16 form a pool. ONE python
echo server in a1 under gcb-run (the real shim, default heartbeat) listens on N sockets
(3,000; --quick 600) with GCB_BROKER=the three; it prints every listener's getsockname()
whenever it changes. Measured:
  * registrations per broker (from the proxies' IPs and each broker's status --json):
    target within +-10 % of even;
  * failover: kill -9 the broker with the most listeners (about N/3); the time until
    every one of its listeners reports a new proxy on another broker, and until every
    new proxy has echoed bytes from p2 (verified), with the heartbeat interval and the
    bound 2 x heartbeat + RTT;
  * only the killed broker's share moves (listeners elsewhere keep their address), and
    the remaining brokers' counts after the move;
  * connections open before the kill through the other brokers' proxies (relayed, p2 ->
    proxy) stay up and echo intact bytes afterwards.
"""
import json
import os
import re
import signal
import subprocess
import time

POOL_IPS = ["203.0.113.14", "203.0.113.15", "203.0.113.16"]
# The shim's default (what a deployment gets) unless GCB_BENCH_POOL_HEARTBEAT_MS says.
HEARTBEAT_MS = int(os.environ.get("GCB_BENCH_POOL_HEARTBEAT_MS", "10000"))

SERVER = r'''
import resource, selectors, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
first, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
ls = []
for p in range(first, first + n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p))
    s.listen(64)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, ("l", p))
    ls.append((p, s))
last = {}
def names():
    out = []
    for p, s in ls:
        a = "%s:%d" % s.getsockname()
        if last.get(p) != a:
            last[p] = a
            out.append("name %d %s %.3f" % (p, a, time.time()))
    if out:
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()
names()
print("ready", flush=True)
t = time.time()
while True:
    for key, _ in sel.select(0.1):
        kind, p = key.data
        if kind == "l":
            try:
                c, _ = key.fileobj.accept()
            except (BlockingIOError, InterruptedError):
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, ("c", p))
        else:
            c = key.fileobj
            try:
                b = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                b = b""
            if not b:
                sel.unregister(c)
                c.close()
                continue
            c.setblocking(True)
            c.sendall(b)
            c.setblocking(False)
    if time.time() - t > 0.1:
        names()
        t = time.time()
'''

# p2: HOLD: opens connections to the addresses in argv[2:], echoes 1 KiB on each, prints
# "open N", waits for the file argv[1], echoes another 1 KiB on each, prints JSON.
# CHECK: echoes 64 bytes through each address of argv[2:] (32 at a time, retrying each
# until 60 s), prints JSON with when the last first succeeded.
CLIENT = r'''
import hashlib, json, os, socket, sys, time
def echo(s, data):
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        b = s.recv(65536)
        if not b:
            raise OSError("eof")
        got += b
    return got == data
mode = sys.argv[1]
if mode == "hold":
    go, addrs = sys.argv[2], sys.argv[3:]
    conns, bad = [], 0
    for a in addrs:
        h, p = a.rsplit(":", 1)
        s = socket.create_connection((h, int(p)), timeout=20)
        s.settimeout(20)
        if not echo(s, os.urandom(1024)):
            bad += 1
        conns.append(s)
    print("open %d" % len(conns), flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    ok = 0
    for s in conns:
        try:
            ok += echo(s, os.urandom(1024))
        except OSError:
            pass
    print(json.dumps({"held": len(conns), "intact_after": ok, "bad_before": bad}), flush=True)
else:
    import threading
    addrs = sys.argv[2:]
    t0 = time.time()
    done = {}
    def worker(mine):
        for a in mine:
            h, p = a.rsplit(":", 1)
            while time.time() - t0 < 60:
                try:
                    s = socket.create_connection((h, int(p)), timeout=3)
                    s.settimeout(5)
                    ok = echo(s, os.urandom(64))
                    s.close()
                    if ok:
                        done[a] = time.time()
                        break
                except OSError:
                    time.sleep(0.1)
    ts = [threading.Thread(target=worker, args=(addrs[i::32],)) for i in range(32)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"verified": len(done), "asked": len(addrs),
                      "last_at": max(done.values()) if done else None,
                      "check_s": round(time.time() - t0, 2)}), flush=True)
'''


def latest_names(path, ips):
    """{port: (ip, port_of_proxy, unix time first reported)} of the last name lines."""
    cur = {}
    try:
        text = open(path).read()
    except OSError:
        return cur
    for m in re.finditer(r"^name (\d+) ([\d.]+):(\d+) ([\d.]+)$", text, re.M):
        port, ip, pport, t = int(m.group(1)), m.group(2), int(m.group(3)), float(m.group(4))
        cur[port] = (ip, pport, t)
    return cur


def run_pool(b, L, log, BROKERD, GCBRUN, python="python3"):
    """b: the Bench; L: its lab. Fills b.res["pool"]."""
    res = b.res.setdefault("pool", {})
    n = 600 if b.quick else 3000
    first = 10000  # below the ephemeral range (the shim's own sockets use it)
    res["listeners"], res["heartbeat_ms"] = n, HEARTBEAT_MS
    for ip in POOL_IPS:
        L.sh("p1", ["ip", "addr", "add", ip + "/24", "dev", "eth0"], check=False)
    brokers, socks = [], []
    for i, ip in enumerate(POOL_IPS):
        sock = os.path.join(L.work, "pool%d.sock" % i)
        socks.append(sock)
        brokers.append(L.spawn("p1", [BROKERD,
                                      "--admin-socket", sock, "--listen", ip,
                                      "--max-registrations", "20000",
                                      "--max-registrations-per-ip", "20000",
                                      "--max-preambles", "20000", "--max-preambles-per-ip", "20000",
                                      "--max-relays", "4096", "--max-relays-per-ip", "4096",
                                      "--control-rate-per-ip", "1000000",
                                      "--control-burst-per-ip", "1000000",
                                      "--stats-interval-secs", "0"], "pool-broker%d" % i))
    time.sleep(0.5)
    pool = ",".join(POOL_IPS)
    out_path = os.path.join(L.work, "pool-server.out")
    os.environ["GCB_HEARTBEAT_MS"] = str(HEARTBEAT_MS)
    srv = L.spawn("a1", [GCBRUN,
                         "--broker", pool, "--", python, "-c", SERVER, str(first), str(n)],
                  "pool-server", stdout=open(out_path, "w"))
    del os.environ["GCB_HEARTBEAT_MS"]
    t_start = time.time()
    end = time.time() + (120 if b.quick else 300)
    while time.time() < end:
        names = latest_names(out_path, POOL_IPS)
        if len(names) == n and all(v[0] in POOL_IPS for v in names.values()):
            break
        if srv.poll() is not None:
            raise RuntimeError("pool server exited: %s" % L.err("pool-server")[-800:])
        time.sleep(0.2)
    names = latest_names(out_path, POOL_IPS)
    on = {ip: sorted(p for p, v in names.items() if v[0] == ip) for ip in POOL_IPS}
    res["register_s"] = round(time.time() - t_start, 2)
    res["per_broker"] = {ip: len(v) for ip, v in on.items()}
    even = n / 3.0
    res["max_off_even"] = max(abs(len(v) - even) / even for v in on.values())

    def status(i):
        r = subprocess.run([BROKERD, "status", "--json", "--admin-socket", socks[i]],
                           capture_output=True, text=True)
        try:
            return json.loads(r.stdout)["counters"]
        except Exception:
            return {}
    res["per_broker_status"] = {POOL_IPS[i]: status(i).get("registrations") for i in range(3)}
    log("  pool: %d listeners registered in %.1fs: %s (max %.1f%% off even); broker status %s" % (
        n, res["register_s"], res["per_broker"], 100 * res["max_off_even"], res["per_broker_status"]))

    # Connections through the brokers that stay: 30 per broker, open across the kill.
    victim = max(POOL_IPS, key=lambda ip: len(on[ip]))
    vi = POOL_IPS.index(victim)
    keep = [ip for ip in POOL_IPS if ip != victim]
    held_addrs = ["%s:%d" % (names[p][0], names[p][1]) for ip in keep for p in on[ip][:30]]
    go = os.path.join(L.work, "pool-go")
    hold = L.spawn("p2", [python, "-c", CLIENT, "hold", go] + held_addrs, "pool-hold",
                   stdout=subprocess.PIPE)
    from bench import read_line  # noqa: E402 (same directory)
    read_line(hold, 120, "held connections open")

    before = dict(names)
    moving = set(on[victim])
    time.sleep(1)
    t_kill = time.time()
    brokers[vi].send_signal(signal.SIGKILL)
    brokers[vi].wait(timeout=10)
    end = t_kill + 120
    moved_at = None
    while time.time() < end:
        names = latest_names(out_path, POOL_IPS)
        if all(names[p][0] != victim for p in moving):
            moved_at = max(names[p][2] for p in moving)
            break
        time.sleep(0.2)
    names = latest_names(out_path, POOL_IPS)
    res["failover_all_new_names_s"] = moved_at and round(moved_at - t_kill, 2)
    new_addrs = ["%s:%d" % (names[p][0], names[p][1]) for p in sorted(moving)
                 if names[p][0] != victim]
    chk = L.sh("p2", [python, "-c", CLIENT, "check"] + new_addrs, check=False, timeout=120)
    try:
        cj = json.loads(chk.stdout.strip().splitlines()[-1])
    except Exception:
        cj = {"error": chk.stderr[-400:]}
    res["failover_check"] = cj
    if cj.get("last_at"):
        res["failover_all_reachable_s"] = round(cj["last_at"] - t_kill, 2)
    res["failover_bound_s"] = 2 * HEARTBEAT_MS / 1000.0
    res["killed_broker"], res["killed_share"] = victim, len(moving)
    res["moved"] = sum(1 for p in moving if names[p][0] != victim)
    res["moved_not_on_killed"] = sum(1 for p in names if p not in moving
                                     and names[p][:2] != before[p][:2])
    res["per_broker_after"] = {ip: sum(1 for v in names.values() if v[0] == ip) for ip in POOL_IPS}
    res["moved_to"] = {ip: sum(1 for p in moving if names[p][0] == ip) for ip in keep}
    res["per_broker_status_after"] = {POOL_IPS[i]: status(i).get("registrations")
                                      for i in range(3) if i != vi}
    open(go, "w").write("go")
    try:
        res["held"] = json.loads(read_line(hold, 120, "held result"))
    except Exception as e:  # noqa
        res["held"] = {"error": str(e)}
    log("  pool failover: killed %s (%d listeners): all new names after %ss, all %s/%s verified "
        "reachable after %ss (bound 2 x %d ms + RTT); moved %d, others moved %d; after: %s; "
        "held across the kill: %s" % (
            victim, len(moving), res["failover_all_new_names_s"], cj.get("verified"),
            cj.get("asked"), res.get("failover_all_reachable_s"), HEARTBEAT_MS, res["moved"],
            res["moved_not_on_killed"], res["per_broker_after"], res["held"]))
    for p in [hold, srv] + brokers:
        L.stop(p)
    for ip in POOL_IPS:
        L.sh("p1", ["ip", "addr", "del", ip + "/24", "dev", "eth0"], check=False)
