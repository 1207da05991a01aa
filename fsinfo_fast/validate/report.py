"""The validate table printed at the end of a run (rich)."""

from __future__ import annotations

from typing import Any

from ..profile.report import _fmt
from .runner import halfwidth95

__all__ = ["print_table"]

_SHORT = {"fsinfo_diag": "FSInfo diag", "fsinfo_logdet": "FSInfo logdet", "dfil": "dFIL",
          "dcor": "dCor", "dcor_u": "dCor² U", "knn_mi": "kNN MI", "knn_mi_pca": "kNN MI pca"}


def _pm(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    v = entry.get("mean", entry.get("value"))
    if v is None:
        return "-"
    hw = halfwidth95(entry)  # the entry's 95% interval (Student-t over few samples)
    return _fmt(v) if not hw else f"{_fmt(v)} ± {hw:.1g}"


def _r(entry: dict[str, Any] | None) -> str:
    """An agreement's r for the table: ``n/a`` where it is undefined (fewer than 3 splits)."""
    if entry is None:
        return "-"
    if entry["pearson"] is None:
        return f"n/a (n={entry['n']})" if entry.get("note") else "-"
    return _fmt(entry["pearson"])


def print_table(report: dict[str, Any], files: dict[str, str] | None = None,
                console: Any = None) -> None:
    """Per-split metrics and attack errors, the agreement table and the bound report."""
    from .._extras import require

    require("rich", "the validate tables")
    from rich.table import Table

    if console is None:
        from ..profile.report import table_console

        console = table_console()
    for m in report["models"]:
        keys = [k for k in _SHORT if k in m["splits"][0]["metrics"]]
        t = Table(title=f"{m['model']} on {m['data']} {m['size']}px (test acc "
                        f"{_fmt(m['test_accuracy'])}), sigma={m['sigma']}: metrics on "
                        f"{m['samples']} samples, inverse network / dCor / MI on "
                        f"{m['eval_samples']}", title_justify="left")
        for col in ["split", "layer", "m"] + [_SHORT[k] for k in keys] + [
                "inv MSE", "inv SSIM", "opt MSE", "opt SSIM"]:
            t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
        for s in m["splits"]:
            inv, opt = s["attacks"]["inverse_network"]["all"], s["attacks"]["optimization"]["all"]
            t.add_row(str(s["index"]), s["layer"], str(s["m"]),
                      *[_pm(s["metrics"].get(k)) for k in keys],
                      _pm(inv["mse"]), _pm(inv["ssim"]), _pm(opt["mse"]), _pm(opt["ssim"]))
        console.print(t)
        a = Table(title=f"{m['model']}: Pearson r of relative metric drop vs relative attack-MSE "
                        "rise across splits (paper's protocol)", title_justify="left")
        for col in ["metric", "r (inverse net)", "95% CI", "r (optimisation)", "paper r"]:
            a.add_column(col, justify="right", no_wrap=True)
        paper = m.get("paper_pearson") or {}
        for k in keys:
            gi = m["agreement"]["inverse_network"].get(k)
            go = m["agreement"]["optimization"].get(k)
            ci = gi["ci95"] if gi and gi["ci95"] else None
            a.add_row(_SHORT[k], _r(gi),
                      f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "-",
                      _r(go), _fmt(paper.get(k)))
        console.print(a)
        notes = {g["note"] for att in m["agreement"].values() for g in att.values()
                 if g.get("note")}
        if len(m["splits"]) < 2:
            notes.add(f"undefined with {len(m['splits'])} split point (needs 3)")
        for note in sorted(notes):
            console.print(f"{m['model']}: Pearson r {note}", soft_wrap=True)
    sw = report.get("noise_sweep")
    if sw:
        t = Table(title=f"noise sweep: {sw['model']} split {sw['split']['index']} "
                        f"({sw['split']['layer']}); FSInfo + ln sigma spread "
                        f"{_fmt(sw['fsinfo_diag_plus_ln_sigma_spread'])}", title_justify="left")
        for col in ["sigma", "FSInfo diag", "FSInfo+ln s", "inv MSE", "opt MSE", "1/dFIL",
                    "opt<1/dFIL", "opt<FSInfo bnd"]:
            t.add_column(col, justify="right", no_wrap=True)
        for p in sw["points"]:
            b = p["bounds"]["optimization"]
            t.add_row(_fmt(p["sigma"]), _pm(p["metrics"]["fsinfo_diag"]),
                      _pm(p["fsinfo_diag_plus_ln_sigma"]),
                      _pm(p["attacks"]["inverse_network"]["all"]["mse"]),
                      _pm(p["attacks"]["optimization"]["all"]["mse"]),
                      _fmt(b["dfil"]["bound_mean"]), f"{b['dfil']['fraction_below']:.2f}",
                      f"{b['fsinfo_diag']['fraction_below']:.2f}")
        console.print(t)
    opt = report["bounds"]["optimization"]
    parts = [f"{k}: {v['count_below']}/{v['n']}" for k, v in opt.items()]
    console.print("optimisation-attack samples below each bound (both bind only unbiased "
                  "attackers): " + ", ".join(parts),
                  soft_wrap=True)
    if files:
        console.print("wrote " + ", ".join(files.values()), soft_wrap=True)
