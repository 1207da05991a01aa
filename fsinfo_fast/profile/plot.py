"""``profile.png``: leakage against split point, with intervals (matplotlib, Agg backend).

Four panels sharing the split axis:

1. FSInfo (diag, and log det where finite): the mean over samples with its 95% estimator
   interval as error bars, and the spread over samples (min to max) as a band (a thick bar
   where only one split has a point);
2. dFIL (log scale), the same way;
3. the worst-case error bounds (log scale): ``1/dFIL`` and ``exp(-2 FSInfo)/(2 pi e)`` (both
   proven for unbiased attackers), with their intervals;
4. the FSInfoGuard noise scale ``sigma*`` (log scale): the data-set value (largest over samples)
   with its interval, and the mean.

A point drawn **hollow** comes from a split where some sample's estimate did not reach its
tolerance (the probe cap stopped it) or is only an upper bound (``n_unconverged`` / ``n_bound``
in the summary); the bounds and ``sigma*`` are hollow where the metric they come from is.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["plot_profile", "profile_figure"]


def _err(mean: float, lo: float | None, hi: float | None) -> tuple[float, float]:
    return (max(0.0, mean - lo) if lo is not None else 0.0,
            max(0.0, hi - mean) if hi is not None else 0.0)


def _flagged(st: dict[str, Any] | None) -> bool:
    return bool(st) and bool(st.get("n_unconverged") or st.get("n_convergence_unknown")
                             or st.get("n_bound"))


def plot_profile(summary: dict[str, Any], dpi: int = 110) -> bytes:
    """Render the profile summary to PNG bytes (no file is touched, no display needed)."""
    fig = profile_figure(summary, dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def profile_figure(summary: dict[str, Any], dpi: int = 110):
    """The ``matplotlib.figure.Figure`` of :func:`plot_profile` (four panels, see the module
    docstring; flagged points hollow)."""
    from .._extras import require

    require("matplotlib", "the profile plot (--no-plot skips it)")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    splits = summary["splits"]
    xs = list(range(len(splits)))
    # (a module path is its own layer name: once)
    labels = [s["name"] if s["index"] is None and s["layer"] == s["name"]
              else f"{s['index'] if s['index'] is not None else s['name']}\n{s['layer']}"
              for s in splits]
    fig = Figure(figsize=(max(8.0, 1.1 * len(splits) + 3), 10.5), dpi=dpi)
    axes = fig.subplots(4, 1, sharex=True)
    st = summary["settings"]
    model = str(st["model"]).split(":")[-1]
    data = str(st["data"]) if len(str(st["data"])) <= 40 else "..." + str(st["data"])[-37:]
    fig.suptitle(f"{model} on {data}: leakage by split point\n"
                 f"(sigma={st['sigma']}, {splits[0]['n'] if splits else 0} samples, "
                 f"{st['estimator']} estimator)")

    def hollow(ax, px: list, py: list, flags: list[bool], color: str, marker: str) -> None:
        """Redraw the flagged points with a white face (hollow)."""
        fx = [x for x, f in zip(px, flags, strict=True) if f]
        fy = [y for y, f in zip(py, flags, strict=True) if f]
        if fx:
            ax.plot(fx, fy, linestyle="none", marker=marker, markersize=9, color=color,
                    markerfacecolor="white", markeredgewidth=1.5, zorder=5,
                    label="hollow: not converged or upper bound only")

    def series(ax, key: str, label: str, color: str, marker: str, log: bool = False) -> None:
        # a mean that is exactly -inf (some sample's J^T J singular) has no point: mark it
        low = [x for x, s in zip(xs, splits, strict=True) if (s.get(key) or {}).get(
            "mean_is_neg_inf")]
        for x in low:
            ax.annotate("-∞", (x, 0.03), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", color=color, fontsize=12)
        if low:
            ax.plot([], [], linestyle="none", label=f"-∞: {label} mean is -inf (a singular "
                    "J^T J)")
        pts = [(x, s[key]) for x, s in zip(xs, splits, strict=True)
               if s.get(key) and s[key]["mean"] is not None]
        if not pts:
            return
        px = [p[0] for p in pts]
        mean = [p[1]["mean"] for p in pts]
        err = list(zip(*[_err(p[1]["mean"], *p[1]["mean_ci95"]) for p in pts], strict=True))
        lo = [p[1]["min"] for p in pts]
        hi = [p[1]["max"] for p in pts]
        if len(px) > 1:
            ax.fill_between(px, lo, hi, color=color, alpha=0.15, linewidth=0,
                            label=f"{label}: sample range")
        else:  # a band over one x has no width: a thick bar instead
            ax.vlines(px, lo, hi, color=color, alpha=0.25, linewidth=12,
                      label=f"{label}: sample range")
        ax.errorbar(px, mean, yerr=err, color=color, marker=marker, capsize=4,
                    label=f"{label}: mean ± 95% CI")
        hollow(ax, px, mean, [_flagged(p[1]) for p in pts], color, marker)
        if log:
            ax.set_yscale("log")

    series(axes[0], "fsinfo_diag", "FSInfo diag", "tab:blue", "o")
    series(axes[0], "fsinfo_logdet", "FSInfo log det", "tab:purple", "s")
    axes[0].axhline(st["target"], color="tab:red", linestyle=":", linewidth=1,
                    label=f"target {st['target']}")
    axes[0].set_ylabel("FSInfo (nats/dim)")
    series(axes[1], "dfil", "dFIL", "tab:green", "o", log=True)
    axes[1].set_ylabel("dFIL")

    def extreme(ax, key: str, label: str, color: str, marker: str, source: str) -> None:
        pts = [(x, s[key], s.get(source)) for x, s in zip(xs, splits, strict=True)
               if s.get(key) and s[key]["value"] is not None]  # null: unreachable sigma*
        if not pts:
            return
        px = [p[0] for p in pts]
        v = [p[1]["value"] for p in pts]
        err = list(zip(*[_err(p[1]["value"], *p[1]["interval"]) for p in pts], strict=True))
        ax.errorbar(px, v, yerr=err, color=color, marker=marker, capsize=4, label=label)
        hollow(ax, px, v, [_flagged(p[2]) for p in pts], color, marker)

    extreme(axes[2], "dfil_bound_worst", "1/dFIL", "tab:green", "o", "dfil")
    extreme(axes[2], "fsinfo_diag_bound_worst", "exp(-2 FSInfo diag)/(2 pi e)", "tab:blue", "s",
            "fsinfo_diag")
    extreme(axes[2], "fsinfo_logdet_bound_worst", "exp(-2 FSInfo log det)/(2 pi e)",
            "tab:purple", "^",
            "fsinfo_logdet")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("MSE bound, unbiased attackers\n(least private sample)")
    extreme(axes[3], "sigma_star", "sigma* (max over samples)", "tab:red", "o", "fsinfo_diag")
    # an unreachable target (some sample's sigma* is infinite) has no point: mark it
    gone = [x for x, s in zip(xs, splits, strict=True)
            if (s.get("sigma_star") or {}).get("n_unreachable")]
    for x in gone:
        axes[3].annotate("∞", (x, 0.97), xycoords=("data", "axes fraction"), ha="center",
                         va="top", color="tab:red", fontsize=14)
    if gone:
        axes[3].plot([], [], linestyle="none", label="∞: no finite noise reaches the target")
    pts = [(x, s["sigma_star"]["mean"])
           for x, s in zip(xs, splits, strict=True)
           if s.get("sigma_star") and s["sigma_star"]["mean"] is not None]
    if pts:
        axes[3].plot([p[0] for p in pts], [p[1] for p in pts], color="tab:orange", marker=".",
                     linestyle="--", label="sigma* (mean)")
    axes[3].set_yscale("log")
    axes[3].set_ylabel(f"FSInfoGuard sigma*\n(target {st['target']})")
    axes[3].set_xticks(xs, labels)
    axes[3].set_xlabel("split point (paper index / layer)" if any(
        s["index"] is not None for s in splits) else "split point (module path)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        handles, labels_ = ax.get_legend_handles_labels()
        if handles:
            keep = {}  # one legend entry per label (the hollow marker can repeat)
            for h, lab in zip(handles, labels_, strict=True):
                keep.setdefault(lab, h)
            ax.legend(list(keep.values()), list(keep), fontsize=7, loc="best")
    fig.tight_layout()
    return fig
