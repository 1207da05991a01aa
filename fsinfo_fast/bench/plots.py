"""Plots of a results file (separate from measuring): speed vs accuracy, and scaling.

``python -m fsinfo_fast.bench.plots RESULTS.json [--out DIR]`` (or ``fsinfo-fast bench --plot
RESULTS.json``) writes

- ``<stem>_speed_accuracy.png``: one panel per case, time per image against the 95% error of
  every provider (log-log; exact providers sit at their float32 rounding error, the dashed line
  is the accuracy target);
- ``<stem>_scaling.png``: time per image against input size, batch size and probe count for the
  sweep's providers, plus the probe efficiency per backend.

Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .schema import load_results

__all__ = ["plot_speed_accuracy", "plot_scaling", "plot_all", "main"]

_MARKERS = {"exact": "s", "equal_accuracy": "o", "equal_probes": "^", "adaptive": "*"}


def _plt():
    from .._extras import require

    require("matplotlib", "the benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def plot_speed_accuracy(doc: dict[str, Any], path: str | Path) -> Path | None:
    """Time per image vs error, one panel per case (``None``, no file, without timed rows)."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for r in doc["results"]:
        if r["status"] in ("ok", "target_not_reached") and r["time_per_image_s"]:
            cases.setdefault(r["case"], []).append(r)
    if not cases:
        return None
    plt = _plt()
    n = max(1, len(cases))
    cols = min(2, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.6 * rows_n), squeeze=False)
    colors = _colors([r["provider"] for rs in cases.values() for r in rs])
    for ax, (case, rows) in zip(axes.flat, cases.items(), strict=False):
        target = next((r["accuracy"]["target"] for r in rows if r.get("accuracy")), None)
        floor = (target or 1e-2) * 1e-4
        for r in rows:
            acc = r.get("accuracy") or {}
            e = acc.get("err95")
            x = max(e, floor) if isinstance(e, (int, float)) else floor
            ax.scatter(x, r["time_per_image_s"], color=colors[r["provider"]],
                       marker=_MARKERS.get(r["mode"], "o"), s=70, edgecolor="k", zorder=3,
                       alpha=0.6 if e is None else 1.0)
            label = r["provider"] + (f" K={r['num_probes']}" if r["num_probes"] else "")
            ax.annotate(label, (x, r["time_per_image_s"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        if target:
            ax.axvline(target, ls="--", color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        units = (rows[0].get("accuracy") or {}).get("units", "")
        ax.set_xlabel(f"95% error ({units}; exact providers at their rounding error, "
                      f"floored at {floor:.0e})", fontsize=8)
        ax.set_ylabel("seconds per image")
        ax.set_title(case, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=mode)
               for mode, m in _MARKERS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"speed vs accuracy ({_device(doc)})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _device(doc: dict[str, Any]) -> str:
    hw = doc["environment"]["hardware"]
    gpu = hw.get("gpu") or {}
    th = doc["environment"]["threads"]["torch_num_threads"]
    return gpu.get("name") or f"{hw.get('cpu_model')}, {th} thread(s)"


def plot_scaling(doc: dict[str, Any], path: str | Path) -> Path | None:
    """Time per image along each sweep axis, and probe efficiency per backend."""
    sweep = [r for r in doc.get("sweep", []) if r["status"] == "ok"]
    eff = [e for e in doc.get("probe_efficiency", []) if e["status"] == "ok"]
    if not sweep and not eff:
        return None
    plt = _plt()
    axes_names = [("size", "input side (pixels)"), ("batch", "batch size"),
                  ("probes", "probes K")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    colors = _colors([r["provider"] for r in sweep] + [e["backend"] for e in eff])
    key = {"size": "size", "batch": "batch", "probes": "num_probes"}
    for ax, (axis, label) in zip(axes, axes_names, strict=False):
        rows = [r for r in sweep if r["axis"] == axis]
        for prov in sorted({r["provider"] for r in rows}):
            pts = sorted((r[key[axis]], r["time_per_image_s"]) for r in rows
                         if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prov,
                    color=colors[prov])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per image")
        if rows:
            r0 = rows[0]
            sw = doc["config"].get("sweep") or {}
            fixed = {"size": f"B={sw.get('base_batch')}, K={sw.get('base_probes')}",
                     "batch": f"{sw.get('base_size')}px, K={sw.get('base_probes')}",
                     "probes": f"{sw.get('base_size')}px, B={sw.get('base_batch')}"}[axis]
            ax.set_title(f"{r0['task']} {r0['model']} s{r0['split']} ({fixed})", fontsize=9)
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[3]
    for be in sorted({e["backend"] for e in eff}):
        for kind, ls in (("jvp", "o-"), ("vjp", "s--")):
            pts = sorted((e["num_probes"], e[f"{kind}_efficiency"]) for e in eff
                         if e["backend"] == be and e[f"{kind}_efficiency"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=colors[be],
                        label=f"{be} {kind}")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("probes K")
    ax.set_ylabel("time(K products) / time(forward at batch K)")
    ax.set_title("probe efficiency (floor about 1)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"scaling ({_device(doc)})", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_all(doc: dict[str, Any], out_dir: str | Path, stem: str) -> list[Path]:
    """Both figures into ``out_dir`` as ``<stem>_speed_accuracy.png`` and ``<stem>_scaling.png``
    (each only where the results have something to draw)."""
    out = Path(out_dir)
    paths = [plot_speed_accuracy(doc, out / f"{stem}_speed_accuracy.png"),
             plot_scaling(doc, out / f"{stem}_scaling.png")]
    return [p for p in paths if p is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m fsinfo_fast.bench.plots RESULTS.json [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m fsinfo_fast.bench.plots",
                                 description="plot a benchmark results file (PNG)")
    ap.add_argument("results", help="results JSON written by fsinfo-fast bench")
    ap.add_argument("--out", default=None, help="directory for the PNGs (default: beside it)")
    args = ap.parse_args(argv)
    src = Path(args.results)
    for p in plot_all(load_results(src), args.out or src.parent, src.stem):
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
