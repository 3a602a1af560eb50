"""The model artefact: the bundle (format, loading, predicting), its MLflow pyfunc flavour, batch file scoring."""
