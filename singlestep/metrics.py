"""Task metrics, accumulated on the device in chunks and exact over the whole split.

Classification: loss, accuracy, macro precision / recall / F1 and the confusion matrix.
Regression: loss (MSE), MSE, MAE, R^2. Language modelling: loss, perplexity, bits per character.
Nothing syncs until :meth:`compute` is called.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from singlestep.data.base import Split, TokenSplit
from singlestep.losses import summed_loss

__all__ = ["MetricAccumulator", "classification_report", "evaluate"]


def classification_report(confusion: Tensor) -> dict[str, Any]:
    """Accuracy and macro precision / recall / F1 from a ``[true, pred]`` confusion matrix.

    Conventions (those of scikit-learn's ``precision_recall_fscore_support(average="macro")``
    with its default ``labels=None``):

    * The macro mean is over the classes *present*: those with at least one target or at least
      one prediction (the union of labels in ``y_true`` and ``y_pred``). A class that appears in
      neither is left out of the mean, not counted as 0.
    * A present class that is never predicted has precision 0; one that never occurs in the
      targets has recall 0; F1 is 0 when precision and recall are both 0. This is scikit-learn's
      ``zero_division="warn"`` result (0) without the warning.
    * An empty matrix gives 0 for every figure.

    Args:
        confusion: ``[num_classes, num_classes]`` counts, rows the true class, columns the prediction.

    Returns:
        ``accuracy``, ``precision``, ``recall`` and ``f1`` as floats.

    Example:
        >>> cm = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2: never seen nor predicted
        >>> {k: round(v, 4) for k, v in classification_report(cm).items()}
        {'accuracy': 0.75, 'precision': 0.8333, 'recall': 0.75, 'f1': 0.7333}
    """
    cm = confusion.double()
    tp = cm.diag()
    pred_totals, true_totals = cm.sum(0), cm.sum(1)
    precision = torch.where(pred_totals > 0, tp / pred_totals.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(true_totals > 0, tp / true_totals.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    present = ((pred_totals + true_totals) > 0).double()  # [C]; 1 for a class seen as target or prediction
    n_present = present.sum().clamp_min(1)

    def macro(per_class: Tensor) -> float:
        return float((per_class * present).sum() / n_present)

    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": macro(precision),
        "recall": macro(recall),
        "f1": macro(f1),
    }


class MetricAccumulator:
    """Running sums for one split; ``update`` stays on the device, ``compute`` syncs once.

    Regression keeps, per output and in float64, the sums of absolute and squared errors and the
    targets' running mean and sum of squared deviations (M2), merged chunk by chunk with Chan's
    parallel update: each chunk's M2 is taken about its own mean, so nothing cancels the way
    ``sum(y**2) - sum(y)**2 / n`` does when the mean is large against the spread. The targets'
    per-output min and max tell a constant column exactly, whatever rounding the mean suffers.

    Args:
        task: ``classification``, ``regression`` or ``lm``.
        num_classes: for the confusion matrix.
        device: where the sums live.
    """

    def __init__(self, task: str, device: torch.device, num_classes: int | None = None):
        self.task = task
        self.num_classes = num_classes
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss_sum, self.count = z(), z()
        if task == "classification":
            self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        elif task == "regression":
            # Per output, created with the first chunk (the output shape is known only then).
            self.abs_sum: Tensor | None = None
            self.sq_sum: Tensor | None = None  # residual sum of squares
            self.y_mean: Tensor | None = None
            self.y_m2: Tensor | None = None  # sum of squared deviations from the running mean
            self.y_min: Tensor | None = None
            self.y_max: Tensor | None = None

    @torch.no_grad()
    def update(self, output: Tensor, targets: Tensor) -> None:
        self.loss_sum += summed_loss(self.task, output, targets).double()
        if self.task == "classification":
            self.count += targets.numel()
            pred = output.argmax(-1)
            self.confusion += torch.bincount(targets * self.num_classes + pred, minlength=self.num_classes**2)
        elif self.task == "lm":
            self.count += targets.numel()
        else:
            self._update_regression(output, targets)

    def _update_regression(self, output: Tensor, targets: Tensor) -> None:
        y = targets.reshape(output.shape).double()  # [b, *out]
        nb = y.shape[0]
        if nb == 0:  # an empty chunk has no mean to merge
            return
        err = output.double() - y
        mean_b = y.mean(0)  # [*out]
        m2_b = (y - mean_b).square().sum(0)  # about the chunk's own mean: no cancellation
        self._merge_regression(nb, mean_b, m2_b, y.amin(0), y.amax(0), err.abs().sum(0), err.square().sum(0))

    def _merge_regression(self, nb: int | Tensor, mean_b: Tensor, m2_b: Tensor, min_b: Tensor, max_b: Tensor,
                          abs_b: Tensor, sq_b: Tensor) -> None:  # fmt: skip
        """Add a chunk's (or another accumulator's) count, mean, M2, min, max and error sums."""
        if self.y_mean is None:
            self.abs_sum, self.sq_sum = abs_b.clone(), sq_b.clone()
            self.y_mean, self.y_m2 = mean_b.clone(), m2_b.clone()
            self.y_min, self.y_max = min_b.clone(), max_b.clone()
            self.count += nb
            return
        self.abs_sum += abs_b
        self.sq_sum += sq_b
        # Chan et al.'s merge of (count, mean, M2) pairs; self.count stays a device tensor (no sync).
        total = self.count + nb
        delta = mean_b - self.y_mean
        self.y_mean += delta * (nb / total)
        self.y_m2 += m2_b + delta.square() * (self.count * nb / total)
        torch.minimum(self.y_min, min_b, out=self.y_min)
        torch.maximum(self.y_max, max_b, out=self.y_max)
        self.count.copy_(total)

    _REGRESSION = ("y_mean", "y_m2", "y_min", "y_max", "abs_sum", "sq_sum")

    def state(self) -> dict[str, Any]:
        """The sums as CPU tensors, to combine with other processes' (:meth:`merge`)."""
        names = ("loss_sum", "count", *(("confusion",) if self.task == "classification" else ()),
                 *(self._REGRESSION if self.task == "regression" else ()))  # fmt: skip
        return {name: None if getattr(self, name) is None else getattr(self, name).cpu() for name in names}

    def merge(self, other: dict[str, Any]) -> None:
        """Add another accumulator's :meth:`state` (another process's part of the split): the
        result is what one accumulator over both parts would hold, up to summation order."""
        to = lambda t: t.to(self.loss_sum.device)  # noqa: E731
        self.loss_sum += to(other["loss_sum"])
        if self.task == "regression":
            if other["y_mean"] is not None:
                self._merge_regression(to(other["count"]), *(to(other[k]) for k in self._REGRESSION[:4]),
                                       to(other["abs_sum"]), to(other["sq_sum"]))  # fmt: skip
            return
        self.count += to(other["count"])
        if self.task == "classification":
            self.confusion += to(other["confusion"])

    def compute(self) -> dict[str, Any]:
        """Read the sums (one device sync) and return plain-Python metrics.

        R^2 follows scikit-learn's ``r2_score`` with ``force_finite=True`` and
        ``multioutput="uniform_average"``: per output, ``1 - SS_res / SS_tot``; an output whose
        targets are all equal (``SS_tot == 0``) scores 1.0 when predicted exactly and 0.0
        otherwise; any output predicted exactly scores 1.0; the reported ``r2`` is the plain mean
        over outputs, where every element after the batch dimension counts as one output. MSE and
        MAE are means over samples and outputs. A NaN prediction gives a NaN R^2.
        """
        n = float(self.count)
        if n == 0:
            return {}
        if self.task == "classification":
            out = {"loss": float(self.loss_sum) / n, **classification_report(self.confusion.view(self.num_classes, -1))}
            out["confusion"] = self.confusion.view(self.num_classes, -1).tolist()
            return out
        if self.task == "lm":
            loss = float(self.loss_sum) / n
            return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_char": loss / math.log(2)}
        outputs = self.sq_sum.numel()
        mse = float(self.sq_sum.sum()) / (n * outputs)
        ss_res = self.sq_sum  # [*out]
        constant = (self.y_max == self.y_min) | (self.y_m2 <= 0)
        ss_tot = torch.where(constant, torch.ones_like(self.y_m2), self.y_m2)  # 1: only to keep the division finite
        r2_each = 1 - ss_res / ss_tot
        r2_each = torch.where(ss_res == 0, 1.0, r2_each)
        r2_each = torch.where(constant & (ss_res > 0), 0.0, r2_each)  # NaN residuals stay NaN
        return {"loss": mse, "mse": mse, "mae": float(self.abs_sum.sum()) / (n * outputs), "r2": float(r2_each.mean())}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    task: str,
    *,
    num_classes: int | None = None,
    batch_size: int = 1000,
    part: Callable[[int], tuple[int, int]] | None = None,
    combine: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Exact metrics over a whole split, computed in chunks of ``batch_size`` samples.

    For token splits every token is predicted once: windows that do not overlap are taken (every
    ``block_size / stride``-th window), so the figures are per token of the split.

    ``part`` and ``combine`` split the work between processes (``distributed.Dist``): ``part(n)``
    is this process's ``[start, stop)`` of the split's ``n`` samples (or windows), ``combine``
    exchanges every process's :meth:`MetricAccumulator.state`; the parts are merged in order.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(task, split.device, num_classes)
    if isinstance(split, TokenSplit):
        step = max(1, split.block_size // split.stride)
        starts = torch.arange(0, len(split), step, device=split.device)
        lo, hi = part(starts.numel()) if part else (0, starts.numel())
        for i in range(lo, hi, batch_size):
            x, y = split.get(starts[i : min(i + batch_size, hi)])
            acc.update(model(x), y)
    else:
        chunks = split.chunks(batch_size, *part(len(split))) if part else split.chunks(batch_size)
        for x, y in chunks:
            acc.update(model(x), y)
    model.train(was_training)
    if combine is not None:
        states = combine(acc.state())
        acc = MetricAccumulator(task, split.device, num_classes)
        for state in states:
            acc.merge(state)
    return acc.compute()
