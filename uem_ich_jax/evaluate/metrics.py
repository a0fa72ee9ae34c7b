"""Classification metrics: per-class AUC, thresholds chosen on validation, fold summaries.

Every function takes numpy arrays, computes in float64, and returns plain
Python numbers, so results go to JSON as they are. A metric that a split cannot
define (AUC without negatives, sensitivity without positives, and so on) is
`None`, never NaN and never a silent 0.

The honest procedure is the one `evaluate_classification` runs: thresholds come
from a validation split and are then applied, unchanged, to the test split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

# Threshold for a class whose validation split cannot rank anything (no positives
# for F1, no positives or no negatives for Youden's J). Such classes are flagged.
DEFAULT_THRESHOLD = 0.5
CRITERIA = ("f1", "youden")
# Metrics that `binary_metrics_at` returns as fractions. `evaluate_classification`
# averages each over the classes where it is defined.
RATE_METRICS = ("f1", "sensitivity", "specificity", "precision", "accuracy")


class MetricInputError(InputError):
  """Labels, probabilities or thresholds the metrics cannot use. The message names the argument."""


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """Per-class decision thresholds. A probability at or above the threshold predicts positive.

  Attributes:
    thresholds: float64 (k,).
    criterion: "f1" or "youden".
    criterion_values: the criterion reached on the split the thresholds were
      chosen on, None for defaulted classes.
    defaulted: True where the split could not define the criterion and the
      threshold is `DEFAULT_THRESHOLD`.
  """

  thresholds: np.ndarray
  criterion: str
  criterion_values: tuple[float | None, ...]
  defaulted: tuple[bool, ...]


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_labels(labels: Any, name: str) -> np.ndarray:
  array = np.asarray(labels)
  if array.dtype == bool:
    return array.astype(np.int64)
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise MetricInputError(f"{name} must be numeric 0/1 labels, got dtype {array.dtype}")
  bad = ~np.isin(array, (0, 1))
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise MetricInputError(
        f"{name} must contain only 0 and 1, found {array[index]} at index {index}"
    )
  return array.astype(np.int64)


def _check_probabilities(probabilities: Any, name: str) -> np.ndarray:
  array = np.asarray(probabilities)
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise MetricInputError(f"{name} must be numeric, got dtype {array.dtype}")
  array = array.astype(np.float64)
  bad = ~np.isfinite(array) | (array < 0.0) | (array > 1.0)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise MetricInputError(
        f"{name} must be finite and in [0, 1], found {array[index]} at index {index}."
        " Apply the sigmoid to logits before computing metrics"
    )
  return array


def _check_pair(
    labels: Any, probabilities: Any, *, prefix: str = "", matrix: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Check one split. With `matrix`, 1-D input is one class and becomes (n, 1)."""
  labels = _check_labels(labels, f"{prefix}labels")
  probabilities = _check_probabilities(probabilities, f"{prefix}probabilities")
  if labels.shape != probabilities.shape:
    raise MetricInputError(
        f"{prefix}labels have shape {labels.shape} but {prefix}probabilities have shape"
        f" {probabilities.shape}. The two shapes must be equal"
    )
  expected_ndim = (1, 2) if matrix else (1,)
  if labels.ndim not in expected_ndim:
    layout = "(examples, classes)" if matrix else "(examples,)"
    raise MetricInputError(f"{prefix}labels must be {layout}, got shape {labels.shape}")
  if labels.shape[0] == 0:
    raise MetricInputError(f"{prefix}labels are empty, but metrics need at least one example")
  if matrix and labels.ndim == 1:
    labels = labels[:, None]
    probabilities = probabilities[:, None]
  return labels, probabilities


def _check_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
  names = [str(name) for name in class_names]
  if len(names) != num_classes:
    raise MetricInputError(
        f"class_names has {len(names)} entries but the arrays have {num_classes} classes"
    )
  if len(set(names)) != len(names):
    raise MetricInputError(f"class_names must be unique, got {names}")
  return names


def _check_thresholds(thresholds: Any, num_classes: int) -> np.ndarray:
  if isinstance(thresholds, ThresholdChoice):
    thresholds = thresholds.thresholds
  array = np.asarray(thresholds, dtype=np.float64)
  if array.ndim == 0:
    array = np.full(num_classes, float(array))
  if array.shape != (num_classes,):
    raise MetricInputError(
        f"thresholds must be one number or one per class ({num_classes},), got shape {array.shape}"
    )
  if not np.all(np.isfinite(array)):
    raise MetricInputError(f"thresholds must be finite, got {array.tolist()}")
  return array


def _ratio(numerator: float, denominator: float) -> float | None:
  return None if denominator == 0 else float(numerator) / float(denominator)


def _mean_defined(values: Sequence[float | None]) -> float | None:
  defined = [value for value in values if value is not None]
  return float(np.mean(defined)) if defined else None


# ---------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------


def _check_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """Return 0/1 labels and float64 scores, both 1-D of one length, scores finite."""
  labels = _check_labels(labels, "labels")
  scores = np.asarray(scores, dtype=np.float64)
  if labels.shape != scores.shape or labels.ndim != 1:
    raise MetricInputError(
        f"labels and scores must be 1-D of one length, got {labels.shape} and {scores.shape}"
    )
  if not np.all(np.isfinite(scores)):
    raise MetricInputError("scores must be finite")
  return labels, scores


def roc_auc(labels: Any, scores: Any) -> float | None:
  """Return the exact ROC AUC of one binary problem, None without positives or negatives.

  This is the Mann-Whitney U statistic over the average ranks of the scores, so
  a positive and a negative with equal scores count one half, which matches the
  trapezoidal area of `sklearn.metrics.roc_auc_score` (checked against
  scikit-learn 1.9 in tests/test_metrics.py). Scores need not be
  probabilities, but they must be finite.
  """
  labels, scores = _check_scores(labels, scores)
  num_positive = int(labels.sum())
  num_negative = labels.size - num_positive
  if num_positive == 0 or num_negative == 0:
    return None
  ranks = scipy.stats.rankdata(scores, method="average")
  rank_sum = float(ranks[labels == 1].sum())
  u_statistic = rank_sum - num_positive * (num_positive + 1) / 2.0
  return u_statistic / (float(num_positive) * float(num_negative))


def per_class_auc(labels: Any, probabilities: Any, class_names: Sequence[str]) -> dict[str, Any]:
  """Compute the AUC of each class, their macro mean and the micro AUC.

  Returns:
    A dict with these keys:
      per_class: name to AUC, None where undefined.
      macro: the mean over the defined classes only, None when none is defined.
      n_defined, n_undefined, undefined_classes: which classes have no AUC.
      micro: the AUC of the flattened arrays, so every (example, class) pair
        is one decision.
  """
  labels, probabilities = _check_pair(labels, probabilities, matrix=True)
  names = _check_class_names(class_names, labels.shape[1])
  per_class = {
      name: roc_auc(labels[:, index], probabilities[:, index]) for index, name in enumerate(names)
  }
  undefined = [name for name, value in per_class.items() if value is None]
  if undefined:
    logger.warning(
        "AUC is undefined for %d of %d classes (no positives or no negatives): %s."
        " The macro AUC averages the other classes",
        len(undefined), len(names), ", ".join(undefined),
    )
  return {
      "per_class": per_class,
      "macro": _mean_defined(list(per_class.values())),
      "n_defined": len(names) - len(undefined),
      "n_undefined": len(undefined),
      "undefined_classes": undefined,
      "micro": roc_auc(labels.ravel(), probabilities.ravel()),
  }


# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------


def _counts_at(
    labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Return (true positives, false positives) when predicting `scores >= t`, for each t."""
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  # positives_from[i]: positives among the examples from sorted position i up.
  positives_from = np.append(np.cumsum(labels[order][::-1])[::-1], 0)
  first_positive = np.searchsorted(sorted_scores, thresholds, side="left")
  predicted_positive = scores.size - first_positive
  true_positive = positives_from[first_positive]
  return true_positive, predicted_positive - true_positive


def _criterion_values(
    criterion: str,
    true_positive: np.ndarray,
    false_positive: np.ndarray,
    num_positive: int,
    num_negative: int,
) -> np.ndarray:
  if criterion == "f1":
    false_negative = num_positive - true_positive
    return 2.0 * true_positive / (2.0 * true_positive + false_positive + false_negative)
  sensitivity = true_positive / num_positive
  specificity = (num_negative - false_positive) / num_negative
  return sensitivity + specificity - 1.0


def choose_thresholds(
    labels: Any,
    probabilities: Any,
    *,
    grid: Sequence[float] | np.ndarray | None = None,
    criterion: str = "f1",
    default_threshold: float = DEFAULT_THRESHOLD,
) -> ThresholdChoice:
  """Choose, per class, the threshold that maximises `criterion` on the given split.

  Pass a validation split, never the split you report on: a threshold tuned on
  the test split makes its F1 optimistic.

  Without `grid` the search is exact: every distinct score is tried as a
  threshold (predict positive at or above it), which covers every operating
  point. Among the best ones the lowest is taken, which favours sensitivity.
  The threshold returned lies midway between that score and the next lower
  distinct score (or 0), so it gives the same predictions on this split and
  does not sit on a training example. With a `grid`, the lowest grid value
  that reaches the maximum is returned as it is.

  A class whose split cannot define the criterion gets `default_threshold`
  and is flagged in `ThresholdChoice.defaulted`. F1 needs at least one
  positive, and Youden's J (sensitivity + specificity - 1) needs positives
  and negatives.
  """
  if criterion not in CRITERIA:
    raise MetricInputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  if not 0.0 <= default_threshold <= 1.0:
    raise MetricInputError(f"default_threshold must be in [0, 1], got {default_threshold}")
  labels, probabilities = _check_pair(labels, probabilities, matrix=True)
  grid_values = None
  if grid is not None:
    grid_values = np.unique(np.asarray(grid, dtype=np.float64))
    if grid_values.ndim != 1 or grid_values.size == 0:
      raise MetricInputError("grid must be a non-empty 1-D sequence of thresholds")
    if not np.all(np.isfinite(grid_values)):
      raise MetricInputError(f"grid must be finite, got {np.asarray(grid).tolist()}")

  thresholds, values, defaulted = [], [], []
  for index in range(labels.shape[1]):
    class_labels = labels[:, index]
    class_scores = probabilities[:, index]
    num_positive = int(class_labels.sum())
    num_negative = class_labels.size - num_positive
    if num_positive == 0 or (criterion == "youden" and num_negative == 0):
      thresholds.append(float(default_threshold))
      values.append(None)
      defaulted.append(True)
      continue

    candidates = np.unique(class_scores) if grid_values is None else grid_values
    true_positive, false_positive = _counts_at(class_labels, class_scores, candidates)
    scores = _criterion_values(criterion, true_positive, false_positive, num_positive, num_negative)
    # np.argmax returns the first maximum, and candidates are ascending.
    best = int(np.argmax(scores))
    threshold = float(candidates[best])
    if grid_values is None:
      lower = float(candidates[best - 1]) if best > 0 else 0.0
      threshold = (lower + threshold) / 2.0
    thresholds.append(threshold)
    values.append(float(scores[best]))
    defaulted.append(False)

  if any(defaulted):
    logger.warning(
        "%d of %d classes cannot define %s on this split, so their threshold is %.3g (columns %s)",
        sum(defaulted), len(defaulted), criterion, default_threshold,
        [index for index, flag in enumerate(defaulted) if flag],
    )
  return ThresholdChoice(
      thresholds=np.asarray(thresholds, dtype=np.float64),
      criterion=criterion,
      criterion_values=tuple(values),
      defaulted=tuple(defaulted),
  )


def binary_metrics_at(labels: Any, probabilities: Any, thresholds: Any) -> list[dict[str, Any]]:
  """Return, per class, the confusion counts and rates when predicting `probability >= threshold`.

  `thresholds` is one number, one per class, or a `ThresholdChoice`. Each entry
  has `threshold`, `tp`, `fp`, `tn`, `fn`, `f1`, `sensitivity`, `specificity`,
  `precision` and `accuracy`. A rate whose denominator is 0 is None. F1 is
  2 tp / (2 tp + fp + fn), so it is 0, not None, when positives exist and none
  is found, and None only without positives and without predicted positives.
  """
  labels, probabilities = _check_pair(labels, probabilities, matrix=True)
  thresholds = _check_thresholds(thresholds, labels.shape[1])
  predicted = probabilities >= thresholds[None, :]
  actual = labels == 1
  metrics = []
  for index in range(labels.shape[1]):
    tp = int(np.sum(predicted[:, index] & actual[:, index]))
    fp = int(np.sum(predicted[:, index] & ~actual[:, index]))
    fn = int(np.sum(~predicted[:, index] & actual[:, index]))
    tn = int(np.sum(~predicted[:, index] & ~actual[:, index]))
    metrics.append({
        "threshold": float(thresholds[index]),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    })
  return metrics


# ---------------------------------------------------------------------------
# One split, several folds
# ---------------------------------------------------------------------------


def evaluate_classification(
    test_labels: Any,
    test_probs: Any,
    validation_labels: Any,
    validation_probs: Any,
    class_names: Sequence[str],
    *,
    criterion: str = "f1",
    grid: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
  """Evaluate one test split with thresholds chosen on its validation split.

  AUC comes from the test split. Thresholds come from the validation split
  (`choose_thresholds`) and the threshold metrics are then measured on the
  test split. The result contains only dicts, lists, str, bool, int, float and
  None, so `json.dumps(result, allow_nan=False)` works.

  Returns:
    A dict with these keys:
      class_names, n_test, n_validation, threshold_criterion.
      auc: the output of `per_class_auc` without `per_class`.
      classes: name to that class's `auc`, `threshold_defaulted`,
        `validation_criterion`, `n_positive`, `prevalence` (test),
        `validation_prevalence` and the `binary_metrics_at` entries.
      macro: each rate metric averaged over the classes where it is defined,
        with the number of those classes in `n_classes_<metric>`.
  """
  test_labels, test_probs = _check_pair(test_labels, test_probs, prefix="test_", matrix=True)
  validation_labels, validation_probs = _check_pair(
      validation_labels, validation_probs, prefix="validation_", matrix=True
  )
  if test_labels.shape[1] != validation_labels.shape[1]:
    raise MetricInputError(
        f"test arrays have {test_labels.shape[1]} classes but validation arrays have"
        f" {validation_labels.shape[1]}"
    )
  names = _check_class_names(class_names, test_labels.shape[1])

  auc = per_class_auc(test_labels, test_probs, names)
  choice = choose_thresholds(validation_labels, validation_probs, grid=grid, criterion=criterion)
  at_threshold = binary_metrics_at(test_labels, test_probs, choice)

  classes = {}
  for index, name in enumerate(names):
    classes[name] = {
        "auc": auc["per_class"][name],
        "threshold_defaulted": choice.defaulted[index],
        "validation_criterion": choice.criterion_values[index],
        "n_positive": int(test_labels[:, index].sum()),
        "prevalence": float(test_labels[:, index].mean()),
        "validation_prevalence": float(validation_labels[:, index].mean()),
        **at_threshold[index],
    }

  macro = {}
  for metric in RATE_METRICS:
    values = [entry[metric] for entry in at_threshold]
    macro[metric] = _mean_defined(values)
    macro[f"n_classes_{metric}"] = sum(value is not None for value in values)

  return {
      "class_names": names,
      "n_test": int(test_labels.shape[0]),
      "n_validation": int(validation_labels.shape[0]),
      "threshold_criterion": criterion,
      "auc": {key: value for key, value in auc.items() if key != "per_class"},
      "classes": classes,
      "macro": macro,
  }


def _summarize_values(values: list[Any]) -> dict[str, Any] | None:
  """Summarise one leaf over folds: numbers give mean/std, flags give a count."""
  present = [value for value in values if value is not None]
  if present and all(isinstance(value, bool) for value in present):
    return {"n_true": sum(present), "n": len(present)}
  if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present):
    return None
  numbers = [float(value) for value in present if not math.isnan(float(value))]
  return {
      "mean": float(np.mean(numbers)) if numbers else None,
      # Sample standard deviation (ddof=1), so it needs two contributing folds.
      "std": float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None,
      "n": len(numbers),
  }


def _summarize_tree(nodes: list[Any]) -> dict[str, Any] | None:
  if all(isinstance(node, Mapping) for node in nodes):
    keys = list(dict.fromkeys(key for node in nodes for key in node))
    summary = {}
    for key in keys:
      child = _summarize_tree([node.get(key) for node in nodes])
      if child is not None:
        summary[key] = child
    return summary
  if any(isinstance(node, (Mapping, str, list, tuple)) for node in nodes):
    return None  # Names and lists (class names, undefined classes) are not averaged.
  return _summarize_values(nodes)


def summarize_folds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Summarise `evaluate_classification` results of several folds.

  Every number in the results becomes `{"mean", "std", "n"}`: its mean and
  sample standard deviation over the folds where it is defined, and `n`, the
  number of those folds. `std` is None when fewer than two folds contribute and
  `mean` is None when none does. Flags (`threshold_defaulted`) become
  `{"n_true", "n"}`. The nesting follows the results, with `n_folds` and
  `class_names` added at the top.
  """
  if not results:
    raise MetricInputError("summarize_folds needs at least one fold result")
  names = list(results[0].get("class_names", []))
  for fold, result in enumerate(results):
    if list(result.get("class_names", [])) != names:
      raise MetricInputError(
          f"fold {fold} has classes {result.get('class_names')} but fold 0 has {names}."
          " Folds must use the same classes in the same order"
      )
  summary = _summarize_tree(list(results)) or {}
  return {"n_folds": len(results), "class_names": names, **summary}


# ---------------------------------------------------------------------------
# Console table
# ---------------------------------------------------------------------------


def _format_number(value: Any, decimals: int = 3, num_folds: int | None = None) -> str:
  """Format a number, or a fold summary's `{"mean", "std", "n"}` as "mean ± std"."""
  if value is None:
    return "n/a"
  if not isinstance(value, Mapping):
    return f"{value:.{decimals}f}"
  mean, std = value["mean"], value["std"]
  if mean is None:
    return "n/a"
  text = f"{mean:.{decimals}f}"
  if std is not None:
    text += f" ± {std:.{decimals}f}"
  if num_folds is not None and value["n"] < num_folds:
    text += f" (n={value['n']})"  # Some folds could not define this value.
  return text


def format_table(result: Mapping[str, Any]) -> str:
  """Format an `evaluate_classification` or `summarize_folds` result as a text table.

  Undefined values print as "n/a". For a fold summary each cell is
  "mean ± std" over the folds where the value is defined, followed by "(n=...)"
  when some folds could not define it.
  """
  is_summary = "n_folds" in result
  num_folds = result["n_folds"] if is_summary else None
  header = ("class", "AUC", "F1", "sensitivity", "specificity", "threshold", "positives")
  rows = []
  for name in result["class_names"]:
    entry = result["classes"][name]
    if is_summary:
      positives = _format_number(entry["n_positive"], decimals=1)
    else:
      positives = f"{entry['n_positive']}/{result['n_test']}"
      if entry["threshold_defaulted"]:
        positives += " (default threshold)"
    rows.append((
        name,
        _format_number(entry["auc"], num_folds=num_folds),
        _format_number(entry["f1"], num_folds=num_folds),
        _format_number(entry["sensitivity"], num_folds=num_folds),
        _format_number(entry["specificity"], num_folds=num_folds),
        _format_number(entry["threshold"], num_folds=num_folds),
        positives,
    ))
  macro = result["macro"]
  rows.append((
      "macro",
      _format_number(result["auc"]["macro"], num_folds=num_folds),
      _format_number(macro["f1"], num_folds=num_folds),
      _format_number(macro["sensitivity"], num_folds=num_folds),
      _format_number(macro["specificity"], num_folds=num_folds),
      "",
      "",
  ))

  widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
  lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
  lines.append("  ".join("-" * width for width in widths))
  for row in rows:
    lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

  if is_summary:
    lines.append(f"folds: {result['n_folds']}; micro AUC {_format_number(result['auc']['micro'])}")
  else:
    auc = result["auc"]
    note = f"micro AUC {_format_number(auc['micro'])}; test n={result['n_test']},"
    note += f" validation n={result['n_validation']}"
    if auc["undefined_classes"]:
      note += f"; AUC undefined for {', '.join(auc['undefined_classes'])}"
    lines.append(note)
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# ROC curves and calibration
# ---------------------------------------------------------------------------


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """Return the ROC curve of one binary problem, None without positives or negatives.

  Returns `(fpr, tpr, thresholds)`, float64, one point per distinct score
  (predict positive at or above the threshold), in order of decreasing
  threshold, and starting at (0, 0) with threshold +inf. The trapezoidal
  area under it equals `roc_auc`. Unlike `sklearn.metrics.roc_curve`, no
  collinear point is dropped.
  """
  labels, scores = _check_scores(labels, scores)
  num_positive = int(labels.sum())
  num_negative = labels.size - num_positive
  if num_positive == 0 or num_negative == 0:
    return None
  thresholds = np.unique(scores)[::-1]
  true_positive, false_positive = _counts_at(labels, scores, thresholds)
  fpr = np.concatenate([[0.0], false_positive / num_negative])
  tpr = np.concatenate([[0.0], true_positive / num_positive])
  return fpr, tpr, np.concatenate([[np.inf], thresholds])


def reliability_bins(labels: Any, probabilities: Any, num_bins: int = 10) -> dict[str, np.ndarray]:
  """Bin predictions into `num_bins` equal-width probability bins, the last one closed at 1.

  Pass one class (1-D arrays) or several (n, k), which are pooled. Returns
  `edges` (num_bins + 1,), and per bin `count`, `mean_probability` and
  `observed_frequency` (the fraction of positives), both NaN for empty bins.
  """
  if num_bins < 1:
    raise MetricInputError(f"num_bins must be at least 1, got {num_bins}")
  labels, probabilities = _check_pair(labels, probabilities, matrix=True)
  labels, probabilities = labels.ravel(), probabilities.ravel()
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # A probability of exactly 1 belongs to the last bin, not to a bin of its own.
  index = np.minimum((probabilities * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(index, minlength=num_bins)
  summed = np.bincount(index, weights=probabilities, minlength=num_bins)
  positives = np.bincount(index, weights=labels.astype(np.float64), minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_probability = np.where(count > 0, summed / count, np.nan)
    observed_frequency = np.where(count > 0, positives / count, np.nan)
  return {
      "edges": edges,
      "count": count,
      "mean_probability": mean_probability,
      "observed_frequency": observed_frequency,
  }


def expected_calibration_error(labels: Any, probabilities: Any, num_bins: int = 10) -> float:
  """Return the expected calibration error over `reliability_bins`.

  ECE = sum over bins of (bin count / n) * |observed frequency - mean
  probability|, in [0, 1]. Several classes (n, k) are pooled.
  """
  bins = reliability_bins(labels, probabilities, num_bins)
  filled = bins["count"] > 0
  gaps = np.abs(bins["observed_frequency"][filled] - bins["mean_probability"][filled])
  return float(np.sum(bins["count"][filled] * gaps) / np.sum(bins["count"]))


# ---------------------------------------------------------------------------
# Flat results and Markdown
# ---------------------------------------------------------------------------


def flatten_result(result: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | None]:
  """Map the numeric leaves of a nested result to "a/b/c" paths, in the result's order.

  Flags become 0 or 1. None stays None (an undefined metric). Strings and
  lists (names, undefined classes) are left out.
  """
  flat: dict[str, float | int | None] = {}
  for key, value in result.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_result(value, prefix=f"{path}/"))
    elif isinstance(value, bool):
      flat[path] = int(value)
    elif value is None or isinstance(value, (int, float)):
      flat[path] = value
  return flat


def format_summary_cell(value: Any, decimals: int = 3, num_folds: int | None = None) -> str:
  """Format a number, or a `summarize_folds` leaf `{"mean", "std", "n"}` as "mean ± std".

  "(n=...)" follows when `num_folds` is given and fewer folds define the value.
  None and undefined means print as "n/a".
  """
  return _format_number(value, decimals=decimals, num_folds=num_folds)


def format_markdown_table(summary: Mapping[str, Any]) -> str:
  """Format a `summarize_folds` summary of classification results as a Markdown table.

  One row per class and one for the macro means. Each cell is "mean ± std"
  over the folds that define it (sample standard deviation), with "(n=...)"
  when some folds could not define it.
  """
  num_folds = summary["n_folds"]
  header = ("class", "AUC", "F1", "sensitivity", "specificity", "threshold", "positives")
  rows = []
  for name in summary["class_names"]:
    entry = summary["classes"][name]
    rows.append((
        name,
        *(format_summary_cell(entry[key], num_folds=num_folds)
          for key in ("auc", "f1", "sensitivity", "specificity", "threshold")),
        format_summary_cell(entry["n_positive"], decimals=1),
    ))
  macro = summary["macro"]
  rows.append((
      "macro",
      format_summary_cell(summary["auc"]["macro"], num_folds=num_folds),
      *(format_summary_cell(macro[key], num_folds=num_folds)
        for key in ("f1", "sensitivity", "specificity")),
      "",
      "",
  ))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)
