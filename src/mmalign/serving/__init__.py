"""Using a trained model: inference helpers, portable export, the MLflow pyfunc captioner and its registration."""
