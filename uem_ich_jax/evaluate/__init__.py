"""Evaluation: classification metrics with thresholds chosen on validation, fold summaries."""

from uem_ich_jax.evaluate.metrics import (
    DEFAULT_THRESHOLD,
    MetricInputError,
    ThresholdChoice,
    binary_metrics_at,
    choose_thresholds,
    evaluate_classification,
    format_table,
    per_class_auc,
    roc_auc,
    summarize_folds,
)
