"""Monitoring: drift (PSI) of features and scores, the prediction log, the daily monitor."""
