"""Fuzz round 6, command line: defects found by fuzzing, each test failing before its fix."""

from __future__ import annotations

import json

import torch


class _TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.c(x), x


def tuple_model():
    torch.manual_seed(0)
    return _TupleOut().eval()


def test_info_says_the_metrics_refuse_a_tuple_returning_model(capsys):
    """``info --model`` reported 'backend auto picks: engine' for a model every metric refuses
    (it returns a tuple): the report is of its first tensor, and now says so."""
    from fsinfo_fast.cli import main

    assert main(["info", "--model", "tests.test_fuzz_round6_cli:tuple_model", "--size", "8"]) == 0
    out = capsys.readouterr().out
    assert "returns a tuple, not a tensor" in out and "EncoderError" in out
    assert main(["info", "--json", "--model", "tests.test_fuzz_round6_cli:tuple_model",
                 "--size", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)["engine_model_report"]
    assert "returns a tuple" in rep["output_note"]
    # a model returning a tensor has no note
    assert main(["info", "--json", "--model", "vgg5", "--size", "32"]) == 0
    assert "output_note" not in json.loads(capsys.readouterr().out)["engine_model_report"]
