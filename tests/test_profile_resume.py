"""``fsinfo-fast profile`` survives being killed, and gives the same numbers on 2 processes.

Real processes: a run is SIGKILLed once some records are committed, resumed with ``--resume``, and
compared with an uninterrupted run; a ``torchrun`` run on 2 CPU processes (gloo) is compared with a
1-process run. Tiny configurations (VGG5 for 8x8 inputs, saved random weights).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsinfo_fast.models import vgg5
from fsinfo_fast.profile.store import RecordStore

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fsinfo_diag", "fsinfo_diag_se", "dfil", "dfil_se", "dfil_probes", "sigma_star",
           "dfil_bound", "fsinfo_logdet")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    p = tmp_path_factory.mktemp("ckpt") / "vgg5_8.pt"
    torch.save(vgg5(input_size=8).eval().state_dict(), p)
    return p


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)  # same thread count in every process compared
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _args(ckpt: Path, out: Path, n: int, *extra: str, splits: str = "0,4,5") -> list[str]:
    return ["profile", "--model", "vgg5", "--checkpoint", str(ckpt), "--data", "digits",
            "--size", "8", "--max-samples", str(n), "--batch-size", "2", "--splits", splits,
            "--estimator", "randomized", "--variant", "diag", "--rtol", "0.05", "--quiet",
            "--no-plot", "--out", str(out), *extra]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsinfo_fast", *argv], env=_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _samples(out: Path) -> dict[tuple[int, str], dict]:
    summary = json.loads((out / "profile.json").read_text())
    return {(r["sample"], r["split"]): r for r in summary["samples"]}


def _assert_same(a: dict, b: dict, rel: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for m in METRICS:
            va, vb = a[k][m], b[k][m]
            if rel == 0.0 or va is None or isinstance(va, int):
                assert va == vb, (k, m, va, vb)
            else:
                assert vb == pytest.approx(va, rel=rel, abs=1e-12), (k, m)


def test_kill_and_resume_equals_uninterrupted(ckpt, tmp_path):
    n, per_sample = 16, 3  # 8 batches of 2 samples, 3 splits
    full = tmp_path / "full"
    r = _run(_args(ckpt, full, n))
    assert r.returncode == 0, r.stderr
    reference = _samples(full)
    assert len(reference) == n * per_sample

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fsinfo_fast", *_args(ckpt, out, n)],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = RecordStore(out / "records.jsonl")
    deadline = time.monotonic() + 90
    try:
        while len(store.read()) < 2 * 2 * per_sample:  # at least two batches committed
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no records appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = store.read()
    assert 0 < len(done) < n * per_sample, "the kill did not land mid-run"
    assert not (out / "profile.json").exists()
    killed_copy = {k: dict(v) for k, v in done.items()}

    # simulate the worst moment too: a torn half-written record at the end of the store
    with open(out / "records.jsonl", "ab") as fh:
        fh.write(b'{"crc":1,"sample":99,"split":"feat')

    r = _run(_args(ckpt, out, n, "--resume"))
    assert r.returncode == 0, r.stderr
    # nothing lost, nothing duplicated: one complete line per (sample, split)
    lines = (out / "records.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    keys = [(json.loads(line)["sample"], json.loads(line)["split"]) for line in lines[:-1]]
    assert len(keys) == len(set(keys)) == n * per_sample
    resumed = _samples(out)
    # the records committed before the kill are kept as they were
    for k, rec in killed_copy.items():
        assert resumed[k]["fsinfo_diag"] == rec["fsinfo_diag"] and resumed[k]["dfil"] == rec["dfil"]
    _assert_same(reference, resumed)  # the same numbers as the uninterrupted run, exactly
    full_summary = json.loads((full / "profile.json").read_text())["splits"]
    resumed_summary = json.loads((out / "profile.json").read_text())["splits"]
    assert full_summary == resumed_summary


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_match_one(ckpt, tmp_path):
    n = 6  # 3 batches: rank 0 takes two, rank 1 one
    one = tmp_path / "one"
    r = _run(_args(ckpt, one, n, splits="0,5"))
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "fsinfo_fast", *_args(ckpt, two, n, splits="0,5")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    settings = json.loads((two / "settings.json").read_text())
    assert settings["world_size"] == 2
    summary = json.loads((two / "profile.json").read_text())
    assert summary["timing"]["world_size"] == 2
    _assert_same(_samples(one), _samples(two), rel=1e-9)
    lines = (two / "records.jsonl").read_bytes().count(b"\n")
    assert lines == n * 2

    # a user error under torchrun: the ranks agree on it and exit 2 with the one-line message
    # (torchrun stops the other rank once one has exited, and prints its own summary of the
    # failed children, without any fsinfo_fast traceback)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if "fsinfo-fast profile: error:" in ln]
    assert ours and all("not empty" in ln for ln in ours), r.stderr[-2000:]
    assert re.search(r"exitcode\s*:\s*2 ", r.stderr)
    assert "fsinfo_fast/" not in r.stderr and "Error:" not in r.stderr.replace(
        "ChildFailedError:", "")


def test_resume_with_out_alone_continues_the_stored_run(ckpt, tmp_path):
    """The README's `fsinfo-fast profile --out run1 --resume`: the options left out were
    taken from the defaults and refused as "different settings" (model vgg5, data digits, ...
    of a run made with others); they are now read from the run's settings.json. An option
    given with another value than the run's is still refused."""
    n, per_sample = 6, 3
    full = tmp_path / "full"
    r = _run(_args(ckpt, full, n))
    assert r.returncode == 0, r.stderr
    reference = _samples(full)

    out = tmp_path / "cut"
    r = _run(_args(ckpt, out, n))
    assert r.returncode == 0, r.stderr
    lines = (out / "records.jsonl").read_bytes().split(b"\n")
    (out / "records.jsonl").write_bytes(b"\n".join(lines[: 2 * per_sample]) + b"\n")
    (out / "profile.json").unlink()  # an interrupted run has none yet

    r = _run(["profile", "--sigma", "0.5", "--out", str(out), "--resume", "--quiet"])
    assert r.returncode == 2 and "different settings" in r.stderr
    # given explicitly at its default value, against the run's randomized: refused too (it
    # was taken for 'not given' and silently replaced by the run's value)
    r = _run(["profile", "--estimator", "auto", "--out", str(out), "--resume", "--quiet"])
    assert r.returncode == 2 and "estimator" in r.stderr
    r = _run(["profile", "--out", str(out), "--resume", "--quiet", "--no-plot"])
    assert r.returncode == 0, r.stderr
    _assert_same(reference, _samples(out))
