"""PNG plots of a k-fold evaluation: per-class ROC curves and reliability diagrams.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so no
display or global figure state is involved and plotting is safe in threads
and on headless machines.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uem_ich_jax.evaluate import metrics as metrics_lib


def _grid(count: int) -> tuple[Figure, list[Any]]:
  """Create a figure with `count` square panels, at most three per row, and hide the rest."""
  columns = min(count, 3)
  rows = math.ceil(count / columns)
  figure = Figure(figsize=(4.2 * columns, 4.0 * rows), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
  for unused in axes[count:]:
    unused.set_visible(False)
  return figure, axes[:count]


def _mean_std_text(stats: Mapping[str, Any] | None) -> str:
  if not stats or stats.get("mean") is None:
    return "n/a"
  text = f"{stats['mean']:.3f}"
  if stats.get("std") is not None:
    text += f" ± {stats['std']:.3f}"
  return text + f" (n={stats['n']})"


def plot_roc(
    path: str | pathlib.Path,
    folds: Sequence[tuple[int, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    auc_summary: Mapping[str, Mapping[str, Any]],
) -> pathlib.Path:
  """Draw one ROC panel per class, with one curve per fold, and save it as a PNG.

  Args:
    path: the PNG to write.
    folds: `(test fold, labels (n, k), probabilities (n, k))` per fold.
    class_names: the k class names, in column order.
    auc_summary: class name to its `summarize_folds` AUC entry
      (`{"mean", "std", "n"}`), shown in the legend as "mean ± sd".

  Returns:
    The path written.
  """
  figure, axes = _grid(len(class_names))
  for column, (name, axis) in enumerate(zip(class_names, axes)):
    for fold, labels, probabilities in folds:
      curve = metrics_lib.roc_curve(labels[:, column], probabilities[:, column])
      if curve is None:
        # Without positives or negatives the fold has no ROC curve, so the legend notes it.
        axis.plot([], [], " ", label=f"fold {fold}: AUC undefined")
        continue
      fpr, tpr, _ = curve
      auc = metrics_lib.roc_auc(labels[:, column], probabilities[:, column])
      axis.plot(fpr, tpr, linewidth=1.2, label=f"fold {fold}: AUC {auc:.3f}")
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8)
    axis.plot([], [], " ", label=f"AUC mean ± sd: {_mean_std_text(auc_summary.get(name))}")
    axis.set_title(name)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_aspect("equal")
    axis.legend(loc="lower right", fontsize=7)
  figure.suptitle("ROC per class, one curve per test fold")
  path = pathlib.Path(path)
  figure.savefig(path)
  return path


def plot_calibration(
    path: str | pathlib.Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    num_bins: int = 10,
) -> dict[str, float]:
  """Draw a reliability diagram per class, folds pooled, and save it as a PNG.

  Each panel shows the observed frequency of positives against the mean
  predicted probability in `num_bins` equal-width bins, the diagonal of a
  calibrated model, the bin counts, and the expected calibration error (ECE)
  in its title.

  Args:
    path: the PNG to write.
    labels: (n, k) labels of all test folds together.
    probabilities: (n, k) probabilities in the same order.
    class_names: the k class names, in column order.
    num_bins: equal-width probability bins.

  Returns:
    Class name to its ECE, and "pooled" to the ECE over all classes together.
  """
  figure, axes = _grid(len(class_names))
  errors = {}
  for column, (name, axis) in enumerate(zip(class_names, axes)):
    bins = metrics_lib.reliability_bins(labels[:, column], probabilities[:, column], num_bins)
    errors[name] = metrics_lib.expected_calibration_error(
        labels[:, column], probabilities[:, column], num_bins
    )
    edges = bins["edges"]
    filled = bins["count"] > 0
    axis.bar(
        edges[:-1], bins["count"] / bins["count"].sum(), width=np.diff(edges), align="edge",
        color="0.85", edgecolor="0.7", label="fraction of examples",
    )
    axis.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=0.8, label="calibrated")
    axis.plot(
        bins["mean_probability"][filled], bins["observed_frequency"][filled], marker="o",
        linewidth=1.2, label="observed",
    )
    axis.set_title(f"{name}: ECE {errors[name]:.3f}")
    axis.set_xlabel("mean predicted probability")
    axis.set_ylabel("fraction positive")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_aspect("equal")
    axis.legend(loc="upper left", fontsize=7)
  errors["pooled"] = metrics_lib.expected_calibration_error(labels, probabilities, num_bins)
  figure.suptitle(
      f"Reliability per class, test folds pooled ({num_bins} bins);"
      f" ECE over all classes {errors['pooled']:.3f}"
  )
  path = pathlib.Path(path)
  figure.savefig(path)
  return errors
