"""Rollouts of the scoring service behind one small interface: local (default) and AKS."""
