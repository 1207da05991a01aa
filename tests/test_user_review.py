"""What a first-time user tried that failed quietly or late (helper 104's review).

A torchmetrics loop's ``update(preds, target)`` passed labels as the probe seeds (no error:
samples of every batch drew the same probes, and the aggregate counted them as independent);
``FSInfoGuard(None)`` and ``FSInfoMetric("not a model")`` constructed; an unbatched image said
only that the output "must keep the batch dimension first".
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsinfo_fast as ff


def _enc() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()


@pytest.mark.parametrize("cls", ["FSInfoMetric", "DFILMetric"])
def test_metric_update_refuses_labels_as_probe_seeds(cls):
    m = getattr(ff, cls)(_enc(), num_probes=4)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ff.InvalidInputTypeError, match="sample_ids=ids"):
        m.update(x, labels)
    with pytest.raises(ff.InvalidInputTypeError, match="update takes the batch only"):
        m(x, labels)
    m.update(x, sample_ids=torch.arange(4))  # (by keyword: seeds, as documented)
    m.update(x)
    assert int(m.count) == 8


@pytest.mark.parametrize("make", [lambda: ff.FSInfoGuard(None),
                                  lambda: ff.FSInfoMetric("not a model"),
                                  lambda: ff.DFILMetric(3)])
def test_constructors_refuse_what_is_no_encoder(make):
    with pytest.raises(ff.InvalidInputTypeError, match="encoder must be an nn.Module"):
        make()


def test_an_unbatched_image_is_told_to_add_the_batch_dimension():
    with pytest.raises(ff.EncoderError, match=r"pass x\.unsqueeze\(0\)"):
        ff.fsinfo(_enc(), torch.rand(3, 8, 8), 0.1)


def test_a_data_set_mean_converts_to_float():
    r = ff.fsinfo(_enc(), torch.rand(2, 3, 8, 8), 0.1, num_probes=4)
    agg = r.mean()
    assert float(agg) == agg.value and isinstance(float(agg), float)


def test_an_unreachable_calibrated_target_does_not_count_samples_it_does_not_have():
    """``calibrate`` on two samples said the calibrated sigma* "is inf for 1 of 1", as if the
    set had one sample: the statistic is one value."""
    guard = ff.FSInfoGuard(_enc(), target=-100.0)
    with pytest.raises(ff.InvalidInputError) as err:
        guard.calibrate(torch.rand(2, 3, 8, 8))
    assert "1 of 1" not in str(err.value) and "is inf" in str(err.value)
