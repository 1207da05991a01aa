"""Fuzzer round 7, ``fsinfo-fast profile``: an exact -inf log det in the split mean, two runs on
one run directory, the one-split plot."""

from __future__ import annotations

import csv
import io
import json
import math
import sys

import numpy as np
import pytest
from rich.console import Console

from fsinfo_fast.profile import ProfileConfig, run_profile
from fsinfo_fast.profile.report import print_table
from fsinfo_fast.profile.store import RecordStore

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# m = 390 >= d = 192: J^T J is singular, exactly, for the samples whose gate is off (a column of
# J exactly 0; a ReLU's dead units made it singular only to float64's resolution, which the
# oracle reports as an upper bound, not -inf)
SINGULAR_MODULE = (
    "import torch\n"
    "class Gate(torch.nn.Module):\n"
    "    def forward(self, x):\n"
    "        x = x.flatten(1)\n"
    "        return x * (x[:, :1] > x.mean(dim=1, keepdim=True)).to(x.dtype)\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(Gate(), torch.nn.Linear(192, 390),\n"
    "                               torch.nn.Tanh(), torch.nn.Linear(390, 10)).eval()\n")


def _images(folder, n: int = 6) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png")


@pytest.fixture
def singular_setup(tmp_path, monkeypatch):
    (tmp_path / "r7_singular_mod.py").write_text(SINGULAR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("r7_singular_mod", None)
    _images(tmp_path / "imgs")
    return tmp_path


def _cfg(tmp_path, **kw) -> ProfileConfig:
    base = dict(model="r7_singular_mod:build", data=str(tmp_path / "imgs"), splits="2",
                max_samples=None, variant="both", plot=False, progress=False, table=False,
                out=str(tmp_path / "run"))
    base.update(kw)
    return ProfileConfig(**base)


def test_exact_neg_inf_logdet_makes_the_split_mean_neg_inf(singular_setup):
    tmp = singular_setup
    with pytest.warns(UserWarning):
        out = run_profile(_cfg(tmp))
    recs = [r for r in out.summary["samples"]]
    gone = [r for r in recs if r["fsinfo_logdet_status"].startswith("-inf")]
    assert 0 < len(gone) < len(recs)  # the case: some samples -inf, some finite
    assert all(r["fsinfo_logdet"] is None for r in gone)
    finite = [r["fsinfo_logdet"] for r in recs if r["fsinfo_logdet"] is not None]

    split = json.loads((tmp / "run" / "profile.json").read_text())["splits"][0]
    st = split["fsinfo_logdet"]
    assert st["mean"] is None and st["mean_is_neg_inf"] is True  # JSON: null + flag
    assert st["mean_ci95"] == [None, None]
    assert st["n_neg_inf"] == len(gone) and st["neg_inf_samples"] == [r["sample"] for r in gone]
    assert st["n"] == len(finite) and st["finite_mean"] == pytest.approx(
        sum(finite) / len(finite))

    row = next(csv.DictReader(open(tmp / "run" / "summary.csv")))
    assert float(row["fsinfo_logdet_mean"]) == -math.inf
    assert int(row["fsinfo_logdet_n_neg_inf"]) == len(gone)
    assert int(row["fsinfo_logdet_n_finite"]) == len(finite)
    rows = list(csv.DictReader(open(tmp / "run" / "samples.csv")))
    assert sorted(float(r["fsinfo_logdet"]) for r in rows)[:len(gone)] == [-math.inf] * len(gone)

    buf = io.StringIO()
    print_table(out.summary, console=Console(file=buf, width=240))
    text = buf.getvalue()
    assert "-inf" in text and f"{len(gone)} sample value(s) are exactly -inf" in text

    # resume: the records round-trip (null + status), the summary is the same
    store = RecordStore(tmp / "run" / "records.jsonl")
    kept = list(store.read().values())
    assert sorted(r["sample"] for r in kept if r["fsinfo_logdet"] is None) == \
        [r["sample"] for r in gone]
    lines = (tmp / "run" / "records.jsonl").read_text().splitlines()
    (tmp / "run" / "records.jsonl").write_text("\n".join(lines[:1]) + "\n")
    with pytest.warns(UserWarning):
        again = run_profile(_cfg(tmp, resume=True))
    assert again.computed == len(recs) - 1
    assert again.summary["splits"][0]["fsinfo_logdet"] == out.summary["splits"][0][
        "fsinfo_logdet"]


def test_all_neg_inf_logdet_split_reports_neg_inf(singular_setup):
    """m < d without a prior: every sample's log det is -inf (the plan says so): the same
    convention (mean null + mean_is_neg_inf, -inf in summary.csv)."""
    tmp = singular_setup
    out = run_profile(_cfg(tmp, splits="3"))  # the last Linear: m = 10 < d = 192
    st = out.summary["splits"][0]["fsinfo_logdet"]
    assert st["mean"] is None and st["mean_is_neg_inf"] and st["n_neg_inf"] == 6 and st["n"] == 0
    row = next(csv.DictReader(open(tmp / "run" / "summary.csv")))
    assert row["fsinfo_logdet_mean"] == "-inf" and row["fsinfo_logdet_n_neg_inf"] == "6"


# ------------------------------------------------------------------------------------------------
# one run at a time on a run directory

HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "os.ftruncate(fd, 0); os.write(fd, f'pid {os.getpid()} on test'.encode())\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n")


def _finished_diag_run(tmp):
    out = run_profile(_cfg(tmp, variant="diag", batch_size=2))
    lines = (tmp / "run" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6
    (tmp / "run" / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")  # interrupted
    return out


def test_second_run_on_a_busy_run_directory_is_refused(singular_setup):
    """Two ``--resume`` of one directory at once both computed every missing batch (duplicate
    lines in records.jsonl): a run holds a lock on the directory; another is refused, naming
    the directory and the process holding it."""
    import subprocess

    from fsinfo_fast.errors import FSInfoError

    tmp = singular_setup
    _finished_diag_run(tmp)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp / "run" / ".profile.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FSInfoError, match="in use by another profile run") as err:
            run_profile(_cfg(tmp, variant="diag", batch_size=2, resume=True))
        assert str(tmp / "run") in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert "\n" not in str(err.value)
        # a new run there is refused the same way (not only as "not empty")
        with pytest.raises(FSInfoError, match="in use by another profile run"):
            run_profile(_cfg(tmp, variant="diag", batch_size=2))
        assert len((tmp / "run" / "records.jsonl").read_text().splitlines()) == 2
    finally:
        holder.kill()
        holder.wait()
    out = run_profile(_cfg(tmp, variant="diag", batch_size=2, resume=True))  # free again
    assert out.computed == 4
    assert len((tmp / "run" / "records.jsonl").read_text().splitlines()) == 6


def test_run_lock_is_released_on_interrupt_and_error(singular_setup, monkeypatch):
    import fcntl
    import os

    from fsinfo_fast.profile import runner

    tmp = singular_setup
    _finished_diag_run(tmp)
    lock = tmp / "run" / ".profile.lock"

    def stop(*a, **k):
        assert lock.is_file()
        fd = os.open(lock, os.O_RDWR)
        try:  # held by the run while it computes
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        raise KeyboardInterrupt

    compute_batch = runner.compute_batch
    monkeypatch.setattr(runner, "compute_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_profile(_cfg(tmp, variant="diag", batch_size=2, resume=True))
    fd = os.open(lock, os.O_RDWR)
    try:  # released
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    monkeypatch.setattr(runner, "compute_batch", compute_batch)
    # a refused resume (other settings) releases it too
    from fsinfo_fast.errors import FSInfoError

    with pytest.raises(FSInfoError, match="different settings"):
        run_profile(_cfg(tmp, variant="diag", batch_size=2, resume=True, sigma=0.2))
    out = run_profile(_cfg(tmp, variant="diag", batch_size=2, resume=True))
    assert out.computed == 4


# ------------------------------------------------------------------------------------------------
# profile.png with one split


def test_one_split_plot_draws_a_visible_sample_range(singular_setup):
    """With one split the sample-range band (fill_between over one x) had no width, though
    listed in the legend: a visible bar from min to max now."""
    from fsinfo_fast.profile.plot import profile_figure

    out = run_profile(_cfg(singular_setup, variant="diag"))
    st = out.summary["splits"][0]["fsinfo_diag"]
    assert st["max"] > st["min"]
    from matplotlib.collections import LineCollection, PolyCollection

    ax = profile_figure(out.summary).axes[0]
    ranges = [c for c in ax.collections if c.get_label() == "FSInfo diag: sample range"]
    assert len(ranges) == 1
    (r,) = ranges
    width = r.get_paths()[0].get_extents().width  # x data units
    assert (isinstance(r, PolyCollection) and width > 0) or (
        isinstance(r, LineCollection) and min(r.get_linewidth()) >= 5)  # points: seen
    ys = [v[1] for path in r.get_paths() for v in path.vertices]
    assert min(ys) == pytest.approx(st["min"]) and max(ys) == pytest.approx(st["max"])
