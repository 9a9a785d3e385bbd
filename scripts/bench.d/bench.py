#!/usr/bin/env python3
"""libgcb benchmark harness (issue 6). Run through scripts/bench, as root.

Brings up its own network lab, runs
  1. the paper's Tables 1-3 (connection time = socket() -> connect() -> first byte the
     server sent; echo time of a fixed payload), TCP and UDP;
  2. iperf3 throughput on the same paths, with rathole and a socat relay as peers;
  3. scale: 10,000 registrations, brokered connects/s, 1,000 concurrent relayed
     connections with data verified; portfwd via scripts/bench-portfwd;
  4. the shim's hot-path overhead via scripts/bench-shim;
  5. TCP hole punching (issue 15): Table 3's "GCB punched" row and iperf3 path (both ends
     under the shim, lab cpe on; the relayed rows run with GCB_PUNCH_TCP=0 so that they
     stay comparable with earlier runs), the broker's relay_bytes over the punched iperf3
     runs, and a hard NAT on gwa (fallback): the first connection (punch tried, relay)
     and later ones (the failed pair remembered) against a relayed one, fresh broker per run;
writes bench/results.json and PNG charts, prints a summary, tears the lab down.
Every figure is the median of per-run medians over interleaved runs, with min-max spread,
quoted as a ratio to its baseline measured in the same run.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procio import read_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TGT = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
NETLAB = os.path.join(ROOT, "scripts", "netlab")
GCBRUN = os.path.join(ROOT, "scripts", "gcb-run")
CONN = os.path.join(TGT, "gcb-bench-conn")
REG = os.path.join(TGT, "gcb-bench-register")
BROKERD = os.path.join(TGT, "gcb-brokerd")
PORTFWD = os.path.join(TGT, "gcb-portfwd")

P1, P2, A1, B1 = "203.0.113.10", "203.0.113.11", "10.1.0.11", "10.2.0.11"
GWA_PUB = "203.0.113.1"
# A GCB client with TCP hole punching off: the relayed rows, as they were before issue 15.
PUNCH_OFF = ["env", "GCB_PUNCH_TCP=0"]
# The broker counters of TCP punching (issue 15) and the relay's byte count.
PUNCH_COUNTERS = ("punched", "punch_fallback", "punch_skipped", "relay_bytes")

# The paper's Tables 1-3 (microseconds; mean (stddev)). None = not in the paper.
PAPER = {
    "t1": {  # private -> public
        "regular": {"tcp": (1656, 22952), "udp": (10167, 2010)},
        "dpf": {"tcp": (1703, 24863), "udp": (12086, 693)},
        "gcb_regpub": {"tcp": (31428, 21051), "udp": (22868, 745)},
        "gcb_gcbpub": {"tcp": (33934, 27629), "udp": (18692, 1650)},
    },
    "t2": {  # public -> private
        "regular": {"tcp": (2007, 21229), "udp": (12456, 340)},
        "dpf": {"tcp": (2074, 20842), "udp": (10894, 1004)},
        "gcb_regpub": {"tcp": (2624, 36620), "udp": (12038, 608)},
        "gcb_gcbpub": {"tcp": (33530, 19455), "udp": (25408, 673)},
    },
    "t3": {  # private -> other private
        "regular": {"tcp": (922, 103726), "udp": (788, 592)},
        "dpf": {"tcp": (1101, 102905), "udp": (2204, 653)},
        "gcb": {"tcp": (6887, 108293), "udp": (6590, 2959)},
    },
}
TABLE_TITLES = {"t1": "Table 1: private -> public (client a1, server p2)",
                "t2": "Table 2: public -> private (client p2, server a1)",
                "t3": "Table 3: private -> other private (client b1, server a1)"}
CFG_TITLES = {"regular": "regular", "dpf": "DPF", "gcb_regpub": "GCB, regular public peer",
              "gcb_gcbpub": "GCB, GCB public peer", "gcb": "GCB (both private)",
              "rathole": "rathole (peer)", "socat": "socat relay on p1 (peer)",
              "gcb_punch": "GCB punched (both private)"}


# UDP clients: unconnected sendto()/recvfrom() (how a GCB sender punches through to a GCB
# listener), and UDP_WARM_MS idle in recv() between the connection datagram and the timed
# echo, so the echo time is that of the settled channel (punched, where it can be), for every
# configuration alike.
UDP_WARM_MS = 20
UDP_CLIENT = ["--udp", "--unconnected", "--warm-ms", str(UDP_WARM_MS)]


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, flush=True)


def med(v):
    return statistics.median(v) if v else None


def spread(per_run):
    return {"median": med(per_run), "min": min(per_run) if per_run else None,
            "max": max(per_run) if per_run else None, "runs": per_run}


class Lab:
    def __init__(self, name, work):
        self.name, self.work = name, work
        self.procs = []

    def up(self):
        subprocess.run([NETLAB, "up", self.name], check=True, stdout=subprocess.DEVNULL)

    def down(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 3
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([NETLAB, "down", self.name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def ns(self, host):
        return ["ip", "netns", "exec", "%s-%s" % (self.name, host)]

    def sh(self, host, cmd, check=True, timeout=120, inp=None):
        r = subprocess.run(self.ns(host) + cmd, capture_output=True, text=True,
                           timeout=timeout, input=inp)
        if check and r.returncode != 0:
            raise RuntimeError("%s %s failed (%d): %s %s" % (host, cmd, r.returncode,
                                                            r.stdout[-500:], r.stderr[-800:]))
        return r

    def spawn(self, host, cmd, name, stdout=None):
        errf = open(os.path.join(self.work, name + ".err"), "w")
        p = subprocess.Popen(self.ns(host) + cmd, stdout=stdout or subprocess.DEVNULL,
                             stderr=errf, text=True, start_new_session=True)
        p.logname = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def err(self, name):
        try:
            return open(os.path.join(self.work, name + ".err")).read()
        except OSError:
            return ""


def wait_file_re(path, rx, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            m = re.search(rx, open(path).read())
            if m:
                return m
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("no /%s/ in %s" % (rx, path))


def gcb(broker=P1, dpf=None, logf=None, level=None):
    c = [GCBRUN]
    if broker:
        c += ["--broker", broker]
    if dpf:
        c += ["--dpf", dpf]
    if logf:
        c += ["--log-file", logf, "--log", level or "info"]
    return c + ["--"]


def broker_counters(sock):
    """The broker's counters (`gcb-brokerd status --json` on its admin socket); {} if it
    does not answer."""
    try:
        o = subprocess.run([BROKERD, "status", "--json", "--admin-socket", sock],
                           capture_output=True, text=True, timeout=10)
        return json.loads(o.stdout).get("counters", {}) if o.returncode == 0 else {}
    except Exception:  # noqa
        return {}


def counter_delta(before, after, names=PUNCH_COUNTERS):
    """after - before for each counter both have (a broker without punching has none)."""
    return {k: after[k] - before[k] for k in names if k in before and k in after}


def rss_kb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


class Bench:
    def __init__(self, args):
        self.a = args
        self.quick = args.quick
        self.runs = args.runs or (3 if self.quick else 7)
        self.K = 10 if self.quick else 30           # samples per client run (after warm-up)
        self.size = 1024                             # echo payload bytes
        self.iperf_t = 1 if self.quick else 3
        self.iperf_runs = args.runs or (3 if self.quick else 5)
        self.res = {"meta": {}, "tables": {}, "throughput": {}, "hardnat": {}, "scale": {},
                    "shim": {}, "portfwd": {}, "scale100k": {}, "targets": []}
        self.work = tempfile.mkdtemp(prefix="gcb-bench.")
        # Keyed, as a deployment is: every daemon, gcb-run, the shim and the load
        # generators read the pool key from GCB_KEY_FILE (inherited by every spawn).
        key = os.path.join(self.work, "pool.key")
        subprocess.run([BROKERD, "--generate-key", key], check=True, capture_output=True)
        os.environ["GCB_KEY_FILE"] = key
        self.lab = Lab("bn%d" % random.randint(0, 99999), self.work)
        self.servers = {}
        # --only punch: just the configurations of TCP hole punching (and their baselines).
        self.punch_only = False
        self.rathole = shutil.which("rathole") or (
            os.path.expanduser("~/.cargo/bin/rathole")
            if os.path.exists(os.path.expanduser("~/.cargo/bin/rathole")) else None)

    # ------------------------------------------------------------------ setup
    def meta(self):
        m = self.res["meta"]
        m["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        m["quick"] = self.quick
        m["kernel"] = os.uname().release
        m["cpus"] = os.cpu_count()
        try:
            m["cpu_model"] = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                              if l.startswith("model name")][0]
        except Exception:
            m["cpu_model"] = "?"
        m["mem_total_kb"] = int([l.split()[1] for l in open("/proc/meminfo")
                                 if l.startswith("MemTotal")][0])
        m["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
        m["git"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()
        m["runs_latency"], m["samples_per_run"] = self.runs, self.K
        m["payload_bytes"], m["iperf_seconds"], m["runs_throughput"] = \
            self.size, self.iperf_t, self.iperf_runs
        m["rathole"] = self.rathole and subprocess.run(
            [self.rathole, "--version"], capture_output=True, text=True).stdout.strip()

    def setup_lab(self):
        L = self.lab
        L.up()
        # Home-router gateways (netlab cpe): no conntrack entries for unsolicited UDP or TCP
        # to the gateways themselves, so GCB<->GCB hole punching (UDP, and TCP's
        # simultaneous open) is not a race (see netlab).
        subprocess.run([NETLAB, "cpe", L.name, "on"], check=True)
        log("lab %s up, cpe on (work dir %s)" % (L.name, self.work))
        self.broker_log = os.path.join(self.work, "broker.err")
        # Its admin socket: the punching counters are read around the punched runs.
        self.broker_sock = os.path.join(self.work, "broker.sock")
        # The benchmark's clients all run on a few lab hosts: per-IP limits above their load.
        self.broker = L.spawn("p1", [BROKERD, "--admin-socket", self.broker_sock, "--listen", P1, "--max-registrations", "20000",
                                     "--max-registrations-per-ip", "20000", "--max-relays", "4096",
                                     "--max-relays-per-ip", "4096", "--max-pending-per-ip", "4096",
                                     "--max-preambles", "4096", "--max-preambles-per-ip", "4096",
                                     "--control-rate-per-ip", "1000000",
                                     "--control-burst-per-ip", "1000000",
                                     "--stats-interval-secs", "0"],
                              "broker")
        os.makedirs(os.path.join(self.work, "pf"), exist_ok=True)
        self.portfwd = L.spawn("gwa", [PORTFWD, "--admin-socket", "none", "--public", GWA_PUB, "--private", "10.1.0.0/24",
                                       "--ports", "20000-29999", "--state",
                                       os.path.join(self.work, "pf")], "portfwd")
        # Static port forwarding (the paper's "regular" for inbound): a table of our own.
        nft = """table ip benchfwd {
  chain pre { type nat hook prerouting priority -100;
    ip daddr %(g)s tcp dport 30000 dnat to %(a)s:7000
    ip daddr %(g)s udp dport 30000 dnat to %(a)s:7000
    ip daddr %(g)s tcp dport 31000 dnat to %(a)s:5201
    ip daddr %(g)s udp dport 31000 dnat to %(a)s:5201
  }
}""" % {"g": GWA_PUB, "a": A1}
        L.sh("gwa", ["nft", "-f", "-"], inp=nft)
        time.sleep(0.3)
        for p in (self.broker, self.portfwd):
            if p.poll() is not None:
                raise RuntimeError("%s died: %s" % (p.logname, L.err(p.logname)))

    def server(self, key, host, prefix, bind, udp=False, logf=None):
        cmd = prefix + [CONN, "serve", "--bind", bind] + (["--udp"] if udp else [])
        p = self.lab.spawn(host, cmd, "srv-" + key, stdout=subprocess.PIPE)
        line = read_line(p, 20, "listening line")
        addr = line.split("listening on ", 1)[1]
        self.servers[key] = addr
        log("server %-10s on %s advertises %s" % (key, host, addr))
        return addr

    def start_servers(self):
        S = self.server
        # p2 (public): plain TCP/UDP, and a GCB one (advertises its proxy).
        S("p2_plain", "p2", [], P2 + ":7000")
        S("p2_plain_u", "p2", [], P2 + ":7000", udp=True)
        S("p2_gcb", "p2", gcb(P1), P2 + ":7001")
        # GCB over UDP (relay path only): getsockname() of the bound socket is its proxy.
        S("p2_gcb_u", "p2", gcb(P1), P2 + ":7001", udp=True)
        # a1 (private): plain (behind static forwarding), DPF, GCB.
        S("a1_plain", "a1", [], A1 + ":7000")
        S("a1_plain_u", "a1", [], A1 + ":7000", udp=True)
        S("a1_dpf", "a1", gcb(None, "10.1.0.1"), A1 + ":7002")
        S("a1_dpf_u", "a1", gcb(None, "10.1.0.1"), A1 + ":7002", udp=True)
        S("a1_gcb", "a1", gcb(P1), A1 + ":7003")
        S("a1_gcb_u", "a1", gcb(P1), A1 + ":7003", udp=True)
        self.servers["static"] = "%s:30000" % GWA_PUB
        if self.rathole:
            self.start_rathole()
        self.lab.spawn("p1", ["socat", "TCP-LISTEN:5400,fork,reuseaddr,backlog=256",
                              "TCP:%s:31000" % GWA_PUB], "socat-iperf")
        self.lab.spawn("p1", ["socat", "TCP-LISTEN:5401,fork,reuseaddr,backlog=256",
                              "TCP:%s:30000" % GWA_PUB], "socat-conn")
        time.sleep(0.5)

    def start_rathole(self):
        srv = os.path.join(self.work, "rathole-server.toml")
        cli = os.path.join(self.work, "rathole-client.toml")
        open(srv, "w").write("""[server]
bind_addr = "%(p1)s:2333"
[server.services.iperf]
token = "bench"
bind_addr = "%(p1)s:5300"
[server.services.conn]
token = "bench"
bind_addr = "%(p1)s:5301"
""" % {"p1": P1})
        open(cli, "w").write("""[client]
remote_addr = "%(p1)s:2333"
[client.services.iperf]
token = "bench"
local_addr = "%(a1)s:5201"
[client.services.conn]
token = "bench"
local_addr = "%(a1)s:7000"
""" % {"p1": P1, "a1": A1})
        self.lab.spawn("p1", [self.rathole, "--server", srv], "rathole-server")
        time.sleep(0.3)
        self.lab.spawn("a1", [self.rathole, "--client", cli], "rathole-client")
        time.sleep(1.0)

    # ------------------------------------------------------------------ item 1
    def table_configs(self):
        s = self.servers
        dpf_pub, dpf_pub_u = s["a1_dpf"], s["a1_dpf_u"]
        C = []  # (table, cfg, proto, host, prefix, addr)
        for proto, plain in (("tcp", s["p2_plain"]), ("udp", s["p2_plain_u"])):
            C.append(("t1", "regular", proto, "a1", [], plain))
            C.append(("t1", "dpf", proto, "a1", gcb(None, "10.1.0.1"), plain))
        # t1 GCB UDP: to a plain server only the shim is added; to a GCB server on p2 the
        # client sends to its proxy, i.e. through the broker's relay (no hole punching).
        for proto, sfx in (("tcp", ""), ("udp", "_u")):
            C.append(("t1", "gcb_regpub", proto, "a1", gcb(P1), s["p2_plain" + sfx]))
            C.append(("t1", "gcb_gcbpub", proto, "a1", gcb(P1), s["p2_gcb" + sfx]))
        for proto, dp in (("tcp", dpf_pub), ("udp", dpf_pub_u)):
            C.append(("t2", "regular", proto, "p2", [], s["static"]))
            C.append(("t2", "dpf", proto, "p2", [], dp))
        for proto, sfx in (("tcp", ""), ("udp", "_u")):
            C.append(("t2", "gcb_regpub", proto, "p2", [], s["a1_gcb" + sfx]))
            C.append(("t2", "gcb_gcbpub", proto, "p2", gcb(P1), s["a1_gcb" + sfx]))
        if self.rathole:
            C.append(("t2", "rathole", "tcp", "p2", [], "%s:5301" % P1))
        C.append(("t2", "socat", "tcp", "p2", [], "%s:5401" % P1))
        for proto, dp in (("tcp", dpf_pub), ("udp", dpf_pub_u)):
            C.append(("t3", "regular", proto, "b1", [], s["static"]))
            C.append(("t3", "dpf", proto, "b1", [], dp))
        # Relayed (punching off: comparable with the runs before issue 15) and punched.
        C.append(("t3", "gcb", "tcp", "b1", PUNCH_OFF + gcb(P1), s["a1_gcb"]))
        C.append(("t3", "gcb", "udp", "b1", gcb(P1), s["a1_gcb_u"]))
        C.append(("t3", "gcb_punch", "tcp", "b1", gcb(P1), s["a1_gcb"]))
        if self.punch_only:
            C = [c for c in C if c[0] == "t3" and c[2] == "tcp" and c[1] in ("regular", "gcb", "gcb_punch")]
        return C

    def run_tables(self):
        C = self.table_configs()
        raw = {}
        log("item 1: %d configurations x %d interleaved runs x %d samples (+1 warm-up), %d-byte echo"
            % (len(C), self.runs, self.K, self.size))
        for r in range(self.runs):
            order = C[r % len(C):] + C[:r % len(C)]  # rotate the start: no fixed position bias
            for (t, cfg, proto, host, prefix, addr) in order:
                cmd = prefix + [CONN, "client", addr, "--count", str(self.K + 1),
                                "--size", str(self.size)] + (UDP_CLIENT if proto == "udp" else [])
                k = (t, cfg, proto)
                d = raw.setdefault(k, {"conn_runs": [], "echo_runs": [], "conn_all": [],
                                       "echo_all": [], "first_runs": [], "errors": [],
                                       "punch_counters": []})
                before = broker_counters(self.broker_sock) if cfg == "gcb_punch" else None
                try:
                    out = self.lab.sh(host, cmd, check=False, timeout=90)
                    j = json.loads(out.stdout.strip().splitlines()[-1])
                except Exception as e:  # noqa
                    j = {"ok": False, "error": "%s %s" % (e, getattr(out, "stderr", "")[-300:])}
                if before is not None:
                    # Did this run's connections punch? (skipped/fallback: relay figures)
                    d["punch_counters"].append(counter_delta(before, broker_counters(self.broker_sock)))
                if not j.get("ok"):
                    d["errors"].append(j.get("error"))
                    continue
                c, e = j["connect_us"][1:], j["echo_us"][1:]
                # The warm-up: the process's first connection (GCB: the one that asks the
                # broker; later ones may reuse a relay decision). Kept, reported apart.
                d["first_runs"].append(j["connect_us"][0])
                d["conn_runs"].append(med(c))
                d["echo_runs"].append(med(e))
                d["conn_all"] += c
                d["echo_all"] += e
            log("  run %d/%d done" % (r + 1, self.runs))
        out = {}
        for (t, cfg, proto), d in raw.items():
            out.setdefault(t, {}).setdefault(cfg, {})[proto] = {
                "conn_us": spread(d["conn_runs"]), "echo_us": spread(d["echo_runs"]),
                "first_conn_us": spread(d["first_runs"]),
                "conn_all_median": med(d["conn_all"]), "echo_all_median": med(d["echo_all"]),
                "errors": d["errors"][:5], "n_errors": len(d["errors"])}
            if d["punch_counters"]:
                pc = d["punch_counters"]
                out[t][cfg][proto]["punch_counters"] = {
                    k: sum(x.get(k, 0) for x in pc) for k in PUNCH_COUNTERS if any(k in x for x in pc)}
        # ratios to regular, per run (paired: run i / regular run i), and of medians
        for t, cfgs in out.items():
            for cfg, protos in cfgs.items():
                for proto, v in protos.items():
                    base = cfgs.get("regular", {}).get(proto)
                    for m in ("conn_us", "echo_us", "first_conn_us"):
                        if base and m in base and v[m]["median"] and base[m]["median"]:
                            v[m]["ratio"] = v[m]["median"] / base[m]["median"]
                            pr = [a / b for a, b in zip(v[m]["runs"], base[m]["runs"])]
                            v[m]["ratio_runs_min"], v[m]["ratio_runs_max"] = min(pr), max(pr)
                    p = PAPER.get(t, {}).get(cfg, {}).get(proto)
                    pb = PAPER.get(t, {}).get("regular", {}).get(proto)
                    if p:
                        v["paper_us"] = {"conn": p[0], "echo": p[1]}
                        v["paper_ratio"] = {"conn": p[0] / pb[0], "echo": p[1] / pb[1]}
        self.res["tables"] = out

    # ------------------------------------------------------------------ item 2
    def iperf_servers(self):
        L, s = self.lab, self.servers
        L.spawn("a1", ["iperf3", "-s", "-4", "-B", A1, "-p", "5201"], "iperf-plain")
        dlog = os.path.join(self.work, "iperf-dpf.shim.log")
        L.spawn("a1", gcb(None, "10.1.0.1", dlog) + ["iperf3", "-s", "-4", "-B", A1, "-p", "5202"],
                "iperf-dpf")
        glog = os.path.join(self.work, "iperf-gcb.shim.log")
        L.spawn("a1", gcb(P1, None, glog) + ["iperf3", "-s", "-4", "-B", A1, "-p", "5203"],
                "iperf-gcb")
        m = wait_file_re(dlog, r"DPF mapped Tcp %s:5202 -> public ([0-9.]+:\d+)" % re.escape(A1))
        s["iperf_dpf"] = m.group(1)
        self.dpf_log = dlog
        m = wait_file_re(glog, r"registered %s:5203 with broker.*?: proxy ([0-9.]+:\d+)" % re.escape(A1))
        s["iperf_gcb"] = m.group(1)
        log("iperf3 servers: plain a1:5201 (static %s:31000), DPF %s, GCB proxy %s"
            % (GWA_PUB, s["iperf_dpf"], s["iperf_gcb"]))
        time.sleep(0.5)

    def iperf_configs(self):
        s = self.servers
        def hp(a):
            h, p = a.rsplit(":", 1)
            return h, p
        C = [  # (key, title, host, prefix, addr, udp)
            ("direct", "direct (static port forwarding) p2->a1", "p2", [], "%s:31000" % GWA_PUB, False),
            ("dpf", "DPF p2->a1", "p2", [], s["iperf_dpf"], False),
            ("gcb_reverse", "GCB reverse p2(GCB)->a1", "p2", gcb(P1), s["iperf_gcb"], False),
            ("gcb_relay_plain", "GCB relayed p2(plain)->proxy->a1", "p2", [], s["iperf_gcb"], False),
            ("socat", "socat relay on p1, p2->p1->a1", "p2", [], "%s:5400" % P1, False),
            ("direct_b1", "direct (static fwd) b1->a1", "b1", [], "%s:31000" % GWA_PUB, False),
            ("gcb_relay_b1", "GCB relayed b1(GCB)->p1->a1", "b1", PUNCH_OFF + gcb(P1), s["iperf_gcb"], False),
            ("gcb_punch_b1", "GCB punched b1(GCB)->a1(GCB)", "b1", gcb(P1), s["iperf_gcb"], False),
            ("udp_direct", "UDP direct (static fwd) p2->a1", "p2", [], "%s:31000" % GWA_PUB, True),
            ("udp_dpf", "UDP DPF p2->a1", "p2", [], s["iperf_dpf"], True),
        ]
        if self.rathole:
            C.insert(4, ("rathole", "rathole p2->p1->a1 (client in a1 dials out)", "p2", [],
                         "%s:5300" % P1, False))
        if self.punch_only:
            C = [c for c in C if c[0] in ("direct_b1", "gcb_relay_b1", "gcb_punch_b1")]
        return [(k, t, h, pre, hp(a), u) for (k, t, h, pre, a, u) in C]

    def run_throughput(self):
        self.iperf_servers()
        C = self.iperf_configs()
        raw = {k: {"runs": [], "errors": [], "loss": []} for (k, *_x) in C}
        punch = {}  # counter deltas summed over the punched iperf3 runs
        log("item 2: %d paths x %d interleaved runs x %d s iperf3" % (len(C), self.iperf_runs, self.iperf_t))
        for r in range(self.iperf_runs):
            order = C[r % len(C):] + C[:r % len(C)]
            for (k, title, host, pre, (h, p), udp) in order:
                if k in ("dpf", "udp_dpf"):
                    # The mapping's public port can change when iperf3 re-listens (see
                    # BENCHMARKS.md): use the one the shim logged last.
                    h, p = re.findall(r"DPF mapped Tcp %s:5202 -> public ([0-9.]+):(\d+)" % re.escape(A1),
                                      open(self.dpf_log).read())[-1]
                cmd = pre + ["iperf3", "-c", h, "-p", p, "-t", str(self.iperf_t), "-J",
                             "--connect-timeout", "5000"]
                if udp:
                    cmd += ["-u", "-b", "0", "-l", "1400"]
                before = broker_counters(self.broker_sock) if k == "gcb_punch_b1" else None
                try:
                    o = self.lab.sh(host, cmd, check=False, timeout=self.iperf_t + 30)
                    j = json.loads(o.stdout)
                    if "error" in j:
                        raise RuntimeError(j["error"])
                    if udp:
                        bps = j["end"]["sum"]["bits_per_second"] * (1 - j["end"]["sum"]["lost_percent"] / 100)
                        raw[k]["loss"].append(j["end"]["sum"]["lost_percent"])
                    else:
                        bps = j["end"]["sum_received"]["bits_per_second"]
                    raw[k]["runs"].append(bps / 1e9)
                except Exception as e:  # noqa
                    raw[k]["errors"].append(str(e)[:300])
                if before is not None:
                    for c, v in counter_delta(before, broker_counters(self.broker_sock)).items():
                        punch[c] = punch.get(c, 0) + v
                time.sleep(0.4)  # iperf3 servers re-listen after each test
            log("  run %d/%d: %s" % (r + 1, self.iperf_runs, " ".join(
                "%s=%.2f" % (k, raw[k]["runs"][-1]) if raw[k]["runs"] else "%s=ERR" % k for (k, *_x) in C)))
        out = {}
        for (k, title, host, pre, (h, p), udp) in C:
            v = spread(raw[k]["runs"])
            v.update({"title": title, "unit": "Gbit/s", "errors": raw[k]["errors"][:3],
                      "n_errors": len(raw[k]["errors"]), "udp": udp})
            if udp:
                v["loss_percent_median"] = med(raw[k]["loss"])
            out[k] = v
        def ratio(a, b):
            if out.get(a, {}).get("median") and out.get(b, {}).get("median"):
                pr = [x / y for x, y in zip(out[a]["runs"], out[b]["runs"])]
                return {"ratio": out[a]["median"] / out[b]["median"], "min": min(pr), "max": max(pr)}
            return None
        rat = {}
        for k in out:
            base = "direct_b1" if k.endswith("_b1") else ("udp_direct" if k.startswith("udp") else "direct")
            rat[k + "/" + base] = ratio(k, base)
        for k in ("gcb_relay_plain", "gcb_relay_b1"):
            rat[k + "/rathole"] = ratio(k, "rathole")
            rat[k + "/socat"] = ratio(k, "socat")
        rat["gcb_punch_b1/gcb_relay_b1"] = ratio("gcb_punch_b1", "gcb_relay_b1")
        # Bytes through the broker's relays during the punched runs (target 0), and
        # whether they punched: all figures of the broker's counters, summed over the runs.
        self.res["throughput"] = {"paths": out, "ratios": rat, "punch_counters": punch}
        log("  punched iperf3 runs, broker counter deltas: %s" % (punch or "n/a (no punching counters)"))

    # ------------------------------------------------------------------ item 5
    def run_hardnat(self):
        """A hard NAT on gwa (masquerade random,fully-random): b1 -> a1 under GCB cannot
        punch. Per run, a fresh broker (it remembers failed pairs for minutes) and a fresh
        GCB server in a1, then three client processes in b1, each K+1 connections:
        `relayed` (GCB_PUNCH_TCP=0: the relayed path, the baseline), `cold` (punch tried,
        fails, relay: its first connection pays the punch timeout), `warm` (the pair is
        remembered: relayed at once). Target: cold's first connection at most +250 ms over
        relayed's first, warm's none."""
        L = self.lab
        subprocess.run([NETLAB, "nat", L.name, "gwa", "hard"], check=True)
        kinds = ("relayed", "cold", "warm")
        raw = {k: {"first": [], "later": [], "errors": []} for k in kinds}
        counters = []
        log("item 5: hard NAT on gwa, %d runs x (relayed, cold, warm) x %d connections" % (self.runs, self.K + 1))
        try:
            for r in range(self.runs):
                bp = "%s:%d" % (P1, 9800 + r)
                sock = os.path.join(self.work, "broker-hn%d.sock" % r)
                b = L.spawn("p1", [BROKERD, "--admin-socket", sock, "--listen", bp,
                                   "--stats-interval-secs", "0"], "broker-hn%d" % r)
                srv = None
                try:
                    wait_file_re(os.path.join(self.work, "broker-hn%d.err" % r), r"listening on udp")
                    srv = L.spawn("a1", gcb(bp) + [CONN, "serve", "--bind", "%s:%d" % (A1, 7100 + r)],
                                  "srv-hn%d" % r, stdout=subprocess.PIPE)
                    addr = read_line(srv, 20, "listening line").split("listening on ", 1)[1]
                    # Unmeasured, punching off (the broker learns nothing from it): the
                    # server's first brokered connection (standbys not parked yet, ARP) is
                    # nobody's figure.
                    L.sh("b1", PUNCH_OFF + gcb(bp) + [CONN, "client", addr, "--count", "2", "--size",
                                                      str(self.size)], check=False, timeout=90)
                    for kind in kinds:
                        pre = (PUNCH_OFF if kind == "relayed" else []) + gcb(bp)
                        cmd = pre + [CONN, "client", addr, "--count", str(self.K + 1), "--size", str(self.size)]
                        out = None
                        try:
                            out = L.sh("b1", cmd, check=False, timeout=90)
                            j = json.loads(out.stdout.strip().splitlines()[-1])
                        except Exception as e:  # noqa
                            j = {"ok": False, "error": "%s %s" % (e, getattr(out, "stderr", "")[-300:])}
                        if not j.get("ok"):
                            raw[kind]["errors"].append(j.get("error"))
                            continue
                        raw[kind]["first"].append(j["connect_us"][0])
                        raw[kind]["later"].append(med(j["connect_us"][1:]))
                    counters.append({k: v for k, v in broker_counters(sock).items() if k in PUNCH_COUNTERS})
                finally:
                    if srv is not None:
                        L.stop(srv)
                    L.stop(b)
                log("  run %d/%d: first connection us %s; broker %s" % (
                    r + 1, self.runs, {k: (raw[k]["first"] or ["ERR"])[-1] for k in kinds}, counters[-1:]))
        finally:
            subprocess.run([NETLAB, "nat", L.name, "gwa", "easy"], check=True)
        out = {k: {"first_conn_us": spread(raw[k]["first"]), "later_conn_us": spread(raw[k]["later"]),
                   "errors": raw[k]["errors"][:3], "n_errors": len(raw[k]["errors"])} for k in kinds}
        # Paired per run: extra time over the relayed process's connection (us).
        for k in ("cold", "warm"):
            for m, src in (("first_extra_us", "first"), ("later_extra_us", "later")):
                if len(raw[k][src]) == len(raw["relayed"][src]) and raw[k][src]:
                    out[k][m] = spread([a - b for a, b in zip(raw[k][src], raw["relayed"][src])])
        self.res["hardnat"] = {"kinds": out, "broker_counters": counters}

    # ------------------------------------------------------------------ item 3
    def run_scale(self):
        L = self.lab
        sc = self.res["scale"]
        n_reg = 2000 if self.quick else 10000
        # (a) registrations on a fresh broker
        b = L.spawn("p1", [BROKERD, "--admin-socket", "none", "--listen", P1 + ":9700", "--max-registrations", "20000",
                           "--max-registrations-per-ip", "20000",
                           "--control-rate-per-ip", "1000000", "--control-burst-per-ip", "1000000",
                           "--stats-interval-secs", "0"], "broker-reg")
        time.sleep(0.5)
        rss0 = rss_kb(b.pid)
        g = L.spawn("a1", [REG, "--broker", P1 + ":9700", "--bind", A1, "register", "--count",
                           str(n_reg), "--window", "128", "--hold-secs", "20",
                           "--max-secs", "150" if not self.quick else "60"],
                    "reg-gen", stdout=subprocess.PIPE)
        j = json.loads(read_line(g, 200, "register result"))
        time.sleep(0.5)
        rss1 = rss_kb(b.pid)
        nfd = len(os.listdir("/proc/%d/fd" % b.pid))
        j["broker_rss_kb_before"], j["broker_rss_kb_after"], j["broker_fds_after"] = rss0, rss1, nfd
        if j.get("registered"):
            j["rss_bytes_per_registration"] = (rss1 - rss0) * 1024 / j["registered"]
        try:
            slab = subprocess.run(["grep", "-E", "^(TCP|sock_inode_cache) ", "/proc/slabinfo"],
                                  capture_output=True, text=True).stdout
            j["slabinfo_after"] = slab.strip().splitlines()
        except Exception:
            pass
        L.stop(g)
        L.stop(b)
        j["broker_stats"] = [l for l in L.err("broker-reg").splitlines() if "stats" in l][-1:]
        sc["registrations"] = j
        log("  registrations: %s" % {k: j.get(k) for k in ("registered", "elapsed_s", "rate_per_s",
                                                             "errors", "first_busy_after",
                                                             "rss_bytes_per_registration")})
        # (b) brokered connects per second on a fresh broker: reverse (public connector,
        # listener behind NAT: the broker also sends connect_back) and direct (same NAT)
        runs = 3 if self.quick else 5
        dur = "2" if self.quick else "3"
        res = {"reverse": [], "direct": [], "raw": [], "reverse_pre_busy": [], "direct_pre_busy": []}
        # A fresh broker for every (run, kind): the broker's reply cache is global
        # (see BENCHMARKS.md), so one kind's requests must not starve the next one's.
        for r in range(runs):
            for ki, (kind, host, bind, extra) in enumerate(
                    (("reverse", "p2", P2, ["--connector-listen", P2 + ":5999"]),
                     ("direct", "a2", "10.1.0.12", []))):
                port = str(9710 + 2 * r + ki)
                b = L.spawn("p1", [BROKERD, "--admin-socket", "none", "--listen", P1 + ":" + port, "--stats-interval-secs", "0",
                                   "--control-rate-per-ip", "1000000",
                                   "--control-burst-per-ip", "1000000",
                                   "--max-pending-per-ip", "100000",
                                   "--max-relays-per-ip", "100000"],
                            "broker-conn%d%s" % (r, kind))
                time.sleep(0.4)
                lst = L.spawn("a1", [REG, "--broker", P1 + ":" + port, "--bind", A1, "listen"],
                              "conn-listener%d%s" % (r, kind), stdout=subprocess.PIPE)
                proxy = json.loads(read_line(lst, 15, "proxy"))["proxy"]
                o = L.sh(host, [REG, "--broker", P1 + ":" + port, "--bind", bind, "connect",
                                "--proxy", proxy, "--duration", dur, "--window", "64"] + extra,
                         check=False, timeout=60)
                try:
                    jj = json.loads(o.stdout.strip().splitlines()[-1])
                except Exception:
                    jj = {"ok": False, "error": o.stderr[-300:]}
                jj["kind"], jj["run"] = kind, r
                res["raw"].append(jj)
                res[kind].append(jj.get("decisions_per_s", 0))
                res[kind + "_pre_busy"].append(jj.get("rate_before_first_busy") or jj.get("decisions_per_s", 0))
                L.stop(lst)
                L.stop(b)
        sc["connects"] = {"reverse_per_s": spread(res["reverse"]), "direct_per_s": spread(res["direct"]),
                          "reverse_per_s_before_first_busy": spread(res["reverse_pre_busy"]),
                          "direct_per_s_before_first_busy": spread(res["direct_pre_busy"]),
                          "raw": res["raw"], "duration_s": float(dur), "window": 64}
        log("  connects/s: reverse %s direct %s" % (med(res["reverse"]), med(res["direct"])))
        # (c) 1,000 concurrent relayed connections (plain p2 -> proxy -> a1 GCB server)
        n = 300 if self.quick else 1000
        rss0 = rss_kb(self.broker.pid)
        h = L.spawn("p2", [CONN, "hold", self.servers["a1_gcb"], "--conns", str(n), "--size", "4096",
                           "--linger", "3"], "hold", stdout=subprocess.PIPE)
        try:
            j = json.loads(read_line(h, 180, "hold result"))
        except Exception as e:  # noqa
            j = {"ok": False, "error": str(e)}
        j["broker_rss_kb_before"] = rss0
        j["broker_rss_kb_during"] = rss_kb(self.broker.pid)
        j["broker_fds_during"] = len(os.listdir("/proc/%d/fd" % self.broker.pid))
        if j.get("opened"):
            j["rss_bytes_per_relay"] = (j["broker_rss_kb_during"] - rss0) * 1024 / j["opened"]
        try:
            h.wait(timeout=30)
        except subprocess.TimeoutExpired:
            L.stop(h)
        sc["relays"] = j
        log("  relayed: %s" % {k: j.get(k) for k in ("requested", "opened", "verified", "open_ms",
                                                      "total_ms", "broker_fds_during", "error")})

    def run_pool(self):
        # A pool of 3 brokers: spread, failover, what moves (scripts/bench.d/pool.py).
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pool
        pool.run_pool(self, self.lab, log, BROKERD, GCBRUN, sys.executable)

    def run_scale100k(self):
        """One broker with 100,000 registrations and its restart storm (scale100k.py)."""
        import scale100k
        self.res["scale100k"] = scale100k.run(self.lab, self.work, self.quick, log, BROKERD, REG,
                                              A1, P1)

    def run_portfwd(self):
        args = ["500", "3", "100"] if self.quick else ["2000", "5", "200"]
        log("item 3: scripts/bench-portfwd %s" % " ".join(args))
        o = subprocess.run([os.path.join(ROOT, "scripts", "bench-portfwd")] + args,
                           capture_output=True, text=True, timeout=900)
        pf = {"args": args, "exit": o.returncode, "output": o.stdout.splitlines()[-12:]}
        m = re.search(r"install latency median (\S+) us \(p99 (\S+)\); 10,000 installed in (\S+) ms; "
                      r"restart restored (\d+) in (\d+) ms", o.stdout)
        if m:
            pf.update({"install_median_us": float(m.group(1)), "install_p99_us": float(m.group(2)),
                       "install_10000_ms": float(m.group(3)), "restored": int(m.group(4)),
                       "restore_ms": float(m.group(5))})
        m = re.search(r"per-connection: (\S+) us with 10 mappings, (\S+) us with 10,010; ratio (\S+)", o.stdout)
        if m:
            pf.update({"conn_us_10": float(m.group(1)), "conn_us_10010": float(m.group(2)),
                       "conn_ratio": float(m.group(3))})
        if o.returncode != 0:
            pf["stderr"] = o.stderr[-600:]
        self.res["portfwd"] = pf
        log("  portfwd: %s" % {k: v for k, v in pf.items() if k not in ("output",)})

    # ------------------------------------------------------------------ item 4
    def run_shim(self):
        args = ["5", "30000", "32"] if self.quick else ["11", "100000", "32"]
        env = dict(os.environ)
        if not self.quick:
            env["CALLGRIND"] = "1"
        log("item 4: scripts/bench-shim %s%s" % (" ".join(args), " (CALLGRIND=1)" if not self.quick else ""))
        o = subprocess.run([os.path.join(ROOT, "scripts", "bench-shim")] + args, capture_output=True,
                           text=True, env=env, timeout=1200)
        sh = {"args": args, "exit": o.returncode, "output": o.stdout.splitlines()}
        m = re.search(r"overhead: ([-+0-9.]+)% by medians, ([-+0-9.]+)% by minima, ([-+0-9.]+)% by paired", o.stdout)
        if m:
            sh.update({"overhead_pct_medians": float(m.group(1)), "overhead_pct_minima": float(m.group(2)),
                       "overhead_pct_paired": float(m.group(3))})
        m = re.search(r"no shim : median +(\S+) ns/rtt +min +(\S+) +max +(\S+)", o.stdout)
        m2 = re.search(r"libgcb  : median +(\S+) ns/rtt +min +(\S+) +max +(\S+)", o.stdout)
        if m and m2:
            sh["no_shim_ns"] = [float(x) for x in m.groups()]
            sh["shim_ns"] = [float(x) for x in m2.groups()]
        m = re.search(r"no shim ([0-9.]+), libgcb ([0-9.]+), delta ([-+0-9.]+) \(([-+0-9.]+)%\)", o.stdout)
        if m:
            sh.update({"callgrind_ir_no_shim": float(m.group(1)), "callgrind_ir_shim": float(m.group(2)),
                       "callgrind_pct": float(m.group(4))})
        self.res["shim"] = sh
        log("  shim: %s" % {k: v for k, v in sh.items() if k != "output"})

    # ------------------------------------------------------------------ targets
    def targets(self):
        T, tb, tp, sc = [], self.res["tables"], self.res["throughput"], self.res["scale"]
        def add(name, value, limit, cmp, unit="x", note=""):
            met = None if value is None or limit is None else (value <= limit if cmp == "<=" else value >= limit)
            T.append({"target": name, "value": value, "limit": "%s %s%s" % (cmp, limit, unit),
                      "met": met, "note": note})
        def r(t, cfg, proto, m="conn_us"):
            return tb.get(t, {}).get(cfg, {}).get(proto, {}).get(m, {}).get("ratio")
        for t in ("t1", "t2", "t3"):
            add("DPF TCP connection time / regular (%s)" % t, r(t, "dpf", "tcp"), 1.1, "<=")
        dpf_tp = tp.get("ratios", {}).get("dpf/direct")
        add("DPF TCP throughput / direct (data path at regular speed)",
            dpf_tp and dpf_tp["ratio"], 0.9, ">=", note="read as 'regular speed' = within 10%")
        add("GCB reverse TCP connection time / regular (t2, GCB public peer)", r("t2", "gcb_gcbpub", "tcp"), 3, "<=")
        add("GCB relayed TCP connection time / regular (t2, regular public peer)", r("t2", "gcb_regpub", "tcp"), 3, "<=")
        add("GCB relayed TCP connection time / regular (t3, both private)", r("t3", "gcb", "tcp"), 3, "<=")
        for k in ("gcb_relay_plain", "gcb_relay_b1"):
            x = tp.get("ratios", {}).get(k + "/rathole")
            add("GCB relayed TCP throughput / rathole (%s)" % k, x and x["ratio"], 2, ">=")
        x = tp.get("ratios", {}).get("gcb_relay_plain/direct")
        add("GCB relayed TCP throughput / direct (p2->a1)", x and x["ratio"], 0.6, ">=")
        x = tp.get("ratios", {}).get("gcb_relay_b1/direct_b1")
        add("GCB relayed TCP throughput / direct (b1->a1)", x and x["ratio"], 0.6, ">=")
        # TCP hole punching (issue 15)
        relayed_t3 = r("t3", "gcb", "tcp")
        add("GCB punched TCP connection time / regular (t3), limit: the relayed ratio of this run",
            r("t3", "gcb_punch", "tcp"), round(relayed_t3, 2) if relayed_t3 else None, "<=")
        x = tp.get("ratios", {}).get("gcb_punch_b1/direct_b1")
        add("GCB punched TCP throughput / direct (b1->a1)", x and x["ratio"], 0.95, ">=")
        pc = tp.get("punch_counters", {})
        add("bytes through the broker's relays during the punched iperf3 runs", pc.get("relay_bytes"), 0, "<=",
            " B", note="punched %s, fallback %s, skipped %s" % (
                pc.get("punched"), pc.get("punch_fallback"), pc.get("punch_skipped")))
        hn = self.res.get("hardnat", {}).get("kinds", {})
        def hx(kind, m):
            return (hn.get(kind, {}).get(m) or {}).get("median")
        v = hx("cold", "first_extra_us")
        add("hard NAT: first connection's extra time over relayed (punch tried, fallback)",
            v / 1000 if v is not None else None, 250, "<=", " ms")
        v = hx("warm", "first_extra_us")
        add("hard NAT: later process's first connection's extra time over relayed (pair remembered)",
            v / 1000 if v is not None else None, 50, "<=", " ms",
            note="no punch wait: a wait would be GCB_PUNCH_MS (200 ms)")
        c = sc.get("connects", {})
        add("brokered connects/s (reverse, with connect_back)", c.get("reverse_per_s", {}).get("median"),
            5000, ">=", "/s")
        add("brokered connects/s (direct decision)", c.get("direct_per_s", {}).get("median"), 5000, ">=", "/s")
        reg = sc.get("registrations", {})
        add("broker memory per registration (VmRSS delta)", reg.get("rss_bytes_per_registration"),
            4096, "<=", " B", note="%s registrations" % reg.get("registered"))
        big = self.res.get("scale100k", {})
        for k, what in (("real", "restart storm: all registrations back"),
                        ("in_step", "restart storm, heartbeats in step: all back"),
                        ("standby", "restart storm with standbys: all registrations back"),
                        ("rate_equivalent", "restart storm at 100,000's arrival rate: all back")):
            x = big.get(k, {})
            if x:
                add(what, x.get("broker_start_to_all_back_s"), 60, "<=", " s",
                    note="%s registrations, heartbeat %s ms" % (
                        x.get("register", {}).get("registered"), x.get("heartbeat_ms")))
        sh = self.res["shim"]
        add("shim overhead on unmanaged sockets (median paired ratio)", sh.get("overhead_pct_paired"),
            2, "<=", " %")
        self.res["targets"] = T

    # ------------------------------------------------------------------ main
    def main(self):
        self.meta()
        ok = True
        try:
            self.setup_lab()
            self.start_servers()
            self.run_tables()
            self.save()
            self.run_throughput()
            self.save()
            self.run_hardnat()
            self.save()
            self.run_scale()
            self.save()
            self.run_pool()
            self.save()
            self.run_scale100k()
            self.save()
        except Exception:
            ok = False
            self.res["meta"]["lab_error"] = traceback.format_exc()
            log("ERROR:\n" + traceback.format_exc())
        finally:
            try:
                self.lab.stop(self.broker)
                self.res["meta"]["broker_stats"] = [l for l in self.lab.err("broker").splitlines()
                                                    if "stats" in l][-1:]
                self.res["meta"]["broker_warnings"] = len([l for l in self.lab.err("broker").splitlines()
                                                           if "WARN" in l])
            except Exception:
                pass
            self.lab.down()
            log("lab %s down" % self.lab.name)
        for step in (self.run_portfwd, self.run_shim):
            try:
                step()
            except Exception:
                ok = False
                log("ERROR:\n" + traceback.format_exc())
        self.targets()
        self.res["meta"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        self.save()
        try:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import charts
            if not self.a.only:  # a partial run never replaces the charts
                charts.make(self.res, self.a.out)
        except Exception:
            log("charts failed:\n" + traceback.format_exc())
        import report
        print(report.summary(self.res))
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log("kept work dir %s" % self.work)
        return ok

    def save(self):
        os.makedirs(self.a.out, exist_ok=True)
        # A partial run (--only) never replaces the full results.
        name = "results-only.json" if self.a.only else ("results-quick.json" if self.quick else "results.json")
        with open(os.path.join(self.a.out, name), "w") as f:
            json.dump(self.res, f, indent=1, sort_keys=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ap.add_argument("--only", help="comma list: tables,throughput,hardnat,scale,pool,scale100k,portfwd,shim, "
                    "or punch (only TCP hole punching's rows and their baselines: Table 3 "
                    "regular/GCB/GCB punched TCP, iperf3 b1->a1 direct/relayed/punched, hardnat); "
                    "writes results-only.json, no charts (debug)")
    a = ap.parse_args()
    b = Bench(a)
    if a.only:
        only = a.only.split(",")
        if "punch" in only:
            b.punch_only = True
            only += ["tables", "throughput", "hardnat"]
        for name in ("tables", "throughput", "hardnat", "scale", "pool", "scale100k"):
            if name not in only:
                setattr(b, "run_" + name, lambda: None)
        for name in ("portfwd", "shim"):
            if name not in only:
                setattr(b, "run_" + name, lambda: None)
    sys.exit(0 if b.main() else 1)


if __name__ == "__main__":
    main()
