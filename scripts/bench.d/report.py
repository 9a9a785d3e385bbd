"""Text/markdown rendering of bench/results.json (used by bench.py and by hand:
python3 scripts/bench.d/report.py bench/results.json [--md])."""
import json
import sys

ORDER = {"t1": ["regular", "dpf", "gcb_regpub", "gcb_gcbpub"],
         "t2": ["regular", "dpf", "gcb_regpub", "gcb_gcbpub", "rathole", "socat"],
         "t3": ["regular", "dpf", "gcb", "gcb_punch"]}
TITLES = {"t1": "Table 1: private -> public (client a1, server p2)",
          "t2": "Table 2: public -> private (client p2, server a1)",
          "t3": "Table 3: private -> other private (client b1, server a1)"}
CFG = {"regular": "regular", "dpf": "DPF", "gcb_regpub": "GCB, regular public peer",
       "gcb_gcbpub": "GCB, GCB public peer", "gcb": "GCB", "rathole": "rathole (peer)",
       "socat": "socat relay on p1 (peer)", "gcb_punch": "GCB punched"}


def fmt_us(v):
    if not v or v.get("median") is None:
        return "n/a"
    return "%.0f (%.0f-%.0f)" % (v["median"], v["min"], v["max"])


def fmt_ratio(v):
    if not v or v.get("ratio") is None:
        return ""
    return "%.2fx [%.2f-%.2f]" % (v["ratio"], v["ratio_runs_min"], v["ratio_runs_max"])


def cell(protos, proto, cfg, metric):
    v = protos.get(proto)
    if v is None:
        return "n/a", "", ""
    if v.get("n_errors"):
        err = " (%d failed runs)" % v["n_errors"]
    else:
        err = ""
    pr = v.get("paper_ratio", {}).get(metric[:4] if metric == "conn_us" else "echo")
    return fmt_us(v[metric]) + err, fmt_ratio(v[metric]), ("%.2fx" % pr) if pr else "-"


def tables_md(res):
    out = []
    tb = res.get("tables", {})
    m = res.get("meta", {})
    for t in ("t1", "t2", "t3"):
        if t not in tb:
            continue
        out.append("#### %s\n" % TITLES[t])
        out.append("| config | proto | connect us: median (min-max of run medians) | ratio to regular [run range] | paper ratio | echo %d B us | ratio | paper ratio |"
                   % m.get("payload_bytes", 0))
        out.append("|---|---|---|---|---|---|---|---|")
        for cfg in ORDER[t]:
            protos = tb[t].get(cfg)
            if protos is None:
                continue
            for proto in ("tcp", "udp"):
                if proto not in protos:  # not run (rathole, socat, GCB punched: TCP only)
                    continue
                c = cell(protos, proto, cfg, "conn_us")
                e = cell(protos, proto, cfg, "echo_us")
                out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (CFG[cfg], proto, c[0], c[1], c[2], e[0], e[1], e[2]))
        out.append("")
    # The first connection of each client process (its warm-up, not in the tables above).
    rows = []
    for t in ("t1", "t2", "t3"):
        for cfg in ORDER[t]:
            v = tb.get(t, {}).get(cfg, {}).get("tcp", {}).get("first_conn_us")
            if v and v.get("median") is not None:
                rows.append("| %s | %s | %s | %s |" % (t, CFG[cfg], fmt_us(v), fmt_ratio(v)))
    if rows:
        out.append("First TCP connection of each client process (the warm-up sample above: "
                   "a GCB client asks the broker for it; later connections to a proxy it "
                   "relayed go straight to the proxy):\n")
        out.append("| table | config | connect us: median (min-max of runs) | ratio to regular's first [run range] |")
        out.append("|---|---|---|---|")
        out += rows
        out.append("")
    return "\n".join(out)


def throughput_md(res):
    tp = res.get("throughput", {})
    if not tp:
        return ""
    out = ["| path | Gbit/s median (min-max) | ratio to its direct baseline [run range] |", "|---|---|---|"]
    rat = tp.get("ratios", {})
    for k, v in tp.get("paths", {}).items():
        r = [x for kk, x in rat.items() if kk.startswith(k + "/") and ("direct" in kk.split("/")[1]) and x]
        rs = "%.2fx [%.2f-%.2f]" % (r[0]["ratio"], r[0]["min"], r[0]["max"]) if r else ""
        val = "%.2f (%.2f-%.2f)" % (v["median"], v["min"], v["max"]) if v.get("median") else "failed: %s" % (v.get("errors") or ["?"])[0][:80]
        if v.get("udp") and v.get("loss_percent_median") is not None:
            val += ", loss %.1f%%" % v["loss_percent_median"]
        out.append("| %s | %s | %s |" % (v["title"], val, rs))
    out.append("")
    for kk in ("gcb_relay_plain/rathole", "gcb_relay_b1/rathole", "gcb_relay_plain/socat", "gcb_relay_b1/socat",
               "gcb_punch_b1/gcb_relay_b1"):
        x = rat.get(kk)
        if x:
            out.append("- %s: %.2fx [%.2f-%.2f]" % (kk, x["ratio"], x["min"], x["max"]))
    pc = tp.get("punch_counters")
    if pc is not None:
        out.append("- broker counters over the punched iperf3 runs (b1->a1): %s"
                   % (", ".join("%s +%s" % kv for kv in sorted(pc.items())) or "none (a broker without TCP punching)"))
    return "\n".join(out)


def punch_md(res):
    """Table 3's GCB rows side by side, the punched row's broker counters, and the hard-NAT
    fallback measurement."""
    out = []
    t3 = res.get("tables", {}).get("t3", {})
    rows = []
    for cfg, title in (("gcb", "GCB relayed (GCB_PUNCH_TCP=0)"), ("gcb_punch", "GCB punched")):
        v = t3.get(cfg, {}).get("tcp")
        if v:
            rows.append("| %s | %s | %s | %s | %s | %s |" % (
                title, fmt_us(v["conn_us"]), fmt_ratio(v["conn_us"]), fmt_us(v["echo_us"]),
                fmt_us(v.get("first_conn_us")),
                ", ".join("%s +%s" % kv for kv in sorted(v.get("punch_counters", {}).items())) or "-"))
    if rows:
        out.append("Table 3, TCP, GCB both private (client b1, server a1; lab cpe on):\n")
        out.append("| config | connect us | ratio to regular | echo us | first connection us | broker counters over its runs |")
        out.append("|---|---|---|---|---|---|")
        out += rows
        out.append("")
    hn = res.get("hardnat", {}).get("kinds")
    if hn:
        out.append("Hard NAT on gwa (masquerade random,fully-random), fresh broker per run; first connection of "
                   "a client process and the median of its later ones, us; extra = paired per run over relayed:\n")
        out.append("| process | first connection | extra over relayed | later connections | errors |")
        out.append("|---|---|---|---|---|")
        for k, title in (("relayed", "relayed (GCB_PUNCH_TCP=0)"), ("cold", "first after start (punch tried, fallback)"),
                         ("warm", "next process (failed pair remembered)")):
            v = hn.get(k, {})
            out.append("| %s | %s | %s | %s | %s |" % (title, fmt_us(v.get("first_conn_us")),
                                                      fmt_us(v.get("first_extra_us")) if v.get("first_extra_us") else "-",
                                                      fmt_us(v.get("later_conn_us")), v.get("n_errors", 0)))
        bc = res["hardnat"].get("broker_counters")
        if bc:
            out.append("\nbroker counters at the end of each run: %s" % bc)
        out.append("")
    return "\n".join(out)


def targets_md(res):
    out = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for t in res.get("targets", []):
        v = t["value"]
        vs = "n/a" if v is None else ("%.3g" % v if isinstance(v, float) else str(v))
        met = {True: "**met**", False: "**MISSED**", None: "not measured"}[t["met"]]
        out.append("| %s | %s | %s | %s%s |" % (t["target"], vs, t["limit"], met,
                                                ("; " + t["note"]) if t.get("note") else ""))
    return "\n".join(out)


def scale_md(res):
    sc, out = res.get("scale", {}), []
    r = sc.get("registrations")
    if r:
        out.append("- registrations: %s of %s in %.1f s = **%.0f/s** overall (window %s); errors %s; "
                   "first `busy` after %s registrations (%.0f/s before it); broker VmRSS %s -> %s kB = "
                   "**%.0f B per registration**; broker fds %s"
                   % (r.get("registered"), r.get("requested"), r.get("elapsed_s", 0), r.get("rate_per_s", 0),
                      r.get("window"), r.get("errors"), r.get("first_busy_after"),
                      r.get("rate_before_first_busy") or 0, r.get("broker_rss_kb_before"),
                      r.get("broker_rss_kb_after"), r.get("rss_bytes_per_registration") or 0,
                      r.get("broker_fds_after")))
    c = sc.get("connects")
    if c:
        def s(v):
            return "%.0f/s (%.0f-%.0f)" % (v["median"], v["min"], v["max"]) if v.get("median") is not None else "n/a"
        out.append("- brokered connects (connect_request -> connect_decision, window %s, %s s per run, fresh broker per run): "
                   "reverse **%s**, direct **%s** sustained; before the first `busy`: reverse %s, direct %s"
                   % (c["window"], c["duration_s"], s(c["reverse_per_s"]), s(c["direct_per_s"]),
                      s(c.get("reverse_per_s_before_first_busy", {})), s(c.get("direct_per_s_before_first_busy", {}))))
        for raw in c.get("raw", [])[:2]:
            out.append("  - run %s %s: sent %s, by route %s, first busy after %s decisions at %.3f s, latency median %s us p99 %s us"
                       % (raw.get("run"), raw.get("kind"), raw.get("sent"), raw.get("by_route"),
                          raw.get("first_busy_after"), raw.get("first_busy_at_s") or 0,
                          raw.get("latency_us_median"), raw.get("latency_us_p99")))
    rl = sc.get("relays")
    if rl:
        out.append("- concurrent relayed connections (plain p2 -> proxy -> GCB echo server in a1): requested %s, "
                   "**open at once %s, data verified on %s** (%s B each); opening took %s ms; broker fds %s, "
                   "VmRSS %s -> %s kB (%.0f B per relay beyond kernel buffers)%s"
                   % (rl.get("requested"), rl.get("opened"), rl.get("verified"), rl.get("bytes_each"),
                      rl.get("open_ms"), rl.get("broker_fds_during"), rl.get("broker_rss_kb_before"),
                      rl.get("broker_rss_kb_during"), rl.get("rss_bytes_per_relay") or 0,
                      ("; error: %s" % rl["error"]) if rl.get("error") else ""))
    pf = res.get("portfwd", {})
    if pf.get("install_median_us") is not None:
        out.append("- portfwd (scripts/bench-portfwd %s): install latency median %.0f us (p99 %.0f); 10,000 mappings "
                   "installed in %.0f ms; kill -9 restart restored %s in %.0f ms; per-connection %.1f us with 10 "
                   "mappings vs %.1f us with 10,010 (ratio %.3f)"
                   % (" ".join(pf["args"]), pf["install_median_us"], pf["install_p99_us"], pf["install_10000_ms"],
                      pf["restored"], pf["restore_ms"], pf.get("conn_us_10", 0), pf.get("conn_us_10010", 0),
                      pf.get("conn_ratio", 0)))
    elif pf:
        out.append("- portfwd: bench-portfwd exit %s: %s" % (pf.get("exit"), pf.get("stderr", "")[-200:]))
    sh = res.get("shim", {})
    if sh.get("overhead_pct_paired") is not None:
        out.append("- shim (scripts/bench-shim %s): no shim %s ns/rtt, libgcb %s ns/rtt (median, min, max); overhead "
                   "%+.2f%% by medians, %+.2f%% by minima, **%+.2f%% median paired ratio**%s"
                   % (" ".join(sh["args"]), sh.get("no_shim_ns"), sh.get("shim_ns"), sh["overhead_pct_medians"],
                      sh["overhead_pct_minima"], sh["overhead_pct_paired"],
                      ("; callgrind: %.0f vs %.0f instructions per round trip (%+.2f%%)"
                       % (sh["callgrind_ir_no_shim"], sh["callgrind_ir_shim"], sh["callgrind_pct"]))
                      if sh.get("callgrind_pct") is not None else ""))
    return "\n".join(out)


def summary(res):
    m = res.get("meta", {})
    return "\n".join([
        "", "=" * 78,
        "libgcb benchmarks (%s run, %s, git %s, %s CPUs, load %s -> %s)" % (
            "quick" if m.get("quick") else "full", m.get("date"), m.get("git"), m.get("cpus"),
            " ".join(m.get("loadavg_start", [])), " ".join(m.get("loadavg_end", []))),
        "=" * 78, tables_md(res), "Throughput (iperf3):", throughput_md(res), "",
        "TCP hole punching:", punch_md(res), "",
        "Scale and overhead:", scale_md(res), "", "Targets:", targets_md(res),
        ("LAB ERROR: " + m["lab_error"]) if m.get("lab_error") else "", ""])


if __name__ == "__main__":
    print(summary(json.load(open(sys.argv[1]))))
