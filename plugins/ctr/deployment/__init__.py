"""Deployment: the scoring image (local build, ACR) and rollouts of the service (local, AKS)."""
