"""Inference on one scan: `predict` (JSON report) and `overview` (PNG picture)."""
