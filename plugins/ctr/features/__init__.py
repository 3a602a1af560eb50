"""Features: the raw-row -> model-input transform and its vocabularies (the spilling counter)."""
