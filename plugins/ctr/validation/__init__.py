"""Validation: metrics, scoring the holdout day, the promotion gate and the evaluation report."""
