"""PNG charts from the results dict (matplotlib, Agg backend)."""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report import CFG, ORDER, TITLES  # noqa: E402


def _err(v):
    m = v["median"]
    return [[m - v["min"]], [v["max"] - m]]


def latency(res, out, suffix):
    tb = res.get("tables", {})
    if not tb:
        return
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for col, t in enumerate(("t1", "t2", "t3")):
        for row, metric in enumerate(("conn_us", "echo_us")):
            ax = axes[row][col]
            labels, ours, ours_err, paper = [], [], [], []
            for cfg in ORDER[t]:
                for proto in ("tcp", "udp"):
                    v = tb.get(t, {}).get(cfg, {}).get(proto)
                    if not v or v[metric].get("ratio") is None:
                        continue
                    labels.append("%s\n%s" % (CFG[cfg].replace(", ", ",\n"), proto))
                    ours.append(v[metric]["ratio"])
                    ours_err.append((v[metric]["ratio"] - v[metric]["ratio_runs_min"],
                                     v[metric]["ratio_runs_max"] - v[metric]["ratio"]))
                    pr = v.get("paper_ratio", {}).get("conn" if metric == "conn_us" else "echo")
                    paper.append(pr if pr else 0)
            x = range(len(labels))
            ax.bar([i - 0.2 for i in x], ours, 0.4, label="libgcb (lab)",
                   yerr=[[e[0] for e in ours_err], [e[1] for e in ours_err]], capsize=2, color="#3072b0")
            ax.bar([i + 0.2 for i in x], paper, 0.4, label="paper (2004)", color="#c9a227")
            ax.axhline(1, color="k", lw=0.6)
            ax.set_xticks(list(x))
            ax.set_xticklabels(labels, fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("%s / regular" % ("connection time" if metric == "conn_us" else "echo time"))
            ax.set_title(TITLES[t].split(" (")[0] + (" - connect" if metric == "conn_us" else " - echo"), fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Paper Tables 1-3: ratio to regular (median of %s interleaved runs; bars = run range)"
                 % res["meta"].get("runs_latency"))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency-ratios%s.png" % suffix), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for col, t in enumerate(("t1", "t2", "t3")):
        ax = axes[col]
        labels, vals, errs = [], [], []
        for cfg in ORDER[t]:
            for proto in ("tcp", "udp"):
                v = tb.get(t, {}).get(cfg, {}).get(proto)
                if not v or v["conn_us"].get("median") is None:
                    continue
                labels.append("%s\n%s" % (CFG[cfg].replace(", ", ",\n"), proto))
                vals.append(v["conn_us"]["median"])
                errs.append(_err(v["conn_us"]))
        ax.bar(range(len(vals)), vals, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]],
               capsize=2, color="#3072b0")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("connection time, us (socket -> first server byte)")
        ax.set_title(TITLES[t], fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "connect-time%s.png" % suffix), dpi=110)
    plt.close(fig)


def throughput(res, out, suffix):
    tp = res.get("throughput", {}).get("paths", {})
    if not tp:
        return
    keys = [k for k in tp if tp[k].get("median")]
    fig, ax = plt.subplots(figsize=(12, 5))
    vals = [tp[k]["median"] for k in keys]
    errs = [[tp[k]["median"] - tp[k]["min"] for k in keys], [tp[k]["max"] - tp[k]["median"] for k in keys]]
    colors = ["#888" if ("direct" in k) else ("#c9a227" if k in ("rathole", "socat") else "#3072b0") for k in keys]
    ax.bar(range(len(keys)), vals, yerr=errs, capsize=3, color=colors)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([tp[k]["title"].replace(" ", "\n", 2) for k in keys], fontsize=6.5)
    ax.set_ylabel("Gbit/s (iperf3 receiver)")
    ax.set_title("Throughput (median of %s interleaved %s-s runs; bars = min-max); grey = baselines, gold = peers"
                 % (res["meta"].get("runs_throughput"), res["meta"].get("iperf_seconds")), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput%s.png" % suffix), dpi=110)
    plt.close(fig)


def scale(res, out, suffix):
    sc, sh = res.get("scale", {}), res.get("shim", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    c = sc.get("connects", {})
    r = sc.get("registrations", {})
    ax = axes[0]
    names, vals = [], []
    for k, lab in (("reverse_per_s", "connects/s\nreverse"), ("direct_per_s", "connects/s\ndirect")):
        if c.get(k, {}).get("median") is not None:
            names.append(lab)
            vals.append(c[k]["median"])
    if r.get("rate_per_s"):
        names.append("registrations/s\noverall")
        vals.append(r["rate_per_s"])
    if r.get("rate_before_first_busy"):
        names.append("registrations/s\nbefore 1st busy")
        vals.append(r["rate_before_first_busy"])
    ax.bar(range(len(vals)), vals, color="#3072b0")
    ax.axhline(5000, color="r", ls="--", lw=1, label="target 5,000/s (connects)")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("broker control-plane rates", fontsize=9)
    ax = axes[1]
    if r.get("rss_bytes_per_registration") is not None:
        ax.bar([0], [r["rss_bytes_per_registration"]], color="#3072b0")
        ax.axhline(4096, color="r", ls="--", lw=1, label="target 4 KiB")
        ax.set_xticks([0])
        ax.set_xticklabels(["%s registrations" % r.get("registered")], fontsize=7)
        ax.legend(fontsize=7)
    ax.set_title("broker VmRSS per registration (bytes)", fontsize=9)
    ax = axes[2]
    if sh.get("no_shim_ns"):
        ax.bar([0, 1], [sh["no_shim_ns"][0], sh["shim_ns"][0]],
               yerr=[[sh["no_shim_ns"][0] - sh["no_shim_ns"][1], sh["shim_ns"][0] - sh["shim_ns"][1]],
                     [sh["no_shim_ns"][2] - sh["no_shim_ns"][0], sh["shim_ns"][2] - sh["shim_ns"][0]]],
               capsize=3, color=["#888", "#3072b0"])
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["no shim", "libgcb.so"])
        ax.set_title("shim hot path: ns per loopback round trip (%+.2f%% paired)" % sh.get("overhead_pct_paired", 0),
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scale-shim%s.png" % suffix), dpi=110)
    plt.close(fig)


def make(res, out):
    os.makedirs(out, exist_ok=True)
    suffix = "-quick" if res.get("meta", {}).get("quick") else ""
    latency(res, out, suffix)
    throughput(res, out, suffix)
    scale(res, out, suffix)
