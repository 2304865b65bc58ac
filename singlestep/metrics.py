"""Task metrics, accumulated on the device in chunks and exact over the whole split.

Classification: loss, accuracy, macro precision / recall / F1 and the confusion matrix.
Regression: loss (MSE), MSE, MAE, R^2. Language modelling: loss, perplexity, bits per character.
Nothing syncs until :meth:`compute` is called.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from singlestep.data.base import Split, TokenSplit
from singlestep.losses import summed_loss

__all__ = ["MetricAccumulator", "classification_report", "evaluate"]


def classification_report(confusion: Tensor) -> dict[str, Any]:
    """Accuracy and macro precision / recall / F1 from a ``[true, pred]`` confusion matrix.

    A class with no predictions (or no true samples) scores 0 for precision (recall), as
    scikit-learn does with ``zero_division=0``; macro means average over all classes.
    """
    cm = confusion.double()
    tp = cm.diag()
    pred_totals, true_totals = cm.sum(0), cm.sum(1)
    precision = torch.where(pred_totals > 0, tp / pred_totals.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(true_totals > 0, tp / true_totals.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }


class MetricAccumulator:
    """Running sums for one split; ``update`` stays on the device, ``compute`` syncs once.

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
            self.abs_sum, self.y_sum, self.y_sq_sum, self.sq_sum = None, None, None, None

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
            y = targets.reshape(output.shape).double()
            err = output.double() - y
            per_out = lambda t: t.sum(0)  # noqa: E731  [out]
            if self.abs_sum is None:
                self.abs_sum, self.y_sum, self.y_sq_sum, self.sq_sum = (torch.zeros_like(y[0]) for _ in range(4))
            self.abs_sum += per_out(err.abs())
            self.sq_sum += per_out(err * err)
            self.y_sum += per_out(y)
            self.y_sq_sum += per_out(y * y)
            self.count += y.shape[0]

    def compute(self) -> dict[str, Any]:
        """Read the sums (one device sync) and return plain-Python metrics."""
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
        ss_tot = self.y_sq_sum - self.y_sum**2 / n  # per output
        r2_each = torch.where(ss_tot > 0, 1 - self.sq_sum / ss_tot.clamp_min(1e-300), torch.zeros_like(ss_tot))
        return {"loss": mse, "mse": mse, "mae": float(self.abs_sum.sum()) / (n * outputs), "r2": float(r2_each.mean())}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    task: str,
    *,
    num_classes: int | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Exact metrics over a whole split, computed in chunks of ``batch_size`` samples.

    For token splits every token is predicted once: windows that do not overlap are taken (every
    ``block_size / stride``-th window), so the figures are per token of the split.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(task, split.device, num_classes)
    if isinstance(split, TokenSplit):
        step = max(1, split.block_size // split.stride)
        starts = torch.arange(0, len(split), step, device=split.device)
        for i in range(0, starts.numel(), batch_size):
            x, y = split.get(starts[i : i + batch_size])
            acc.update(model(x), y)
    else:
        for x, y in split.chunks(batch_size):
            acc.update(model(x), y)
    model.train(was_training)
    return acc.compute()
