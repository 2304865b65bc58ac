"""Metrics against values computed independently: scikit-learn on the same numbers, or by hand.

The accumulator sees a split in chunks; every figure must equal the one-pass value, and R^2 must
survive targets whose mean dwarfs their spread (where ``sum(y**2) - sum(y)**2 / n`` cancels).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from singlestep.data.base import TensorSplit
from singlestep.metrics import MetricAccumulator, classification_report, evaluate

sk = pytest.importorskip("sklearn.metrics")  # the dev extra installs it

CPU = torch.device("cpu")


def _regression(y: torch.Tensor, pred: torch.Tensor, chunk: int | None = None) -> dict:
    """Metrics of ``pred`` against ``y`` fed to the accumulator ``chunk`` rows at a time."""
    acc = MetricAccumulator("regression", CPU)
    step = chunk or y.shape[0]
    for s in range(0, y.shape[0], step):
        acc.update(pred[s : s + step], y[s : s + step])
    return acc.compute()


def _classification(targets: torch.Tensor, logits: torch.Tensor, num_classes: int, chunk: int) -> dict:
    acc = MetricAccumulator("classification", CPU, num_classes)
    for s in range(0, targets.shape[0], chunk):
        acc.update(logits[s : s + chunk], targets[s : s + chunk])
    return acc.compute()


# ---- R^2, MSE, MAE -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(200,), (200, 1), (200, 3)], ids=["flat", "one-output", "three-outputs"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64], ids=["one-pass", "chunk1", "chunk7", "chunk64"])
def test_regression_matches_sklearn_on_random_data(shape, chunk):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    pred = y + torch.randn(shape, generator=g, dtype=torch.float64)
    got = _regression(y, pred, chunk)
    yn, pn = y.numpy(), pred.numpy()
    assert got["r2"] == pytest.approx(sk.r2_score(yn, pn), rel=1e-12)
    assert got["mse"] == pytest.approx(sk.mean_squared_error(yn, pn), rel=1e-12)
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(yn, pn), rel=1e-12)
    assert got["loss"] == got["mse"]
    assert 0.8 < got["r2"] < 0.95  # noise variance 1 against target variance 9


@pytest.mark.parametrize("chunk", [None, 100, 13], ids=["one-pass", "chunk100", "chunk13"])
def test_r2_survives_a_large_target_offset(chunk):
    """Targets 1e8 + N(0, 1): the old one-pass variance gave 0.978 in one pass and 0.0 in chunks."""
    g = torch.Generator().manual_seed(0)
    y = 1e8 + torch.randn(1000, 1, generator=g, dtype=torch.float64)
    pred = y + 0.3 * torch.randn(1000, 1, generator=g, dtype=torch.float64)
    expected = sk.r2_score(y.numpy(), pred.numpy())
    assert expected == pytest.approx(0.9107, abs=1e-4)
    # float64 holds 1e8 + N(0,1) to ~1.5e-8, so chunked merges agree to about 1e-10, not to the last bit.
    assert _regression(y, pred, chunk)["r2"] == pytest.approx(expected, rel=1e-9)


def test_r2_of_a_constant_target_predicted_exactly_is_one():
    y = torch.full((50, 1), 3.0, dtype=torch.float64)
    assert sk.r2_score(y.numpy(), y.numpy()) == 1.0
    assert _regression(y, y.clone())["r2"] == 1.0
    assert _regression(y, y.clone(), chunk=7)["r2"] == 1.0


def test_r2_of_a_constant_target_predicted_inexactly_is_zero():
    y = torch.full((50, 1), 3.0, dtype=torch.float64)
    pred = y + torch.linspace(-0.1, 0.1, 50, dtype=torch.float64).unsqueeze(1)
    assert sk.r2_score(y.numpy(), pred.numpy()) == 0.0
    assert _regression(y, pred)["r2"] == 0.0
    assert _regression(y, pred, chunk=7)["r2"] == 0.0


def test_r2_of_a_constant_whose_mean_rounds_is_still_zero():
    """0.1 * 1000 / 1000 != 0.1 in floats: the column is constant all the same and scores 0.0.

    scikit-learn computes a tiny non-zero variance here and reports about -5e29; we tell a
    constant column by its min and max, which do not round.
    """
    y = torch.full((1000,), 0.1, dtype=torch.float64)
    assert _regression(y, y + 0.01)["r2"] == 0.0
    assert _regression(y, y + 0.01, chunk=333)["r2"] == 0.0


@pytest.mark.parametrize("chunk", [None, 9], ids=["one-pass", "chunk9"])
def test_r2_multi_output_is_the_uniform_mean_of_per_output_scores(chunk):
    """Columns: a fitted random target, a constant predicted exactly, a constant predicted inexactly."""
    g = torch.Generator().manual_seed(2)
    n = 60
    y = torch.stack([torch.randn(n, generator=g, dtype=torch.float64), torch.full((n,), 2.0, dtype=torch.float64),
                     torch.full((n,), -4.0, dtype=torch.float64)], dim=1)  # fmt: skip
    pred = y.clone()
    pred[:, 0] += 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    pred[:, 2] += 0.25
    per_output = sk.r2_score(y.numpy(), pred.numpy(), multioutput="raw_values")
    assert per_output[1] == 1.0 and per_output[2] == 0.0 and 0.5 < per_output[0] < 0.9
    expected = sk.r2_score(y.numpy(), pred.numpy())  # uniform_average
    assert expected == pytest.approx(per_output.mean(), rel=1e-15)
    assert _regression(y, pred, chunk)["r2"] == pytest.approx(expected, rel=1e-12)


def test_r2_nan_prediction_is_nan():
    y = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    pred = y.clone()
    pred[1, 0] = float("nan")
    assert math.isnan(_regression(y, pred)["r2"])
    assert math.isnan(_regression(torch.ones(3, 1, dtype=torch.float64), pred)["r2"])  # constant target too


def test_evaluate_in_chunks_equals_one_pass_and_sklearn():
    """Through ``evaluate``: targets sorted, so the first chunks sit far from the overall mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(257, 4, generator=g)
    true_w = torch.randn(4, 2, generator=g)
    y = x @ true_w + 1000.0 + 0.1 * torch.randn(257, 2, generator=g)  # [257, 2]
    order = y[:, 0].argsort()
    x, y = x[order], y[order]
    split = TensorSplit(x, y)
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(true_w.T + 0.05)
        model.bias.fill_(1000.0)
    one = evaluate(model, split, "regression", batch_size=len(split))
    for batch_size in (1, 10, 100):
        chunked = evaluate(model, split, "regression", batch_size=batch_size)
        assert chunked.keys() == one.keys()
        for key in one:
            assert chunked[key] == pytest.approx(one[key], rel=1e-10), (batch_size, key)
    with torch.no_grad():
        pred = model(x).double().numpy()
    yn = y.double().numpy()
    assert one["r2"] == pytest.approx(sk.r2_score(yn, pred), rel=1e-10)
    assert one["mse"] == pytest.approx(sk.mean_squared_error(yn, pred), rel=1e-10)
    assert one["mae"] == pytest.approx(sk.mean_absolute_error(yn, pred), rel=1e-10)


# ---- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 17, 500], ids=["chunk1", "chunk17", "one-pass"])
def test_classification_matches_sklearn_with_absent_classes(chunk):
    """10 classes, of which targets use 0-5 and predictions 0-3 and 7: 6, 8 and 9 appear nowhere."""
    g = torch.Generator().manual_seed(4)
    n, num_classes = 500, 10
    targets = torch.randint(0, 6, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.6, targets.clamp_max(3), torch.randint(0, 4, (n,), generator=g))
    pred[::50] = 7  # a class predicted but never a target
    logits = torch.nn.functional.one_hot(pred, num_classes).double() * 5 + torch.rand(n, num_classes, generator=g)
    got = _classification(targets, logits, num_classes, chunk)
    t, p = targets.numpy(), pred.numpy()
    prf = sk.precision_recall_fscore_support(t, p, average="macro", zero_division=0)
    assert got["precision"] == pytest.approx(prf[0], rel=1e-12)
    assert got["recall"] == pytest.approx(prf[1], rel=1e-12)
    assert got["f1"] == pytest.approx(prf[2], rel=1e-12)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(t, p), rel=1e-12)
    assert got["confusion"] == sk.confusion_matrix(t, p, labels=list(range(num_classes))).tolist()
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-6)
    # The old convention averaged over all 10 classes; the present 7 give the same sums divided by 7.
    over_all = sk.precision_recall_fscore_support(
        t, p, labels=list(range(num_classes)), average="macro", zero_division=0
    )
    assert got["precision"] == pytest.approx(over_all[0] * 10 / 7, rel=1e-12)
    assert got["f1"] == pytest.approx(over_all[2] * 10 / 7, rel=1e-12)


def test_macro_averages_by_hand():
    """Class 0: 2 true, 1 found; class 1: 1 true, never predicted; class 2: predicted once, never
    true; class 3: absent everywhere (left out of the mean)."""
    cm = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    got = classification_report(cm)
    # precision: c0 1/2, c1 0 (never predicted), c2 0/1; recall: c0 1/2, c1 0/1, c2 0 (never true)
    assert got["precision"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert got["recall"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert got["f1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert got["accuracy"] == pytest.approx(1 / 3)
    t, p = [0, 0, 1], [0, 2, 0]
    prf = sk.precision_recall_fscore_support(t, p, average="macro", zero_division=0)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(prf[:3])


def test_macro_with_every_class_present_is_unchanged():
    cm = torch.tensor([[3, 1], [2, 4]])
    got = classification_report(cm)
    assert got["precision"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert got["recall"] == pytest.approx((3 / 4 + 4 / 6) / 2)


def test_empty_confusion_scores_zero():
    got = classification_report(torch.zeros(3, 3, dtype=torch.int64))
    assert got == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_sklearn_default_zero_division_agrees():
    """Our numbers equal sklearn's default ``zero_division="warn"`` (which returns 0 and warns)."""
    t, p = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    with pytest.warns(UserWarning):  # UndefinedMetricWarning
        default = sk.precision_recall_fscore_support(t, p, average="macro")
    cm = torch.from_numpy(sk.confusion_matrix(t, p, labels=list(range(5))))
    got = classification_report(cm)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(default[:3], rel=1e-12)
    assert got["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
