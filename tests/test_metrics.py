"""Classification metrics against scikit-learn, undefined classes, validation thresholds."""

import json
import logging

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from uem_ich_jax.errors import InputError
from uem_ich_jax.evaluate import (
    DEFAULT_THRESHOLD,
    MetricInputError,
    binary_metrics_at,
    choose_thresholds,
    evaluate_classification,
    format_table,
    per_class_auc,
    roc_auc,
    summarize_folds,
)

NAMES = ("any", "epidural", "intraparenchymal")


def _random_split(seed, n=200, num_classes=3, decimals=None, shift=1.0):
  """Labels with informative, optionally rounded (tied) probabilities."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, num_classes)) < 0.3).astype(np.int64)
  logits = rng.normal(size=(n, num_classes)) + shift * labels
  probabilities = 1.0 / (1.0 + np.exp(-logits))
  if decimals is not None:
    probabilities = np.round(probabilities, decimals)
  return labels, probabilities


def _json_has_no_nan(value):
  text = json.dumps(value, allow_nan=False)
  return "NaN" not in text


# roc_auc ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_roc_auc_matches_sklearn(seed, decimals):
  labels, probabilities = _random_split(seed, n=150, num_classes=1, decimals=decimals)
  expected = sk_metrics.roc_auc_score(labels[:, 0], probabilities[:, 0])
  assert roc_auc(labels[:, 0], probabilities[:, 0]) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_ties_count_half():
  # One positive and one negative with the same score: area 0.5 exactly.
  assert roc_auc([0, 1], [0.4, 0.4]) == 0.5
  assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


def test_roc_auc_perfect_and_reversed():
  assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
  assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def test_roc_auc_single_class_is_none():
  assert roc_auc([0, 0, 0], [0.1, 0.2, 0.3]) is None
  assert roc_auc([1, 1], [0.1, 0.2]) is None


def test_roc_auc_accepts_bool_labels():
  assert roc_auc(np.array([False, True]), [0.2, 0.7]) == 1.0


# per_class_auc ---------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
def test_per_class_auc_matches_sklearn(decimals):
  labels, probabilities = _random_split(3, decimals=decimals)
  result = per_class_auc(labels, probabilities, NAMES)
  for index, name in enumerate(NAMES):
    expected = sk_metrics.roc_auc_score(labels[:, index], probabilities[:, index])
    assert result["per_class"][name] == pytest.approx(expected, abs=1e-12)
  assert result["macro"] == pytest.approx(
      sk_metrics.roc_auc_score(labels, probabilities, average="macro"), abs=1e-12
  )
  assert result["micro"] == pytest.approx(
      sk_metrics.roc_auc_score(labels, probabilities, average="micro"), abs=1e-12
  )
  assert result["n_defined"] == 3
  assert result["undefined_classes"] == []


def test_per_class_auc_undefined_class(caplog):
  labels, probabilities = _random_split(4)
  labels[:, 1] = 0
  with caplog.at_level(logging.WARNING):
    result = per_class_auc(labels, probabilities, NAMES)
  assert result["per_class"]["epidural"] is None
  assert result["undefined_classes"] == ["epidural"]
  assert result["n_undefined"] == 1
  assert result["n_defined"] == 2
  defined = [sk_metrics.roc_auc_score(labels[:, i], probabilities[:, i]) for i in (0, 2)]
  assert result["macro"] == pytest.approx(np.mean(defined), abs=1e-12)
  assert "epidural" in caplog.text


def test_per_class_auc_all_undefined():
  labels = np.zeros((5, 3), dtype=int)
  probabilities = np.full((5, 3), 0.2)
  result = per_class_auc(labels, probabilities, NAMES)
  assert result["macro"] is None
  assert result["micro"] is None
  assert result["n_undefined"] == 3


# choose_thresholds -----------------------------------------------------------


def _best_f1_by_brute_force(labels, scores):
  """The largest F1 over thresholds at every score, between scores, and beyond both ends."""
  unique = np.unique(scores)
  candidates = np.concatenate([unique, (unique[1:] + unique[:-1]) / 2, [0.0, 1.0 + 1e-9]])
  predicted = scores[None, :] >= candidates[:, None]
  actual = labels[None, :] == 1
  tp = np.sum(predicted & actual, axis=1)
  fp = np.sum(predicted & ~actual, axis=1)
  fn = np.sum(~predicted & actual, axis=1)
  return np.max(2 * tp / (2 * tp + fp + fn))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_choose_thresholds_reaches_best_f1(seed, decimals):
  labels, probabilities = _random_split(seed + 10, decimals=decimals)
  choice = choose_thresholds(labels, probabilities)
  for index in range(labels.shape[1]):
    threshold = choice.thresholds[index]
    predicted = (probabilities[:, index] >= threshold).astype(int)
    achieved = sk_metrics.f1_score(labels[:, index], predicted)
    assert achieved == pytest.approx(choice.criterion_values[index], abs=1e-12)
    assert achieved == pytest.approx(
        _best_f1_by_brute_force(labels[:, index], probabilities[:, index]), abs=1e-12
    )
    assert not choice.defaulted[index]


def test_choose_thresholds_lowest_maximum_midway():
  labels = np.array([1, 0, 1, 0])
  scores = np.array([0.9, 0.7, 0.3, 0.1])
  # At 0.3: tp=2, fp=1 -> F1=0.8. At 0.7: tp=1, fp=1, fn=1 -> 0.5. At 0.9: 2/3. At 0.1: 2/3.
  choice = choose_thresholds(labels, scores)
  assert choice.criterion_values[0] == pytest.approx(0.8)
  # Midway between the chosen score 0.3 and the next lower score 0.1.
  assert choice.thresholds[0] == pytest.approx(0.2)


def test_choose_thresholds_plateau_takes_lowest():
  # Predict-all (F1 = 2*2/(4+2) = 2/3) ties with threshold 0.9 (tp=1, fn=1: 2/3).
  labels = np.array([1, 0, 0, 1])
  scores = np.array([0.9, 0.8, 0.6, 0.2])
  choice = choose_thresholds(labels, scores)
  assert choice.criterion_values[0] == pytest.approx(2 / 3)
  assert choice.thresholds[0] == pytest.approx(0.1)  # Midway between 0 and the lowest score.


def test_choose_thresholds_on_grid():
  labels = np.array([1, 0, 1, 0])
  scores = np.array([0.9, 0.7, 0.3, 0.1])
  choice = choose_thresholds(labels, scores, grid=[0.5, 0.25, 0.75, 0.05])
  # 0.05 predicts all positive (F1 2/3); 0.25 is the lowest grid value with the best F1.
  assert choice.thresholds[0] == 0.25
  assert choice.criterion_values[0] == pytest.approx(0.8)


def test_choose_thresholds_without_positives_defaults(caplog):
  labels, probabilities = _random_split(5)
  labels[:, 2] = 0
  with caplog.at_level(logging.WARNING):
    choice = choose_thresholds(labels, probabilities)
  assert choice.defaulted == (False, False, True)
  assert choice.thresholds[2] == DEFAULT_THRESHOLD
  assert choice.criterion_values[2] is None
  assert "cannot define f1" in caplog.text


def test_choose_thresholds_youden_matches_roc_curve():
  labels, probabilities = _random_split(6, num_classes=1)
  choice = choose_thresholds(labels, probabilities, criterion="youden")
  fpr, tpr, _ = sk_metrics.roc_curve(labels[:, 0], probabilities[:, 0])
  assert choice.criterion_values[0] == pytest.approx(np.max(tpr - fpr), abs=1e-12)


def test_choose_thresholds_youden_needs_negatives():
  choice = choose_thresholds(np.ones((4, 1)), np.full((4, 1), 0.3), criterion="youden")
  assert choice.defaulted == (True,)


def test_choose_thresholds_rejects_unknown_criterion():
  with pytest.raises(MetricInputError, match="criterion"):
    choose_thresholds([0, 1], [0.1, 0.9], criterion="accuracy")


# binary_metrics_at -----------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
def test_binary_metrics_match_sklearn(decimals):
  labels, probabilities = _random_split(7, decimals=decimals)
  thresholds = np.array([0.5, 0.4, 0.6])
  results = binary_metrics_at(labels, probabilities, thresholds)
  for index, entry in enumerate(results):
    predicted = (probabilities[:, index] >= thresholds[index]).astype(int)
    tn, fp, fn, tp = sk_metrics.confusion_matrix(labels[:, index], predicted, labels=[0, 1]).ravel()
    assert (entry["tp"], entry["fp"], entry["tn"], entry["fn"]) == (tp, fp, tn, fn)
    assert entry["f1"] == pytest.approx(sk_metrics.f1_score(labels[:, index], predicted))
    assert entry["sensitivity"] == pytest.approx(
        sk_metrics.recall_score(labels[:, index], predicted)
    )
    assert entry["specificity"] == pytest.approx(
        sk_metrics.recall_score(labels[:, index], predicted, pos_label=0)
    )
    assert entry["precision"] == pytest.approx(
        sk_metrics.precision_score(labels[:, index], predicted)
    )
    assert entry["accuracy"] == pytest.approx(
        sk_metrics.accuracy_score(labels[:, index], predicted)
    )
    assert entry["threshold"] == thresholds[index]


def test_binary_metrics_threshold_is_inclusive():
  entry = binary_metrics_at([1, 0], [0.5, 0.49], 0.5)[0]
  assert entry["tp"] == 1
  assert entry["fp"] == 0


def test_binary_metrics_undefined_are_none():
  # No positives and nothing predicted positive: only specificity and accuracy exist.
  entry = binary_metrics_at([0, 0, 0], [0.1, 0.2, 0.3], 0.5)[0]
  assert entry["sensitivity"] is None
  assert entry["precision"] is None
  assert entry["f1"] is None
  assert entry["specificity"] == 1.0
  assert entry["accuracy"] == 1.0
  # Positives but none found: F1 and sensitivity are 0, precision is undefined.
  entry = binary_metrics_at([1, 0], [0.1, 0.2], 0.5)[0]
  assert entry["f1"] == 0.0
  assert entry["sensitivity"] == 0.0
  assert entry["precision"] is None
  # No negatives: specificity is undefined.
  entry = binary_metrics_at([1, 1], [0.9, 0.2], 0.5)[0]
  assert entry["specificity"] is None
  assert entry["sensitivity"] == 0.5


# Input checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, probabilities, message",
    [
        ([[0, 1]], [[0.1, 0.2], [0.3, 0.4]], "shape"),
        ([[0, 2]], [[0.1, 0.2]], "only 0 and 1"),
        ([[0, 0.5]], [[0.1, 0.2]], "only 0 and 1"),
        ([[0, 1]], [[0.1, np.nan]], "finite and in"),
        ([[0, 1]], [[0.1, 1.5]], "in \\[0, 1\\]"),
        ([[0, 1]], [[-0.1, 0.5]], "in \\[0, 1\\]"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "empty"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "examples, classes"),
        ([["a", "b"]], [[0.1, 0.2]], "numeric"),
    ],
)
def test_bad_input_raises(labels, probabilities, message):
  with pytest.raises(MetricInputError, match=message):
    binary_metrics_at(labels, probabilities, 0.5)


def test_metric_input_error_is_input_error():
  assert issubclass(MetricInputError, InputError)


def test_bad_class_names_raise():
  labels, probabilities = _random_split(8)
  with pytest.raises(MetricInputError, match="class_names has 2"):
    per_class_auc(labels, probabilities, ["any", "epidural"])
  with pytest.raises(MetricInputError, match="unique"):
    per_class_auc(labels, probabilities, ["any", "any", "epidural"])


def test_bad_thresholds_raise():
  labels, probabilities = _random_split(8)
  with pytest.raises(MetricInputError, match="one per class"):
    binary_metrics_at(labels, probabilities, [0.5, 0.5])
  with pytest.raises(MetricInputError, match="finite"):
    binary_metrics_at(labels, probabilities, [0.5, np.inf, 0.5])


def test_evaluate_rejects_class_count_mismatch():
  labels, probabilities = _random_split(8)
  with pytest.raises(MetricInputError, match="validation arrays have 2"):
    evaluate_classification(labels, probabilities, labels[:, :2], probabilities[:, :2], NAMES)


# evaluate_classification -----------------------------------------------------


def test_evaluate_uses_validation_thresholds():
  # Validation and test differ in calibration, so each split prefers another threshold.
  validation_labels, validation_probs = _random_split(20, n=300, shift=2.5)
  test_labels, test_probs = _random_split(21, n=300, shift=1.0)
  validation_probs = validation_probs**0.5  # Shifted up: the validation optimum moves up.

  result = evaluate_classification(
      test_labels, test_probs, validation_labels, validation_probs, NAMES
  )
  from_validation = choose_thresholds(validation_labels, validation_probs)
  from_test = choose_thresholds(test_labels, test_probs)
  for index, name in enumerate(NAMES):
    entry = result["classes"][name]
    assert entry["threshold"] == from_validation.thresholds[index]
    assert entry["threshold"] != pytest.approx(from_test.thresholds[index], abs=1e-3)
    predicted = (test_probs[:, index] >= entry["threshold"]).astype(int)
    assert entry["f1"] == pytest.approx(sk_metrics.f1_score(test_labels[:, index], predicted))
    # Tuning on the test split would have reported a higher, optimistic F1.
    assert from_test.criterion_values[index] > entry["f1"]
    assert entry["auc"] == pytest.approx(
        sk_metrics.roc_auc_score(test_labels[:, index], test_probs[:, index])
    )
  assert result["n_test"] == 300
  assert result["n_validation"] == 300


def test_evaluate_prevalence_and_counts():
  test_labels, test_probs = _random_split(22, n=120)
  validation_labels, validation_probs = _random_split(23, n=80)
  result = evaluate_classification(
      test_labels, test_probs, validation_labels, validation_probs, NAMES
  )
  for index, name in enumerate(NAMES):
    entry = result["classes"][name]
    assert entry["prevalence"] == pytest.approx(test_labels[:, index].mean())
    assert entry["validation_prevalence"] == pytest.approx(validation_labels[:, index].mean())
    assert entry["n_positive"] == int(test_labels[:, index].sum())
    assert entry["tp"] + entry["fn"] == entry["n_positive"]
  macro_f1 = np.mean([result["classes"][name]["f1"] for name in NAMES])
  assert result["macro"]["f1"] == pytest.approx(macro_f1)
  assert result["macro"]["n_classes_f1"] == 3


def test_evaluate_undefined_class_is_json_without_nan():
  test_labels, test_probs = _random_split(24, n=60)
  validation_labels, validation_probs = _random_split(25, n=60)
  test_labels[:, 1] = 0  # No test positives: AUC and sensitivity undefined.
  validation_labels[:, 1] = 0  # No validation positives: default threshold.
  result = evaluate_classification(
      test_labels, test_probs.astype(np.float32), validation_labels, validation_probs, NAMES
  )
  entry = result["classes"]["epidural"]
  assert entry["auc"] is None
  assert entry["sensitivity"] is None
  assert entry["threshold_defaulted"] is True
  assert entry["threshold"] == DEFAULT_THRESHOLD
  assert entry["validation_criterion"] is None
  assert result["auc"]["undefined_classes"] == ["epidural"]
  assert result["macro"]["n_classes_sensitivity"] == 2
  assert _json_has_no_nan(result)
  assert json.loads(json.dumps(result)) == result


# summarize_folds -------------------------------------------------------------


def _fold_results(num_folds=3, undefined_fold=None):
  results = []
  for fold in range(num_folds):
    test_labels, test_probs = _random_split(100 + fold, n=80)
    validation_labels, validation_probs = _random_split(200 + fold, n=80)
    if fold == undefined_fold:
      test_labels[:, 1] = 0
    results.append(
        evaluate_classification(test_labels, test_probs, validation_labels, validation_probs, NAMES)
    )
  return results


def test_summarize_folds_mean_and_sample_std():
  results = _fold_results()
  summary = summarize_folds(results)
  assert summary["n_folds"] == 3
  assert summary["class_names"] == list(NAMES)
  values = [result["classes"]["any"]["f1"] for result in results]
  stats = summary["classes"]["any"]["f1"]
  assert stats["mean"] == pytest.approx(np.mean(values))
  assert stats["std"] == pytest.approx(np.std(values, ddof=1))
  assert stats["n"] == 3
  macro_auc = [result["auc"]["macro"] for result in results]
  assert summary["auc"]["macro"]["mean"] == pytest.approx(np.mean(macro_auc))
  assert summary["classes"]["any"]["threshold_defaulted"] == {"n_true": 0, "n": 3}
  assert _json_has_no_nan(summary)


def test_summarize_folds_skips_undefined_fold():
  results = _fold_results(num_folds=3, undefined_fold=1)
  summary = summarize_folds(results)
  stats = summary["classes"]["epidural"]["auc"]
  defined = [results[fold]["classes"]["epidural"]["auc"] for fold in (0, 2)]
  assert results[1]["classes"]["epidural"]["auc"] is None
  assert stats["n"] == 2
  assert stats["mean"] == pytest.approx(np.mean(defined))
  assert stats["std"] == pytest.approx(np.std(defined, ddof=1))
  assert summary["classes"]["any"]["auc"]["n"] == 3
  assert _json_has_no_nan(summary)


def test_summarize_folds_single_contribution_has_no_std():
  results = _fold_results(num_folds=2, undefined_fold=0)
  stats = summarize_folds(results)["classes"]["epidural"]["auc"]
  assert stats["n"] == 1
  assert stats["std"] is None
  assert stats["mean"] == results[1]["classes"]["epidural"]["auc"]


def test_summarize_folds_rejects_mixed_classes():
  results = _fold_results(num_folds=2)
  results[1] = dict(results[1], class_names=["any", "subdural", "intraparenchymal"])
  with pytest.raises(MetricInputError, match="same classes"):
    summarize_folds(results)
  with pytest.raises(MetricInputError, match="at least one"):
    summarize_folds([])


# format_table ----------------------------------------------------------------


def test_format_table_single_result():
  test_labels, test_probs = _random_split(30, n=50)
  validation_labels, validation_probs = _random_split(31, n=50)
  test_labels[:, 1] = 0
  result = evaluate_classification(
      test_labels, test_probs, validation_labels, validation_probs, NAMES
  )
  table = format_table(result)
  lines = table.splitlines()
  assert lines[0].split() == [
      "class", "AUC", "F1", "sensitivity", "specificity", "threshold", "positives"
  ]
  epidural = next(line for line in lines if line.startswith("epidural"))
  assert "n/a" in epidural
  assert "0/50" in epidural
  any_line = next(line for line in lines if line.startswith("any "))
  assert f"{result['classes']['any']['auc']:.3f}" in any_line
  assert f"{result['classes']['any']['threshold']:.3f}" in any_line
  assert any(line.startswith("macro") for line in lines)
  assert "AUC undefined for epidural" in table


def test_format_table_fold_summary():
  summary = summarize_folds(_fold_results())
  table = format_table(summary)
  stats = summary["classes"]["any"]["auc"]
  assert f"{stats['mean']:.3f} ± {stats['std']:.3f}" in table
  assert "folds: 3" in table


def test_format_table_marks_partial_folds():
  summary = summarize_folds(_fold_results(num_folds=3, undefined_fold=1))
  lines = format_table(summary).splitlines()
  epidural = next(line for line in lines if line.startswith("epidural"))
  stats = summary["classes"]["epidural"]["auc"]
  assert f"{stats['mean']:.3f} ± {stats['std']:.3f} (n=2)" in epidural
