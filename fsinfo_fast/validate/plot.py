"""The validate figures (matplotlib, Agg backend; each function returns PNG bytes).

- :func:`plot_splits`: one model's metrics and attack errors against the split point;
- :func:`plot_agreement`: each metric's relative drop against the attack MSE's relative rise
  (the points whose Pearson correlation is the paper's agreement number);
- :func:`plot_noise_sweep`: FSInfo + ln sigma and the attack errors against sigma, with bounds;
- :func:`plot_reconstructions`: originals and both attacks' reconstructions per split / sigma.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .runner import halfwidth95

__all__ = ["plot_splits", "plot_agreement", "plot_noise_sweep", "plot_reconstructions"]

_LABELS = {"fsinfo_diag": "FSInfo diag", "fsinfo_logdet": "FSInfo log det", "dfil": "dFIL",
           "dcor": "dist. corr.", "dcor_u": "dist. corr.² (U)", "knn_mi": "kNN MI",
           "knn_mi_pca": "kNN MI (PCA)"}
_ATTACKS = {"inverse_network": "inverse network", "optimization": "optimisation"}


def _figure(w: float, h: float):
    from .._extras import require

    require("matplotlib", "the validate figures")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _ci(entry: dict[str, Any], key_mean: str = "mean") -> tuple[float, float]:
    return entry.get(key_mean) or float("nan"), halfwidth95(entry) or 0.0


def _clipped_yerr(values: list[float], halfwidths: list[float], lo: float | None = None,
                  hi: float | None = None, log: bool = False) -> np.ndarray:
    """Asymmetric error bars ``[2, N]`` of ``values +- halfwidths`` cut to the score's valid
    range ``[lo, hi]`` (SSIM at most 1, MSE at least 0); on a log axis, which has no 0, a bar
    that would reach 0 stops at half the panel's smallest positive bar end or value."""
    v = np.asarray(values, dtype=float)
    h = np.nan_to_num(np.asarray(halfwidths, dtype=float))
    low, high = v - h, v + h
    if lo is not None:
        low = np.maximum(low, lo)
    if hi is not None:
        high = np.minimum(high, hi)
    if log:
        pos = np.concatenate([low[np.isfinite(low) & (low > 0)], v[np.isfinite(v) & (v > 0)]])
        floor = 0.5 * pos.min() if pos.size else 1e-12
        low = np.where(low > 0, low, np.minimum(floor, v))
    return np.nan_to_num(np.stack([v - low, high - v]))


def plot_splits(model: dict[str, Any]) -> bytes:
    """Metrics (mean, 95% CI over samples) and attack MSE / SSIM at every split of one model.

    The attacks' error bars are cut to the valid range (SSIM at most 1; MSE above 0 on its
    log axis); a metric that was not computed (FSInfo log det without ``--logdet``) has no
    series and no legend entry."""
    splits = model["splits"]
    xs = np.arange(len(splits))
    labels = [f"{s['index']}\n{s['layer']}" for s in splits]
    fig = _figure(max(8.0, 1.2 * len(splits) + 4), 9.0)
    ax = fig.subplots(2, 2, sharex=True)

    def series(a, key: str, where: str, color: str, label: str, log: bool = False) -> None:
        if all(s[where].get(key) is None for s in splits):
            return  # not computed in this run: no empty legend entry
        vals, errs = [], []
        for s in splits:
            e = s[where].get(key)
            if e is None:
                vals.append(np.nan)
                errs.append(0.0)
                continue
            v = e.get("mean", e.get("value"))
            vals.append(np.nan if v is None else v)
            errs.append(halfwidth95(e) or 0.0)
        a.errorbar(xs, vals, yerr=errs, marker="o", capsize=3, color=color, label=label)
        if log:
            a.set_yscale("log")

    series(ax[0, 0], "fsinfo_diag", "metrics", "tab:blue", "FSInfo diag")
    series(ax[0, 0], "fsinfo_logdet", "metrics", "tab:purple", "FSInfo log det")
    ax[0, 0].set_ylabel("FSInfo (nats/dim)")
    series(ax[0, 1], "dfil", "metrics", "tab:green", "dFIL", log=True)
    ax[0, 1].set_ylabel("dFIL (1/dim)")
    tw = ax[0, 1].twinx()
    series(tw, "dcor", "metrics", "tab:orange", "dist. corr. (V)")
    series(tw, "dcor_u", "metrics", "tab:olive", "dist. corr.² (U, bias-corrected)")
    series(tw, "knn_mi", "metrics", "tab:red", "kNN MI (nats)")
    series(tw, "knn_mi_pca", "metrics", "tab:brown", "kNN MI PCA (nats)")
    tw.set_ylabel("dCor / kNN MI")
    h1, l1 = ax[0, 1].get_legend_handles_labels()
    h2, l2 = tw.get_legend_handles_labels()
    ax[0, 1].legend(h1 + h2, l1 + l2, fontsize=8)
    for attack, color in (("inverse_network", "tab:blue"), ("optimization", "tab:red")):
        for panel, score in ((ax[1, 0], "mse"), (ax[1, 1], "ssim")):
            v, e = [], []
            for s in splits:
                m, h = _ci(s["attacks"][attack]["all"][score])
                v.append(m)
                e.append(h)
            yerr = (_clipped_yerr(v, e, lo=0.0, log=True) if score == "mse"
                    else _clipped_yerr(v, e, lo=-1.0, hi=1.0))
            panel.errorbar(xs, v, yerr=yerr, marker="o", capsize=3, color=color,
                           label=_ATTACKS[attack])
    ax[1, 0].set_yscale("log")
    ax[1, 0].set_ylabel("attack MSE per pixel")
    ax[1, 1].set_ylabel("attack SSIM")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=8) if a is not ax[0, 1] else None
    for a in ax[1]:
        a.set_xticks(xs, labels, fontsize=8)
        a.set_xlabel("split point")
    fig.suptitle(f"{model['model']} on {model['data']} {model['size']}px: leakage metrics and "
                 f"attack error by split (sigma={model['sigma']}, mean ± 95% CI)")
    return _png(fig)


def plot_agreement(report: dict[str, Any]) -> bytes:
    """Relative metric drop vs relative attack-MSE rise, one panel per (model, attack)."""
    models = report["models"]
    attacks = list(_ATTACKS)
    fig = _figure(5.5 * len(attacks), 4.5 * len(models))
    axes = np.atleast_2d(fig.subplots(len(models), len(attacks), squeeze=False))
    colors = dict(zip(_LABELS, ["tab:blue", "tab:purple", "tab:green", "tab:orange", "tab:olive",
                                "tab:red", "tab:brown"], strict=True))
    for i, m in enumerate(models):
        for j, attack in enumerate(attacks):
            a = axes[i, j]
            for key, ag in m["agreement"].get(attack, {}).items():
                x = np.array([np.nan if v is None else v for v in ag["attack_rise"]])
                y = np.array([np.nan if v is None else v for v in ag["metric_drop"]])
                r = ag["pearson"]
                a.plot(x, y, marker="o", color=colors.get(key), alpha=0.8,
                       label=f"{_LABELS.get(key, key)}: r={r:.3f}" if r is not None
                       else f"{_LABELS.get(key, key)}: r=n/a")
            a.set_xlabel(f"{_ATTACKS[attack]} MSE rise (MSE_i - MSE_0)/MSE_i")
            a.set_ylabel("metric drop (m_0 - m_i)/m_0")
            a.set_title(f"{m['model']}: agreement with the {_ATTACKS[attack]} attack")
            a.set_yscale("symlog", linthresh=1.0)
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    return _png(fig)


def plot_noise_sweep(sweep: dict[str, Any], examples: dict[str, Any] | None = None) -> bytes:
    """FSInfo + ln sigma (should be flat) and attack MSE with the bounds, against sigma."""
    pts = sweep["points"]
    s = np.array([p["sigma"] for p in pts])
    fig = _figure(12.0, 4.8)
    a0, a1 = fig.subplots(1, 2)
    v, e = zip(*[_ci(p["fsinfo_diag_plus_ln_sigma"]) for p in pts], strict=True)
    a0.errorbar(s, v, yerr=e, marker="o", capsize=3, label="FSInfo diag + ln sigma")
    fv, fe = zip(*[_ci(p["metrics"]["fsinfo_diag"]) for p in pts], strict=True)
    a0.errorbar(s, fv, yerr=fe, marker="s", capsize=3, label="FSInfo diag")
    a0.set_xscale("log")
    a0.set_xlabel("sigma")
    a0.set_ylabel("nats/dim")
    a0.grid(alpha=0.3)
    a0.legend(fontsize=8)
    for attack, color in (("inverse_network", "tab:blue"), ("optimization", "tab:red")):
        mv, me = zip(*[_ci(p["attacks"][attack]["all"]["mse"]) for p in pts], strict=True)
        a1.errorbar(s, mv, yerr=me, marker="o", capsize=3, color=color,
                    label=f"{_ATTACKS[attack]} MSE")
    a1.plot(s, [p["bounds"]["optimization"]["dfil"]["bound_mean"] for p in pts], "--",
            color="tab:green", label="1/dFIL (unbiased only)")
    a1.plot(s, [p["bounds"]["optimization"]["fsinfo_diag"]["bound_mean"] for p in pts], ":",
            color="tab:purple", label="FSInfo bound exp(-2F)/(2 pi e)")
    if sweep.get("variance_of_data") is not None:
        a1.axhline(sweep["variance_of_data"], color="gray", linewidth=1,
                   label="data variance")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("sigma")
    a1.set_ylabel("MSE per pixel")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    sp = sweep["split"]
    fig.suptitle(f"noise sweep: {sweep['model']} split {sp['index']} ({sp['layer']})")
    return _png(fig)


def _tile(img) -> np.ndarray:
    a = img.detach().float().cpu().numpy()
    if a.ndim == 3:
        a = np.transpose(a, (1, 2, 0))
        if a.shape[2] == 1:
            a = a[..., 0]
    return np.clip(a, 0.0, 1.0)


def plot_reconstructions(title: str, examples: dict[str, Any]) -> bytes:
    """Originals (top row) and each row's reconstructions by both attacks."""
    rows = examples["rows"]
    x = examples["x"]
    n = min([len(x), 6] + [len(r[a]) for r in rows for a in ("inverse_network", "optimization")])
    nrows = 1 + 2 * len(rows)
    fig = _figure(1.3 * n + 1.8, 1.25 * nrows + 0.6)
    axes = np.atleast_2d(fig.subplots(nrows, n, squeeze=False))
    for j in range(n):
        axes[0, j].imshow(_tile(x[j]), cmap="gray")
    axes[0, 0].set_ylabel("original", fontsize=7)
    for i, row in enumerate(rows):
        for k, attack in enumerate(("inverse_network", "optimization")):
            r = 1 + 2 * i + k
            for j in range(n):
                axes[r, j].imshow(_tile(row[attack][j]), cmap="gray")
            axes[r, 0].set_ylabel(f"{row['label']}\n{_ATTACKS[attack]}", fontsize=7)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{title}: reconstructions", fontsize=10)
    return _png(fig)
