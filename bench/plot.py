"""Render benchmark CSVs as markdown tables and PNGs.

    python bench/plot.py                  # bench/results/*.csv -> docs/benchmarks.md tables + docs/img/bench-*.png
    python bench/plot.py --summary DIR    # print every table for the CSVs in DIR (a device run's $OUT)

In docs/benchmarks.md each generated table sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; only
those spans are rewritten, the prose around them is left alone. Each table keeps the latest row of every
configuration (device, shape, length, provider, ...), and names the commits and dates its rows came from.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
DOCS = HERE.parent / "docs" / "benchmarks.md"
IMG = HERE.parent / "docs" / "img"
PROVIDERS = ("triton", "flex", "sdpa", "eager", "torch")


def load(directory: Path, op: str) -> list[dict]:
    path = directory / f"{op}.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh)]


def latest(rows: list[dict], key: tuple) -> list[dict]:
    """The last row of each configuration ``key`` (CSV order is time order), in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r.get(c, "") for c in key)
        out.pop(k, None)
        out[k] = r
    return list(out.values())


def short_device(name: str) -> str:
    return "CPU (2 cores)" if name.startswith("cpu") else name.replace("NVIDIA ", "")


def provenance(rows: list[dict]) -> str:
    commits = sorted({r["commit"] for r in rows})
    dates = sorted({r["timestamp"][:10] for r in rows})
    devices = sorted({short_device(r["device"]) for r in rows})
    return f"_{', '.join(devices)}; {', '.join(dates)}; commit {', '.join(commits)}._"


def num(r: dict, k: str) -> float | None:
    try:
        return float(r[k])
    except (KeyError, TypeError, ValueError):
        return None


def fmt(r: dict, key: str, spec: str = ".3f", unit: str = "", scale: float = 1.0) -> str:
    """``r[key]`` formatted, or an empty cell when the row has no such figure."""
    v = num(r, key)
    return "" if v is None else f"{v * scale:{spec}}{unit}"


def md(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def attention_table(rows: list[dict]) -> str:
    rows = latest([r for r in rows if r.get("ms")], ("device", "shape", "seq", "batch", "dtype", "provider", "mode"))
    if not rows:
        return ""
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((short_device(r["device"]), r["shape"], int(r["seq"]), int(r["batch"]), r["dtype"]),
                         {})[r["provider"]] = r
    provs = [p for p in PROVIDERS if any(p in c for c in cases.values())]
    body = []
    for (dev, shape, seq, batch, dtype), c in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        cells = []
        for p in provs:
            r = c.get(p)
            if r is None:
                cells.append("")
            else:
                parts = [fmt(r, "ms", unit=" ms"), fmt(r, "tflops", ".3g", " TF"), fmt(r, "peak_mem_gb", ".2f", " GB")]
                cells.append(", ".join(p for p in parts if p))
        t = num(c.get("triton", {}), "ms")
        ratios = ", ".join(f"{float(c[p]['ms']) / t:.2f}× {p}" for p in provs if p != "triton" and p in c and t)
        body.append([dev, shape, seq, batch, dtype, *cells, ratios])
    head = ["device", "shape", "T", "batch", "dtype", *provs, "triton speed-up (their time ÷ ours)"]
    return md(head, body) + "\n\n" + provenance(rows)


def stats_table(rows: list[dict]) -> str:
    key = ("device", "provider", "shape", "seq", "batch", "dtype", "stats")
    rows = latest(rows, key)
    plain = {tuple(r[c] for c in key[:-1]): r for r in rows if r["stats"] == "False"}
    body = []
    used = []
    for r in rows:
        if r["stats"] != "True":
            continue
        p = plain.get(tuple(r[c] for c in key[:-1]))
        if p is None:
            continue
        used += [r, p]
        body.append([short_device(r["device"]), r["provider"], r["shape"], r["seq"], r["batch"], r["dtype"],
                     f"{float(p['ms']):.3f} ms", f"{float(r['ms']):.3f} ms",
                     f"{100 * (float(r['ms']) / float(p['ms']) - 1):+.1f}%"])
    if not body:
        return ""
    return md(["device", "provider", "shape", "T", "batch", "dtype", "plain", "with statistics", "overhead"],
              body) + "\n\n" + provenance(used)


def optimizer_table(rows: list[dict]) -> str:
    rows = latest(rows, ("device", "shape", "layers", "heads", "dtype", "provider", "mode"))
    if not rows:
        return ""
    body = [[short_device(r["device"]), r["shape"], r["layers"], r["heads"], r["dtype"], r["provider"], r["mode"],
             f"{float(r['elements']) / 1e6:.1f} M", f"{float(r['state_gb']):.3f} GB", f"{float(r['opt_ms']):.2f} ms",
             f"{float(r['opt_gb_moved']):.2f} GB", f"{float(r['opt_gbps']):.0f} GB/s", f"{float(r['copy_gbps']):.0f} GB/s",
             f"{float(r['pct_of_copy']):.0f}%"] for r in rows]
    head = ["device", "shape", "layers", "heads", "dtype", "provider", "mode", "elements stepped", "state", "time",
            "bytes moved", "achieved", "copy", "% of copy"]
    return md(head, body) + "\n\n" + provenance(rows)


def diagnose_table(rows: list[dict]) -> str:
    rows = latest(rows, ("device", "shape", "vocab", "seq", "dtype", "provider"))
    if not rows:
        return ""
    eager = {(r["device"], r["shape"], r.get("vocab"), r["seq"], r["dtype"]): r for r in rows
             if r["provider"] == "eager"}
    body = []
    for r in rows:
        e = eager.get((r["device"], r["shape"], r.get("vocab"), r["seq"], r["dtype"]))
        vs = "" if e is None or r is e else (f"time {float(r['seconds']) / float(e['seconds']):.2f}×, memory "
                                             f"{float(r['extra_mem_gb']) / max(float(e['extra_mem_gb']), 1e-9):.3f}×")
        body.append([short_device(r["device"]), r["shape"], r.get("vocab") or "250,880", r["seq"], r["dtype"],
                     r["provider"], f"{float(r['seconds']):.3f} s", f"{float(r['extra_mem_gb']):.3f} GB", vs])
    return md(["device", "shape", "vocab", "T", "dtype", "provider", "time", "peak extra memory", "against eager"],
              body) + "\n\n" + provenance(rows)


def loss_table(rows: list[dict]) -> str:
    rows = latest(rows, ("device", "provider", "batch", "seq", "hidden", "vocab", "dtype"))
    if not rows:
        return ""
    body = [[short_device(r["device"]), r["provider"], r["dtype"], r["seq"], r["hidden"], r["vocab"],
             f"{float(r['seconds']) * (1e3 if r.get('device_kind') == 'cuda' else 1):.3g} "
             f"{'ms' if r.get('device_kind') == 'cuda' else 's'}",
             fmt(r, "extra_mem_gb", unit=" GB"), fmt(r, "pred_gb", unit=" GB")] for r in rows]
    return md(["device", "provider", "dtype", "T", "hidden", "vocab", "time (loss + backward)", "peak extra",
               "predicted"], body) + "\n\n" + provenance(rows)


def train_step_table(rows: list[dict]) -> str:
    rows = latest([r for r in rows if r.get("shape") != "tiny"],
                  ("device", "method", "shape", "vocab", "dtype", "seq", "heads", "rounding", "cap_gib"))
    if not rows:
        return ""
    body = [[short_device(r["device"]), r["shape"], r["method"], r["rounding"], r["dtype"], r["seq"], r["heads"],
             r.get("cap_gib") or "", f"{r['grads_gib']} GiB", f"{r['state_gib']} GiB",
             f"{r['peak_total_gib'] or r['peak_extra_gib']} GiB", f"{r['seconds']} s"] for r in rows]
    return md(["device", "shape", "method", "weights", "dtype", "seq", "heads", "cap (GiB)", "grads", "state",
               "peak (GPU: total; CPU: above model)", "step time"], body) + "\n\n" + provenance(rows)


TABLES = {
    "attention_fwd": lambda d: attention_table(load(d, "attention_fwd")),
    "attention_fwd_bwd": lambda d: attention_table(load(d, "attention_fwd_bwd")),
    "stats_overhead": lambda d: stats_table(load(d, "stats_overhead")),
    "optimizer": lambda d: optimizer_table(load(d, "optimizer")),
    "diagnose": lambda d: diagnose_table(load(d, "diagnose")),
    "loss": lambda d: loss_table(load(d, "loss")),
    "train_step": lambda d: train_step_table(load(d, "train_step")),
}


def plot_attention(directory: Path, out: Path) -> list[Path]:
    """TFLOP/s per provider: at T = 2048 for each shape, and against T for bloom-7b1 (one PNG per pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op, title in (("attention_fwd", "forward"), ("attention_fwd_bwd", "forward + backward")):
        rows = latest([r for r in load(directory, op) if r.get("ms") and not r["device"].startswith("cpu")],
                      ("device", "shape", "seq", "batch", "dtype", "provider"))
        if not rows:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
        shapes = sorted({r["shape"] for r in rows if r["seq"] == "2048"})
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            vals = [next((float(r["tflops"]) for r in rows if r["shape"] == s and r["seq"] == "2048"
                          and r["provider"] == p), 0.0) for s in shapes]
            a.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
            pts = sorted((int(r["seq"]), float(r["tflops"])) for r in rows
                         if r["shape"] == "bloom-7b1" and r["provider"] == p)
            if pts:
                b.plot(*zip(*pts), marker="o", label=p)
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [s.replace("bloom-", "") for s in shapes])
        a.set_ylabel("TFLOP/s (causal convention)")
        a.set_title(f"{title}, T = 2048, bf16")
        a.legend(fontsize=8)
        b.set_xscale("log", base=2)
        b.set_xlabel("T")
        b.set_title(f"{title}, bloom-7b1 heads (32 × 128)")
        b.legend(fontsize=8)
        fig.suptitle(f"{short_device(rows[0]['device'])}, commit {rows[-1]['commit']}", fontsize=9)
        fig.tight_layout()
        path = out / f"bench-{op.replace('_', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def update_docs(directory: Path, docs: Path) -> list[str]:
    text = docs.read_text()
    done = []
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        if pattern.search(text):
            table = make(directory) or "_no rows yet_"
            text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
            done.append(name)
    docs.write_text(text)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", type=Path, help="print every table for the CSVs in this directory")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    if args.summary:
        for name, make in TABLES.items():
            table = make(args.summary)
            if table:
                print(f"## {name}\n\n{table}\n")
        return 0
    names = update_docs(args.results, args.docs)
    pngs = plot_attention(args.results, IMG)
    print(f"updated {args.docs}: {', '.join(names) or 'no bench markers'}; wrote {', '.join(map(str, pngs)) or 'no PNG'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
