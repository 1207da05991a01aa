"""``fsinfo-fast profile`` reports whether each value converged (and whether it is only an upper
bound) in the records, the JSON, both CSV files, the table and the plot, and lets the metrics'
warnings reach the user, once per split rather than once per batch."""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import warnings

import torch
from rich.console import Console

from fsinfo_fast.linearization import Linearization
from fsinfo_fast.profile import ProfileConfig, run_profile
from fsinfo_fast.profile.plot import profile_figure
from fsinfo_fast.profile.report import print_table


def _cfg(ckpt, out, **kw) -> ProfileConfig:
    base = {"model": "vgg5", "checkpoint": str(ckpt), "size": 8, "max_samples": 4,
            "batch_size": 2, "splits": "1,5", "out": str(out), "plot": False,
            "progress": False, "table": False}
    base.update(kw)
    return ProfileConfig(**base)


def _forcing(fn, **forced):
    """A :class:`Linearization` method with some keywords forced (the profile's calls go
    through the Linearization's methods)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        kw.update(forced)
        if kw.get("variant", "diag") != "logdet":  # the log det's option only
            kw.pop("lanczos_order", None)
        return fn(self, *args, **kw)

    return wrapper


def _table(summary) -> str:
    buf = io.StringIO()
    print_table(summary, console=Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


def _hollow_points(summary) -> int:
    fig = profile_figure(summary)
    return sum(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()
               if line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0)))


def _csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_probe_cap_is_reported_everywhere(ckpt, tmp_path, monkeypatch):
    # a tolerance that 12 probes cannot reach: the real estimators stop at the cap unconverged
    for name in ("fsinfo", "fsinfo_sigma"):
        monkeypatch.setattr(Linearization, name,
                            _forcing(getattr(Linearization, name), max_probes=12,
                                     lanczos_order=8))
    monkeypatch.setattr(Linearization, "dfil", _forcing(Linearization.dfil, max_probes=12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what reaches the user is tested below
        out = run_profile(_cfg(ckpt, tmp_path / "r", estimator="randomized", atol=1e-4,
                               rtol=1e-4, variant="both", prior_var=0.1,
                               max_samples=2, splits="5"))
    recs = out.summary["samples"]
    assert len(recs) == 2
    for key in ("fsinfo_diag", "fsinfo_logdet", "dfil"):
        assert [r[f"{key}_converged"] for r in recs] == [False] * 2, key
        assert [r[f"{key}_is_bound"] for r in recs] == [False] * 2, key
        for s in out.summary["splits"]:
            st = s[key]
            assert st["n_unconverged"] == 2 and st["unconverged_samples"] == [0, 1]
            assert st["worst"]["converged"] is False and st["n_bound"] == 0
    rows = _csv(tmp_path / "r" / "samples.csv")
    assert {r["fsinfo_diag_converged"] for r in rows} == {"False"}
    assert {r["dfil_converged"] for r in rows} == {"False"}
    summ = _csv(tmp_path / "r" / "summary.csv")
    assert [r["fsinfo_diag_n_unconverged"] for r in summ] == ["2"]
    assert [r["fsinfo_logdet_n_unconverged"] for r in summ] == ["2"]
    assert [r["dfil_n_unconverged"] for r in summ] == ["2"]
    table = _table(out.summary)
    (row,) = [line for line in table.splitlines() if line.startswith("│")]
    assert row.count(" *") == 6  # 3 metrics, 1/dFIL, FSInfo bnd and sigma*
    assert "not converged: 6 sample value(s)" in table
    # the means of FSInfo diag, log det and dFIL, 1/dFIL, both FSInfo bounds, sigma*
    assert _hollow_points(out.summary) == 7


def test_converged_run_has_no_marks(ckpt, tmp_path):
    out = run_profile(_cfg(ckpt, tmp_path / "r", estimator="exact"))
    recs = out.summary["samples"]
    assert all(r["fsinfo_diag_converged"] is True and r["dfil_converged"] is True for r in recs)
    assert all(s["fsinfo_diag"]["n_unconverged"] == 0 for s in out.summary["splits"])
    table = _table(out.summary)
    assert " *" not in table and "not converged" not in table and "≤" not in table
    assert _hollow_points(out.summary) == 0


def test_upper_bound_values_are_one_sided(ckpt, tmp_path, monkeypatch):
    real = Linearization.fsinfo

    @functools.wraps(real)
    def first_is_bound(self, *args, **kw):
        kw.update(num_probes=4)  # cheap: the numbers do not matter here
        if kw.get("variant") == "logdet":
            kw.update(lanczos_order=8)
        r = real(self, *args, **kw)
        if r.metric != "fsinfo_logdet":
            return r
        bound = torch.zeros(len(r), dtype=torch.bool)
        bound[0] = True  # as if sample 0's spectrum had reached the working precision
        return dataclasses.replace(r, bound=bound)

    # randomized: the log det at sigma and at sigma = 1 (for sigma*) both go through fsinfo
    monkeypatch.setattr(Linearization, "fsinfo", first_is_bound)
    out = run_profile(_cfg(ckpt, tmp_path / "r", variant="both", splits="1",
                           estimator="randomized", rtol=0.2))
    (s,) = out.summary["splits"]
    st = s["fsinfo_logdet"]
    assert st["n_bound"] == 2 and st["bound_samples"] == [0, 2]  # first of each batch
    assert st["mean_is_bound"] is True and st["mean_ci95"][0] is None
    recs = {r["sample"]: r for r in out.summary["samples"]}
    assert recs[0]["fsinfo_logdet_is_bound"] is True and recs[1]["fsinfo_logdet_is_bound"] is False
    assert recs[0]["sigma_star_logdet_low"] == 0.0 and recs[0]["fsinfo_logdet_bound_high"] is None
    assert recs[1]["sigma_star_logdet_low"] > 0 and recs[1]["fsinfo_logdet_bound_high"] > 0
    assert "≤ " in _table(out.summary) and "upper bound only: 2 sample value(s)" in _table(
        out.summary)


def test_warnings_reach_the_user_once_per_split(ckpt, tmp_path, monkeypatch):
    real = Linearization.fsinfo

    @functools.wraps(real)
    def noisy(self, *args, **kw):
        warnings.warn(f"the tolerance was not met within 8 probes for {self.batch} sample(s) "
                      f"(half-width {0.1 + self.batch / 100:.3f})", RuntimeWarning, stacklevel=2)
        return real(self, *args, **kw)

    monkeypatch.setattr(Linearization, "fsinfo", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 4 samples in batches of 2: two batches per split (the exact profile calls
        # Linearization.fsinfo for the log det at least), each warning once per split
        run_profile(_cfg(ckpt, tmp_path / "r", estimator="exact", variant="both",
                         splits="1,2"))
    mine = [str(w.message) for w in caught if "tolerance was not met" in str(w.message)]
    assert len(mine) == 2, mine
    assert {m.split(":")[0] for m in mine} == {"split features.1", "split features.2"}
    assert all(issubclass(w.category, RuntimeWarning) for w in caught
               if "tolerance was not met" in str(w.message))
