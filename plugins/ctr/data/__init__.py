"""Data: reading raw Criteo files, day checks, landing zone and staging, Azure storage, the synthetic generator."""
