"""Rollouts of the scoring service behind one interface (`base.Rollout`): local (default) and AKS."""
