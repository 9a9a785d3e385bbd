"""Bench part `scale100k` (issue 16, item 4): one broker with 100,000 TCP registrations.

Measures, on a fresh broker in the lab's p1 (the load generator `gcb-bench-register fleet`
in a1: shim-like clients, one control socket each, see its module docs):
  * the registration rate (registrations/s, first registration of every listener);
  * per registration: the broker's VmRSS delta (user space), its fds, and kernel memory:
    /proc/net/sockstat in p1's namespace (TCP inuse/alloc/mem pages) and slab deltas
    (/proc/slabinfo caches a TCP listener uses and meminfo's Slab: machine-wide, so other
    load on the machine shows up as noise);
  * the restart storm: SIGKILL the broker, start it again at once with the same flags (it
    keeps no state file: a listener gets its proxy address back by proving it owned it,
    see gcb_proto::token), and the time from that start until every listener is
    registered again, as the shims would re-register them (heartbeat every 10 s each at
    its own phase; `heartbeat_ack{unknown}` / `reregister_request` -> re-register); again
    with every client's heartbeat in step (the whole storm in one burst); and with a
    standby connection parked per listener, as the shim does by default (per-registration
    memory with it, and the time until every standby is parked again).

Limits it works with, written into the results:
  * fds: the broker needs one fd per TCP registration; it raises its soft limit to the
    hard one (the systemd unit gives LimitNOFILE=262144). Here the broker is started under
    `prlimit --nofile=262144`; where that is refused (no CAP_SYS_RESOURCE and a lower hard
    limit), the count is capped to what the hard limit allows, and a second storm runs
    with the heartbeat interval scaled by count/100,000 so that re-registrations arrive
    at the rate 100,000 listeners with 10 s heartbeats would make ("rate-equivalent").
  * ports: one IP has 64,511 proxy ports with --proxy-ports 1024-65535 (one is the
    broker's); the broker gets --proxy-ip for every further 64,511 (addresses added to
    p1's interface). When the count is capped, the range is cut to a little over half of
    it, so that the second IP is filled too and the overflow runs at scale.
  * per-IP limits: every client comes through gwa's one public IP, so the operator's
    flags raise --max-registrations(-per-ip) and turn the per-IP control rate off.
"""
import json
import os
import resource
import signal
import subprocess
import time

from procio import read_line

TARGET = 100_000
PORT = 9800            # the bench's main broker has 9650
EXTRA_IPS = ["203.0.113.%d" % i for i in range(20, 30)]
SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "tcp_bind_bucket",
         "tcp_bind2_bucket", "inet_bind2_bucket", "kmalloc-64", "kmalloc-128", "kmalloc-256")
PER_CLIENT = 10


def slab_bytes():
    out = {}
    for line in open("/proc/slabinfo"):
        f = line.split()
        if f and f[0] in SLABS:
            out[f[0]] = int(f[1]) * int(f[3])      # active objects x object size
    for line in open("/proc/meminfo"):
        k, v = line.split(":", 1)
        if k in ("Slab", "SUnreclaim"):
            out["meminfo_" + k] = int(v.split()[0]) * 1024
    return out


def sockstat(L):
    r = L.sh("p1", ["cat", "/proc/net/sockstat"]).stdout
    out = {}
    for line in r.splitlines():
        proto, rest = line.split(":", 1)
        f = rest.split()
        for k, v in zip(f[0::2], f[1::2]):
            out["%s_%s" % (proto, k)] = int(v)
    return out


def proc(pid):
    st = {}
    for line in open("/proc/%d/status" % pid):
        if line.startswith(("VmRSS:", "VmData:")):
            st[line.split(":")[0]] = int(line.split()[1])
    st["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    return st


def snapshot(L, pid):
    return {"proc": proc(pid), "sockstat": sockstat(L), "slab": slab_bytes(),
            "t": time.time()}


def per_reg(before, after, n):
    d = {}
    d["rss_bytes"] = (after["proc"]["VmRSS"] - before["proc"]["VmRSS"]) * 1024 / n
    d["fds"] = (after["proc"]["fds"] - before["proc"]["fds"]) / n
    for k in ("TCP_inuse", "TCP_alloc", "TCP_mem"):
        d["sockstat_" + k] = (after["sockstat"].get(k, 0) - before["sockstat"].get(k, 0)) / n
    d["sockstat_TCP_mem_bytes"] = d["sockstat_TCP_mem"] * 4096
    slab = {}
    for k in after["slab"]:
        slab[k] = (after["slab"][k] - before["slab"].get(k, 0)) / n
    d["slab_bytes"] = slab
    return d


def listeners_per_ip(L, port):
    out = {}
    for line in L.sh("p1", ["ss", "-Htln"]).stdout.splitlines():
        f = line.split()
        if len(f) >= 4:
            ip, _, p = f[3].rpartition(":")
            if p != port:
                out[ip] = out.get(ip, 0) + 1
    return out


def fd_hard_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def run(L, work, quick, log, brokerd, reg, a1="10.1.0.11", p1="203.0.113.10"):
    res = {"target": TARGET}
    want = 10_000 if quick else TARGET
    # The unit's fd limit, as prlimit would set it; refused without CAP_SYS_RESOURCE.
    r = subprocess.run(["prlimit", "--nofile=262144:262144", "true"], capture_output=True,
                       text=True)
    prlimit = [] if r.returncode else ["prlimit", "--nofile=262144:262144"]
    limit = 262144 if prlimit else fd_hard_limit()
    res["fd_limit"] = limit
    res["fd_limit_raised_like_the_unit"] = bool(prlimit)
    if not prlimit:
        res["fd_limit_note"] = ("prlimit --nofile=262144 refused (%s); hard limit %d" %
                                (r.stderr.strip()[-120:], limit))
    # Headroom: control, relay, epoll, stdio, log, admin, skipped-port binds.
    n = min(want, (limit - 100) // PER_CLIENT * PER_CLIENT)
    res["registrations_requested"] = n
    res["capped_by_fd_limit"] = n < want
    lo, hi = 1024, 65535
    if n < TARGET:
        lo, hi = 20000, 20000 + (n + 1) // 2 + 49
    per_ip = hi - lo + 1 - (1 if lo <= PORT <= hi else 0)
    ips = max(0, -(-n // per_ip) - 1)
    for ip in EXTRA_IPS[:ips]:
        L.sh("p1", ["ip", "addr", "add", ip + "/24", "dev", "eth0"])
    res["proxy_ips"] = [p1] + EXTRA_IPS[:ips]
    res["proxy_ports"] = "%d-%d" % (lo, hi)
    port = str(PORT)
    flags = ["--listen", p1 + ":" + port, "--admin-socket", "none",
             "--proxy-ports", "%d-%d" % (lo, hi),
             "--max-registrations", str(n + 1000), "--max-registrations-per-ip", str(n + 1000),
             "--control-rate-per-ip", "0", "--stats-interval-secs", "0",
             "--drain-grace-secs", "0"]
    for ip in EXTRA_IPS[:ips]:
        flags += ["--proxy-ip", ip]
    res["broker_flags"] = flags
    clients = n // PER_CLIENT

    def start_broker(tag, extra=()):
        b = L.spawn("p1", prlimit + [brokerd] + flags + list(extra), "broker-100k-" + tag)
        t = time.time()
        end = t + 10
        while "listening on" not in L.err("broker-100k-" + tag):
            if b.poll() is not None or time.time() > end:
                raise RuntimeError("broker %s: %s" % (tag, L.err("broker-100k-" + tag)[-500:]))
            time.sleep(0.01)
        return b, t

    def stats_of(b, tag):
        """SIGTERM (drain 0): the broker logs its stats line and exits."""
        L.stop(b)
        lines = [l for l in L.err("broker-100k-" + tag).splitlines() if " stats " in l]
        errs = len([l for l in L.err("broker-100k-" + tag).splitlines() if " ERROR " in l])
        warns = len([l for l in L.err("broker-100k-" + tag).splitlines() if " WARN " in l])
        return {"stats": lines[-1:], "error_lines": errs, "warn_lines": warns}

    def storm(tag, heartbeat_ms, measure, spread_ms=None, standby=False, n_clients=None,
              extra=()):
        spread_ms = heartbeat_ms if spread_ms is None else spread_ms
        cl = n_clients or clients
        out = {"heartbeat_ms": heartbeat_ms, "phase_spread_ms": spread_ms, "clients": cl,
               "per_client": PER_CLIENT, "standby": standby, "broker_extra_flags": list(extra)}
        b, _ = start_broker(tag + "-1", extra)
        time.sleep(0.5)
        s0 = snapshot(L, b.pid)
        g = L.spawn("a1", [reg, "--broker", p1 + ":" + port, "--bind", a1, "fleet",
                           "--clients", str(cl), "--per-client", str(PER_CLIENT),
                           "--window", "512", "--heartbeat-ms", str(heartbeat_ms),
                           "--phase-spread-ms", str(spread_ms),
                           "--max-secs", "900"] + (["--standby"] if standby else []),
                    "fleet-" + tag, stdout=subprocess.PIPE)
        j = json.loads(read_line(g, 600, "registered line"))
        out["register"] = j
        log("  %s: registered %s in %.1f s: %.0f/s" % (tag, j.get("registered"),
                                                      j.get("elapsed_s", 0), j.get("rate_per_s", 0)))
        if standby:
            out["standbys"] = json.loads(read_line(g, 300, "standbys line"))
            log("  %s: standbys %s" % (tag, out["standbys"]))
        if measure:
            time.sleep(2)
            s1 = snapshot(L, b.pid)
            out["before"], out["after"] = s0, s1
            out["per_registration"] = per_reg(s0, s1, max(1, j.get("registered") or 1))
            out["listeners_per_ip"] = listeners_per_ip(L, port)
            log("  %s: per registration %s" % (tag, json.dumps(out["per_registration"])))
        # Let every client heartbeat at least once against the first broker.
        time.sleep(heartbeat_ms / 1000.0 + 1)
        b.send_signal(signal.SIGKILL)
        b.wait()
        killed = time.time()
        b2, started = start_broker(tag + "-2", extra)
        out["restart_gap_s"] = started - killed
        j2 = json.loads(read_line(g, 300, "recovered line"))
        out["storm"] = j2
        out["broker_start_to_all_back_s"] = j2["all_back_unix_ms"] / 1000.0 - started
        if standby and j2.get("standby_all_back_unix_ms"):
            out["broker_start_to_all_standbys_s"] = j2["standby_all_back_unix_ms"] / 1000.0 - started
        out["fds_after_storm"] = proc(b2.pid)["fds"]
        out["listeners_per_ip_after_storm"] = listeners_per_ip(L, port)
        log("  %s: storm: %s re-registered (%s same proxy) %.1f s after the restart" % (
            tag, j2.get("reregistered"), j2.get("same_proxy"), out["broker_start_to_all_back_s"]))
        L.stop(g)
        out["broker_first"] = {"error_lines": len([l for l in L.err("broker-100k-" + tag + "-1").splitlines()
                                                    if " ERROR " in l])}
        out["broker_after_restart"] = stats_of(b2, tag + "-2")
        return out

    res["real"] = storm("real", 10_000, True)
    # Worst case of the phases: every client heartbeats in step (a pool started at once;
    # the shim adds no jitter), so the whole storm arrives in one burst.
    res["in_step"] = storm("instep", 10_000, False, spread_ms=0)
    # With standbys (the shim's default): one more TCP socket and fd per listener on the
    # broker, so half the listeners fit; a pool behind one NAT dials its standbys through
    # one IP, so the operator raises the per-IP preamble limit as for the control rate.
    half = min(n, (limit - 100) // 2 // PER_CLIENT * PER_CLIENT)
    res["standby"] = storm("standby", 10_000, True, standby=True,
                           n_clients=half // PER_CLIENT,
                           extra=["--max-preambles", "4096", "--max-preambles-per-ip", "4096"])
    if n < TARGET:
        hb = max(200, int(10_000 * n / TARGET))
        res["rate_equivalent"] = storm("rateq", hb, False)
        res["rate_equivalent"]["note"] = (
            "heartbeat %d ms: %d listeners re-register at the rate of %d with 10 s heartbeats"
            % (hb, n, TARGET))
    return res
