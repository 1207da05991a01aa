"""``fsinfo-fast profile``: CLI, files and their schema, the record store, shared work, errors.

Tiny configurations: VGG5 built for 8x8 inputs (d = 192) with saved random weights, a few digits.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from rich.console import Console

import fsinfo_fast as ff
from fsinfo_fast.cli import main
from fsinfo_fast.profile import ProfileConfig, run_profile
from fsinfo_fast.profile.report import SAMPLE_FIELDS, SUMMARY_FIELDS, print_table
from fsinfo_fast.profile.shared import NestedStack, exact_diag_shared, measure_sharing
from fsinfo_fast.profile.sources import resolve_splits
from fsinfo_fast.profile.store import RecordStore, RunDir
from tests.helpers import tiny_vgg5 as _tiny_vgg5


def base_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["profile", "--model", "vgg5", "--checkpoint", str(ckpt), "--data", "digits",
            "--size", "8", "--max-samples", "4", "--batch-size", "3", "--quiet",
            "--out", str(out), *extra]


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fsinfo-fast profile: error: ")
    return err


@pytest.fixture(scope="module")
def finished_run(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(base_args(ckpt, out, "--splits", "1,3,5", "--variant", "both")) == 0
    return out


# ------------------------------------------------------------------------------------------------
# a run: files and schema


def test_files_and_schema(finished_run):
    out = finished_run
    names = {p.name for p in out.iterdir()}
    assert {"settings.json", "records.jsonl", "profile.json", "summary.csv", "samples.csv",
            "profile.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "profile.json").read_text())
    st = summary["settings"]
    assert st["splits"] == ["features.1", "features.3", "classifier.0"]
    assert st["num_samples"] == 4 and st["sigma"] == 0.1 and st["checkpoint_sha256"]
    assert len(summary["splits"]) == 3
    for s in summary["splits"]:
        assert s["n"] == 4 and s["d"] == 192
        for k in ("mean", "mean_ci95", "sample_std", "max", "worst"):
            assert k in s["fsinfo_diag"] and k in s["dfil"]
        assert s["dfil_bound_worst"]["value"] > 0
        assert s["sigma_star"]["value"] > 0
        # the worst-case bound is the smallest per-sample bound
        per = [r["dfil_bound"] for r in summary["samples"] if r["split"] == s["name"]]
        assert s["dfil_bound_worst"]["value"] == min(per)
    # log det: finite where m >= d, skipped (reason given) where m < d
    by = {s["name"]: s for s in summary["splits"]}
    assert by["features.1"]["fsinfo_logdet"] is not None  # m = 512 >= 192
    assert by["features.3"]["fsinfo_logdet"] is not None  # m = 256 >= 192
    # m = 128 < 192: exactly -inf for every sample, so is the mean (null + flag in JSON)
    assert by["classifier.0"]["fsinfo_logdet"]["mean_is_neg_inf"]
    assert by["classifier.0"]["fsinfo_logdet"]["mean"] is None
    assert by["classifier.0"]["fsinfo_logdet"]["n_neg_inf"] == 4
    assert "m = 128 < d = 192" in by["classifier.0"]["fsinfo_logdet_status"][0]
    # Hadamard: diag >= log det, per sample
    for r in summary["samples"]:
        if r["fsinfo_logdet"] is not None:
            assert r["fsinfo_diag"] >= r["fsinfo_logdet"] - 1e-9
    assert len(summary["samples"]) == 12
    assert set(summary["samples"][0]) == set(SAMPLE_FIELDS)
    # the backend that served each split (and why auto left the engine, where it did)
    assert all(r["backend"] for r in summary["samples"])
    assert all(s["backends"] for s in summary["splits"])
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SUMMARY_FIELDS and len(rows) == 3
    assert float(rows[0]["fsinfo_diag_mean"]) == pytest.approx(
        summary["splits"][0]["fsinfo_diag"]["mean"])
    with open(out / "samples.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SAMPLE_FIELDS and len(rows) == 12


def test_numbers_match_public_api(finished_run, ckpt):
    """Each record equals the public metric on that split's encoder (exact at d = 192)."""
    summary = json.loads((finished_run / "profile.json").read_text())
    from fsinfo_fast.data import digits

    model = _tiny_vgg5()
    x, _ = digits(size=8, split="test", max_samples=4)
    for k, name in [(3, "features.3"), (5, "classifier.0")]:
        enc = ff.split(model, k)
        fs = ff.fsinfo(enc, x, 0.1, variant="diag", estimator="exact").value
        dfil = ff.dfil(enc, x, 0.1, estimator="exact").value
        sig = ff.fsinfo_sigma(enc, x, -1.0, variant="diag", estimator="exact").sigma
        rec = sorted((r for r in summary["samples"] if r["split"] == name),
                     key=lambda r: r["sample"])
        got = torch.tensor([r["fsinfo_diag"] for r in rec], dtype=torch.float64)
        torch.testing.assert_close(got, fs, rtol=1e-10, atol=1e-10)
        got = torch.tensor([r["dfil"] for r in rec], dtype=torch.float64)
        torch.testing.assert_close(got, dfil, rtol=1e-10, atol=0)
        got = torch.tensor([r["sigma_star"] for r in rec], dtype=torch.float64)
        torch.testing.assert_close(got, sig, rtol=1e-8, atol=0)
        assert all(r["dfil_bound"] == pytest.approx(1 / r["dfil"], rel=1e-12) for r in rec)
        assert all(r["fsinfo_diag_bound"] == pytest.approx(
            math.exp(-2 * r["fsinfo_diag"]) / (2 * math.pi * math.e), rel=1e-12) for r in rec)
        if k == 3:
            ld = ff.fsinfo(enc, x, 0.1, variant="logdet", estimator="exact").value
            got = torch.tensor([r["fsinfo_logdet"] for r in rec], dtype=torch.float64)
            torch.testing.assert_close(got, ld, rtol=1e-10, atol=1e-10)


def test_no_share_gives_same_numbers(finished_run, ckpt, tmp_path):
    out = tmp_path / "noshare"
    assert main(base_args(ckpt, out, "--splits", "1,3,5", "--no-share", "--no-plot",
                          "--variant", "diag")) == 0
    a = json.loads((finished_run / "profile.json").read_text())["samples"]
    b = json.loads((out / "profile.json").read_text())["samples"]
    assert [(r["sample"], r["split"]) for r in a] == [(r["sample"], r["split"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("fsinfo_diag", "dfil", "sigma_star", "dfil_bound"):
            if ra[key] is None:
                assert rb[key] is None
            else:
                assert rb[key] == pytest.approx(ra[key], rel=1e-10, abs=1e-12)
    sharing = json.loads((out / "profile.json").read_text())["sharing"]
    assert sharing["exact_sweep_splits"] == []
    shared = json.loads((finished_run / "profile.json").read_text())["sharing"]
    assert shared["exact_sweep_splits"]  # the shared run did use the sweep


def test_rerun_same_dir_and_resume_done(finished_run, ckpt, capsys):
    # without --resume: refused, pointing at --resume / a new --out
    err = one_line_error(capsys, main(base_args(ckpt, finished_run, "--splits", "1,3,5",
                                                "--variant", "both")))
    assert "--resume" in err and "--out" in err
    # --resume on a finished run: nothing recomputed, same outputs
    before = json.loads((finished_run / "profile.json").read_text())["samples"]
    lines = (finished_run / "records.jsonl").read_bytes().count(b"\n")
    assert main(base_args(ckpt, finished_run, "--splits", "1,3,5", "--variant", "both",
                          "--resume")) == 0
    assert (finished_run / "records.jsonl").read_bytes().count(b"\n") == lines
    assert json.loads((finished_run / "profile.json").read_text())["samples"] == before


def test_python_api(ckpt, tmp_path):
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=2,
                                    splits="2", variant="diag", out=str(tmp_path / "r"),
                                    plot=False, progress=False, table=False))
    assert out.computed == 2
    s = out.summary["splits"][0]
    assert s["name"] == "features.2" and s["fsinfo_logdet"] is None
    assert "not requested" in s["fsinfo_logdet_status"][0]


def test_prior_var_makes_logdet_finite_everywhere(ckpt, tmp_path):
    # with a prior FSInfo never falls below log(1/prior_var)/2 - log(2 pi e)/2 = -0.27 nats/dim
    floor = 0.5 * math.log(1 / 0.1) - 0.5 * math.log(2 * math.pi * math.e)
    assert -1.0 < floor < -0.2
    for target in (-1.0, -0.2):
        out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8,
                                        max_samples=2, splits="5", variant="both",
                                        prior_var=0.1, target=target,
                                        out=str(tmp_path / f"r{target}"),
                                        plot=False, progress=False, table=False))
        s = out.summary["splits"][0]
        assert s["m"] < s["d"] and s["fsinfo_logdet"] is not None
        recs = out.summary["samples"]
        if target < floor:  # unreachable: sigma* is infinite, stored as null with a status
            assert s["sigma_star_logdet"]["value"] is None
            assert s["sigma_star_logdet"]["n_unreachable"] == 2
            assert all(r["sigma_star_logdet"] is None and "unreachable" in
                       r["sigma_star_logdet_status"] for r in recs)
            continue
        assert all(r["sigma_star_logdet_status"] is None for r in recs)
        # reachable: the exact profile solves for sigma* with the prior (the oracle agrees)
        from fsinfo_fast.data import digits

        x, _ = digits(size=8, split="test", max_samples=2)
        enc = ff.split(_tiny_vgg5(), 5)
        sig = torch.tensor([r["sigma_star_logdet"] for r in recs], dtype=torch.float64)
        ref = ff.reference.fsinfo_sigma(enc, x, target, "logdet", prior_var=0.1).sigma
        torch.testing.assert_close(sig, ref, rtol=1e-8, atol=0)
        f = ff.reference.fsinfo(enc, x, sig, "logdet", prior_var=0.1).value
        torch.testing.assert_close(f, torch.full_like(f, target), rtol=0, atol=1e-9)


def test_unreachable_sigma_star_is_shown_as_such(ckpt, tmp_path):
    # below the floor's asymptote (-12.9 nats/dim) no finite noise reaches the target: sigma*
    # is infinite, which JSON stores as null; a status and the table say so (a bare null / "-"
    # read as "not computed")
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=2,
                                    splits="2", variant="diag", target=-13.5,
                                    out=str(tmp_path / "r"), plot=False, progress=False,
                                    table=False))
    s = out.summary["splits"][0]
    assert s["sigma_star"]["value"] is None and s["sigma_star"]["n_unreachable"] == 2
    assert all(r["sigma_star"] is None and "unreachable" in r["sigma_star_status"]
               for r in out.summary["samples"])
    rows = list(csv.DictReader((tmp_path / "r" / "summary.csv").open()))
    assert rows[0]["sigma_star_n_unreachable"] == "2"
    console = Console(record=True, width=200)
    print_table(out.summary, console=console)
    text = console.export_text()
    assert "∞" in text and "2 sample(s) no finite noise reaches --target -13.5" in text
    # a reachable target: no status, no note
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=2,
                                    splits="2", variant="diag", target=-1.0,
                                    out=str(tmp_path / "r2"), plot=False, progress=False,
                                    table=False))
    assert out.summary["splits"][0]["sigma_star"]["value"] > 0
    assert all(r["sigma_star_status"] is None for r in out.summary["samples"])
    console = Console(record=True, width=200)
    print_table(out.summary, console=console)
    assert "∞" not in console.export_text()


# ------------------------------------------------------------------------------------------------
# the record store


def test_store_torn_tail_and_corrupt_lines(tmp_path):
    st = RecordStore(tmp_path / "records.jsonl")
    with st:
        assert st.append([{"sample": 0, "split": "a", "v": 1.0},
                          {"sample": 1, "split": "a", "v": 2.0}]) == 2
    good = (tmp_path / "records.jsonl").read_bytes()
    # a torn write (no final newline) and a zero-filled line are ignored
    (tmp_path / "records.jsonl").write_bytes(good + b"\x00\x00\x00\n" + b'{"sample": 2, "spl')
    assert set(RecordStore(tmp_path / "records.jsonl").read()) == {(0, "a"), (1, "a")}
    # appending after a torn tail cuts it off first: the new line stays intact
    with RecordStore(tmp_path / "records.jsonl") as st2:
        st2.append([{"sample": 2, "split": "a", "v": 3.0}])
    recs = RecordStore(tmp_path / "records.jsonl").read()
    assert set(recs) == {(0, "a"), (1, "a"), (2, "a")} and recs[(2, "a")]["v"] == 3.0
    # a line whose content was altered fails its CRC and is ignored; duplicates keep the first
    data = (tmp_path / "records.jsonl").read_bytes().replace(b'"v":2.0', b'"v":9.0')
    (tmp_path / "records.jsonl").write_bytes(data)
    with RecordStore(tmp_path / "records.jsonl") as st3:
        st3.append([{"sample": 0, "split": "a", "v": 7.0}])
    recs = RecordStore(tmp_path / "records.jsonl").read()
    assert (1, "a") not in recs and recs[(0, "a")]["v"] == 1.0


def test_store_refuses_nan(tmp_path):
    with RecordStore(tmp_path / "r.jsonl") as st, pytest.raises(ValueError):
        st.append([{"sample": 0, "split": "a", "v": math.nan}])


# ------------------------------------------------------------------------------------------------
# shared work across splits


def test_shared_exact_sweep_matches_per_split():
    model = _tiny_vgg5(1)
    x = torch.rand(2, 3, 8, 8)
    specs = resolve_splits(model, "all")
    stack = NestedStack(model, [s.name for s in specs], x[:1], {s.name: s.encoder for s in specs})
    assert stack.names == [s.name for s in specs] and not stack.rejected
    costs = [stack.cost[n] for n in stack.names]
    assert costs == sorted(costs)
    diag = exact_diag_shared(stack, stack.names, x)
    for s in specs:
        ref = ff.reference.exact_fisher(s.encoder, x, spectrum=False)
        torch.testing.assert_close(diag[s.name], ref.diag, rtol=1e-10, atol=1e-14)
        # the profile wraps the swept diagonal in an ExactFisher: the same numbers as the oracle
        ex = ff.reference.ExactFisher(diag=diag[s.name], trace=diag[s.name].sum(1), eigvals=None,
                                      zero=None, d=ref.d, m=ref.m)
        torch.testing.assert_close(ex.fsinfo(0.1).value, ref.fsinfo(0.1).value, rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(ex.dfil(0.1).value, ref.dfil(0.1).value, rtol=1e-10, atol=0)
        torch.testing.assert_close(ex.fsinfo_sigma(-1.0).sigma, ref.fsinfo_sigma(-1.0).sigma,
                                   rtol=1e-10,
                                   atol=0)


def test_measure_sharing_reports_agreement():
    res = measure_sharing(_tiny_vgg5(2), torch.rand(2, 3, 8, 8), splits=[0, 2, 4], repeats=1)
    assert res["splits"] == ["features.0", "features.2", "features.4"]
    assert res["forward"]["max_abs_diff"] == 0.0
    assert res["exact_diag"]["max_rel_diff"] < 1e-10
    assert "dfil_probes" not in res  # the shared input-side dFIL probes are gone
    for k in ("forward", "exact_diag"):
        assert res[k]["shared_s"] > 0 and res[k]["per_split_s"] > 0


def test_unshareable_split_is_computed_per_split(ckpt, tmp_path):
    # "flatten" is a torch.fx node name, not a module: computed on its own, same numbers
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=2,
                                    splits="0,flatten", variant="diag", out=str(tmp_path / "r"),
                                    plot=False, progress=False, table=False))
    assert "flatten" in out.summary["sharing"]["not_shareable"]
    names = [s["name"] for s in out.summary["splits"]]
    assert names == ["features.0", "flatten"]
    model = _tiny_vgg5()
    from fsinfo_fast.data import digits

    x, _ = digits(size=8, split="test", max_samples=2)
    ref = ff.fsinfo(ff.split(model, "flatten"), x, 0.1, estimator="exact").value
    got = [r["fsinfo_diag"] for r in out.summary["samples"] if r["split"] == "flatten"]
    assert got == pytest.approx(ref.tolist(), rel=1e-10)


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing a later --resume would trust


def _no_run_left(out: Path) -> None:
    assert not (out / "settings.json").exists()
    assert not RunDir(out).exists()


def test_unknown_model(capsys, tmp_path):
    out = tmp_path / "o"
    err = one_line_error(capsys, main(["profile", "--model", "vgg55", "--out", str(out)]))
    assert "vgg55" in err and "vgg5" in err
    _no_run_left(out)
    err = one_line_error(capsys, main(["profile", "--model", "nosuchpkg.mod:fn", "--out",
                                       str(out)]))
    assert "nosuchpkg" in err
    err = one_line_error(capsys, main(["profile", "--model", "fsinfo_fast.models:nope", "--out",
                                       str(out)]))
    assert "nope" in err
    _no_run_left(out)


def test_unknown_split(ckpt, capsys, tmp_path):
    out = tmp_path / "o"
    err = one_line_error(capsys, main(base_args(ckpt, out, "--splits", "0,features.9")))
    assert "features.9" in err
    err = one_line_error(capsys, main(base_args(ckpt, out, "--splits", "17")))
    assert "17" in err and "out of range" in err
    _no_run_left(out)


def test_checkpoint_mismatch_and_unsafe(capsys, tmp_path):
    out = tmp_path / "o"
    bad = tmp_path / "resnet.pt"
    torch.save(ff.models.resnet18().state_dict(), bad)
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint", str(bad),
                                       "--size", "8", "--out", str(out)]))
    assert "does not match" in err and "missing" in err
    # a state dict with a wrong shape
    sd = _tiny_vgg5().state_dict()
    sd["features.0.0.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(sd, tmp_path / "shape.pt")
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint",
                                       str(tmp_path / "shape.pt"), "--size", "8", "--out",
                                       str(out)]))
    assert "shape" in err and "features.0.0.weight" in err
    # a pickle that is not plain weights: refused, not executed
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"obj": _Unsafe()}, fh)
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint", str(evil),
                                       "--size", "8", "--out", str(out)]))
    assert "refusing checkpoint" in err and "weights_only" in err
    # not a torch file at all / missing
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint",
                                       str(tmp_path / "junk.pt"), "--out", str(out)]))
    assert "junk.pt" in err
    err = one_line_error(capsys, main(["profile", "--checkpoint", str(tmp_path / "none.pt"),
                                       "--out", str(out)]))
    assert "does not exist" in err
    _no_run_left(out)


class _Unsafe:
    def __reduce__(self):
        return (print, ("this must never run",))


def _write_png(path: Path, w: int, h: int) -> None:
    from PIL import Image

    Image.new("RGB", (w, h), (int(w * 7) % 255, 20, 30)).save(path)


def test_image_folder(ckpt, capsys, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _write_png(folder / f"{i}.png", 8, 8)
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "ok"
    assert main(["profile", "--model", "vgg5", "--checkpoint", str(ckpt), "--data", str(folder),
                 "--splits", "1", "--variant", "diag", "--quiet", "--no-plot", "--out",
                 str(out)]) == 0
    summary = json.loads((out / "profile.json").read_text())
    assert summary["splits"][0]["n"] == 3 and summary["settings"]["input_shape"] == [3, 8, 8]
    # one image of another size
    _write_png(folder / "3.png", 9, 8)
    out2 = tmp_path / "bad"
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint", str(ckpt),
                                       "--data", str(folder), "--out", str(out2)]))
    assert "differ in size" in err and "3.png" in err
    (folder / "3.png").unlink()
    (folder / "2.png").write_bytes(b"\x89PNG broken")
    err = one_line_error(capsys, main(["profile", "--model", "vgg5", "--checkpoint", str(ckpt),
                                       "--data", str(folder), "--out", str(out2)]))
    assert "cannot read image" in err and "2.png" in err
    err = one_line_error(capsys, main(["profile", "--data", str(tmp_path / "nope"), "--out",
                                       str(out2)]))
    assert "nope" in err
    err = one_line_error(capsys, main(["profile", "--data", "torchvision:CIFAR10:/nonexistent",
                                       "--out", str(out2)]))
    assert "torchvision" in err
    _no_run_left(out2)


def test_output_dir_not_writable(ckpt, capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = one_line_error(capsys, main(base_args(ckpt, blocker / "run")))
    assert "file.txt" in err
    err = one_line_error(capsys, main(base_args(ckpt, blocker)))
    assert "not a directory" in err
    assert blocker.read_text() == "x"


def test_non_empty_dir_and_bad_resume(ckpt, capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    err = one_line_error(capsys, main(base_args(ckpt, other)))
    assert "not empty" in err and "--resume" in err
    err = one_line_error(capsys, main(base_args(ckpt, other, "--resume")))
    assert "no profile run" in err
    err = one_line_error(capsys, main(base_args(ckpt, tmp_path / "absent", "--resume")))
    assert "does not exist" in err
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    # what a set-up killed before settings.json leaves is not a run: --resume refuses it and a
    # new run may take the directory over
    aborted = tmp_path / "aborted"
    aborted.mkdir()
    (aborted / "model.pt").write_bytes(b"partial")
    (aborted / ".settings.json.x1.tmp").write_text("{")
    err = one_line_error(capsys, main(base_args(ckpt, aborted, "--resume")))
    assert "no profile run" in err
    assert main(base_args(ckpt, aborted, "--splits", "5", "--no-plot")) == 0
    assert (aborted / "settings.json").is_file()
    assert not (aborted / "model.pt").exists()  # a checkpoint run keeps no model.pt


def test_resume_with_different_settings(finished_run, ckpt, capsys):
    settings = (finished_run / "settings.json").read_bytes()
    records = (finished_run / "records.jsonl").read_bytes()
    err = one_line_error(capsys, main(base_args(ckpt, finished_run, "--splits", "1,3,5",
                                                "--variant", "both", "--sigma", "0.2",
                                                "--resume")))
    assert "different settings" in err and "sigma 0.1 -> 0.2" in err
    err = one_line_error(capsys, main(base_args(ckpt, finished_run, "--splits", "1,3",
                                                "--variant", "both", "--resume")))
    assert "splits" in err
    # batch size and device may change
    assert main(base_args(ckpt, finished_run, "--splits", "1,3,5", "--variant", "both",
                          "--resume", "--batch-size", "1", "--device", "cpu", "--no-plot")) == 0
    assert (finished_run / "records.jsonl").read_bytes() == records
    assert json.loads(settings)["sigma"] == 0.1


def test_bad_option_values(capsys, tmp_path):
    out = str(tmp_path / "o")
    for argv, needle in [
        (["--sigma", "0"], "--sigma"),
        (["--atol", "-1"], "--atol"),
        (["--variant", "diag", "--prior-var", "1"], "--prior-var"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
         "--device"),
        (["--backend", "bogus"], "--backend"),  # was checked after the run directory was made
    ]:
        err = one_line_error(capsys, main(["profile", *argv, "--out", out]))
        assert needle in err
    _no_run_left(tmp_path / "o")


def test_demo_model_is_trained_once_and_resumed(tmp_path, monkeypatch):
    """A zoo model without a checkpoint is trained briefly; --resume reuses its saved weights."""
    import fsinfo_fast.train as train

    monkeypatch.setenv("FSINFO_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    argv = ["profile", "--size", "8", "--max-samples", "3", "--batch-size", "2", "--splits", "5",
            "--quiet", "--no-plot", "--out", str(out)]
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "vgg5" and settings["demo_accuracy"] > 0.5
    assert (out / "model.pt").is_file()
    assert list((tmp_path / "cache").glob("demo-vgg5-digits-8-*.pt"))  # trained once, cached
    first = json.loads((out / "profile.json").read_text())["samples"]
    records = out / "records.jsonl"
    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:-1]))  # as if killed before the last commit
    epochs: list[int] = []
    real = train.train_briefly

    def spy(*a, **kw):
        epochs.append(kw.get("epochs", a[3] if len(a) > 3 else None))
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_briefly", spy)
    assert main([*argv, "--resume"]) == 0
    assert epochs == [0]  # no training on resume: the weights come from model.pt
    assert json.loads((out / "profile.json").read_text())["samples"] == first


# ------------------------------------------------------------------------------------------------
# one Linearization per (split, batch)


def _count_linearizations(monkeypatch) -> list[tuple[str, int]]:
    """Record ``(split name, batch size)`` of every Linearization built (each validates its
    encoder once, through ``fsinfo_fast.linearization.prepare``; its float64 copy for the exact
    routes, prepared without the interaction check, is not another Linearization)."""
    import fsinfo_fast.linearization as lz

    calls: list[tuple[str, int]] = []
    real = lz.prepare

    def counting(encoder, x, *args, **kw):
        if kw.get("check_interaction") != 0:
            calls.append((getattr(encoder, "split_name", "?"), int(x.shape[0])))
        return real(encoder, x, *args, **kw)

    monkeypatch.setattr(lz, "prepare", counting)
    return calls


def test_records_equal_a_direct_linearization(ckpt, tmp_path, monkeypatch):
    """A randomized profile's per-sample FSInfo_diag, dFIL and sigma* (values, errors, probes,
    intervals, bounds) are those of ``ff.linearize(encoder, x_batch, seed=, sample_ids=)``'s
    ``.fsinfo`` / ``.dfil`` / ``.fsinfo_sigma``; one Linearization per (split, batch); and a
    sample's numbers do not depend on the batch it was computed in."""
    from fsinfo_fast.data import digits

    calls = _count_linearizations(monkeypatch)
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=4,
                                    batch_size=3, splits="0,4", variant="diag",
                                    estimator="randomized", atol=0.05, rtol=0.05, seed=5,
                                    out=str(tmp_path / "r"),
                                    plot=False, progress=False, table=False))
    # batches [0, 1, 2] and [3], splits features.0 and features.4: four Linearizations
    assert sorted(calls) == sorted([("features.0", 3), ("features.4", 3), ("features.0", 1),
                                    ("features.4", 1)])
    monkeypatch.undo()
    recs = {(r["sample"], r["split"]): r for r in out.summary["samples"]}
    x, _ = digits(size=8, split="test", max_samples=4)
    model = _tiny_vgg5()
    checked = 0
    for name, k in (("features.0", 0), ("features.4", 4)):
        enc = ff.split(model, k)
        for ids in ([0, 1, 2], [3]):
            lin = ff.linearize(enc, x[ids], seed=5, sample_ids=torch.tensor(ids))
            fd = lin.fsinfo(0.1, variant="diag", estimator="randomized", atol=0.05)
            dl = lin.dfil(0.1, estimator="randomized", rtol=0.05)  # --dfil-method auto
            sg = lin.fsinfo_sigma(-1.0, variant="diag", estimator="randomized", atol=0.05)
            db, fb = ff.bounds.dfil_bound(dl), ff.bounds.fsinfo_bound(fd)
            for j, i in enumerate(ids):
                r = recs[(i, name)]
                want = {
                    "fsinfo_diag": fd.value[j], "fsinfo_diag_se": fd.stderr[j],
                    "fsinfo_diag_hw": fd.ci_halfwidth[j], "dfil": dl.value[j],
                    "dfil_se": dl.stderr[j], "dfil_hw": dl.ci_halfwidth[j],
                    "sigma_star": sg.sigma[j], "sigma_star_low": sg.ci_low[j],
                    "sigma_star_high": sg.ci_high[j], "dfil_bound": db.value[j],
                    "dfil_bound_low": db.low[j], "dfil_bound_high": db.high[j],
                    "fsinfo_diag_bound": fb.value[j], "fsinfo_diag_bound_low": fb.low[j],
                    "fsinfo_diag_bound_high": fb.high[j],
                }
                for key, v in want.items():
                    assert r[key] == pytest.approx(float(v), rel=1e-12, abs=0), (name, i, key)
                assert r["fsinfo_diag_probes"] == int(fd.probes_per_sample[j])
                assert r["dfil_probes"] == int(dl.probes_per_sample[j])
                assert r["fsinfo_diag_converged"] is bool(fd.converged[j])
                assert r["dfil_converged"] is bool(dl.converged[j])
                assert r["fsinfo_diag_estimator"] == "randomized"
                # the float64 rounding check's allowance, counted in _hw (float32 products)
                for key, res in (("fsinfo_diag_rounding", fd), ("dfil_rounding", dl)):
                    meas = res.info["rounding_measured"][j]
                    assert r[key] == pytest.approx(meas, rel=1e-12, abs=0), (name, i, key)
                    assert 0 <= r[key] <= r[key.replace("rounding", "hw")]
                # the default --dfil-method auto: the method the Linearization chose
                assert r["dfil_estimator"] == f"randomized ({dl.info['method']})"
                checked += 1
    assert checked == 8
    # batch independence: sample 1 alone gives what it gave inside the batch [0, 1, 2] (dFIL
    # with the method that batch's auto chose: auto weighs the methods per batch, README)
    rec = recs[(1, "features.4")]
    method = rec["dfil_estimator"].removeprefix("randomized (").removesuffix(")")
    lin = ff.linearize(ff.split(model, 4), x[1:2], seed=5, sample_ids=torch.tensor([1]))
    fd = lin.fsinfo(0.1, variant="diag", estimator="randomized", atol=0.05)
    dl = lin.dfil(0.1, estimator="randomized", rtol=0.05, method=method)
    assert recs[(1, "features.4")]["fsinfo_diag"] == pytest.approx(float(fd.value[0]), rel=1e-6)
    assert recs[(1, "features.4")]["dfil"] == pytest.approx(float(dl.value[0]), rel=1e-6)


def test_exact_sweep_measures_each_split_without_its_own_jacobian(ckpt, tmp_path, monkeypatch):
    """Exact profiles: the splits of the one-hot sweep compute no Jacobian of their own (the
    sweep's serves them), but each gets one Linearization per batch, which measures the
    sweep's rounding on that split (``Linearization._adopt_exact``); a split whose log det is
    asked computes its spectrum there; --no-share: every split its own oracle."""
    import fsinfo_fast.reference as oracle

    cfg = {"model": "vgg5", "checkpoint": str(ckpt), "size": 8, "max_samples": 2,
           "batch_size": 1, "splits": "0,1,2", "estimator": "exact", "plot": False,
           "progress": False, "table": False}
    jac: list[bool] = []
    real = oracle.exact_fisher

    def counting(*args, **kw):
        jac.append(kw.get("spectrum", True))
        return real(*args, **kw)

    monkeypatch.setattr(oracle, "exact_fisher", counting)
    calls = _count_linearizations(monkeypatch)
    per_split = sorted((f"features.{k}", 1) for k in range(3) for _ in range(2))
    out = run_profile(ProfileConfig(variant="diag", out=str(tmp_path / "a"), **cfg))
    assert out.summary["sharing"]["exact_sweep_splits"] == ["features.0", "features.1",
                                                            "features.2"]
    assert sorted(calls) == per_split and jac == []
    hw = [r["fsinfo_diag_hw"] for r in out.summary["samples"]]
    assert all(0 < h < 1e-9 for h in hw)  # (the measured allowance: not 0, not a give-up)
    calls.clear()
    out = run_profile(ProfileConfig(variant="both", out=str(tmp_path / "b"), **cfg))
    skipped = out.summary["sharing"]["logdet_skipped"]  # m < d: -inf without computing
    logdet = [s["name"] for s in out.summary["splits"] if s["name"] not in skipped]
    assert logdet  # m >= d at these splits
    assert sorted(calls) == per_split
    assert jac == [True] * (2 * len(logdet))  # (the spectrum only: the diagonal is swept)
    calls.clear()
    jac.clear()
    out = run_profile(ProfileConfig(variant="diag", share=False, out=str(tmp_path / "c"),
                                    **cfg))
    assert out.summary["sharing"]["exact_sweep_splits"] == []
    assert sorted(calls) == per_split and len(jac) == 6


def test_dfil_method_option(ckpt, tmp_path):
    """``--dfil-method`` reaches ``Linearization.dfil`` (and changes the numbers: part of the
    settings a resume must match); a bad value is refused."""
    with pytest.raises(ff.InvalidInputError, match="--dfil-method"):
        ProfileConfig(dfil_method="exact").validate()
    out = run_profile(ProfileConfig(model="vgg5", checkpoint=str(ckpt), size=8, max_samples=2,
                                    splits="0", variant="diag", estimator="randomized",
                                    atol=0.05, rtol=0.05, dfil_method="diag",
                                    out=str(tmp_path / "r"), plot=False, progress=False,
                                    table=False))
    assert out.summary["settings"]["dfil_method"] == "diag"
    recs = out.summary["samples"]
    assert {r["dfil_estimator"] for r in recs} == {"randomized (diag)"}
    from fsinfo_fast.data import digits

    x, _ = digits(size=8, split="test", max_samples=2)
    lin = ff.linearize(ff.split(_tiny_vgg5(), 0), x, seed=0, sample_ids=torch.arange(2))
    lin.fsinfo(0.1, variant="diag", estimator="randomized", atol=0.05)
    dl = lin.dfil(0.1, estimator="randomized", rtol=0.05, method="diag")
    assert [r["dfil"] for r in recs] == pytest.approx(dl.value.tolist(), rel=1e-12)


def test_auto_fallback_to_the_oracle_is_named_in_the_record():
    """Where ``auto`` took the oracle the record's estimator says why (no silent fallback)."""
    from fsinfo_fast.profile.runner import _label

    lin = ff.linearize(ff.split(_tiny_vgg5(), 4), torch.rand(2, 3, 8, 8), seed=0)
    r = lin.dfil(0.1, estimator="randomized", num_probes=4, method="hutchinson")
    assert _label(r, "auto", method=True) == "randomized (hutchinson)"
    assert _label(r, "auto") == "randomized"
    lin.exact()
    r = lin.fsinfo(0.1, estimator="auto")
    assert r.estimator == "exact" and r.info["auto"]
    assert _label(r, "auto") == f"exact (auto: {r.info['auto']})"
    assert _label(r, "exact") == "exact"  # the plan asked for it: nothing to explain


@pytest.mark.parametrize("share", [True, False])
def test_a_sigma_star_below_the_range_is_recorded_not_fatal(share):
    """A split whose FSInfo at sigma = 1 lies far below the target (columns of 1e-151 at the
    floor's level): its sigma* (1e-156) is below the metrics' range, which
    ``Linearization.fsinfo_sigma`` refuses, and the whole exact profile stopped there (helper
    99; the shared sweep's splits had taken sigma* from their ExactFisher until it was
    measured per split). The record keeps it, with a status saying no noise is needed."""
    from fsinfo_fast.profile.runner import SIGMA_NEGLIGIBLE, compute_batch, make_plan

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Softmax(-1),
                                torch.nn.Linear(3, 3)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-3.2, 10.4], [5.7, -1.2], [0.6, 0.5]],
                                           dtype=torch.float64) * 1e-151)
    x = torch.rand(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = ProfileConfig(model="vgg5", estimator="exact", variant="diag", share=share,
                        plot=False, progress=False, table=False)
    specs = resolve_splits(model, "all")
    plan = make_plan(cfg, model, specs, x[:1])
    assert bool(plan.sweep) == share
    recs = compute_batch(cfg, plan, specs, x, torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert len(recs) == 2 * len(specs)
    for r in recs:
        assert 0 < r["sigma_star"] < 1e-100 and r["sigma_star_status"] == SIGMA_NEGLIGIBLE
        assert r["sigma_star_low"] <= r["sigma_star"] <= r["sigma_star_high"]
