"""adaptune orchestrator: sweep files, the Ray Tune driver, the MLflow record and the CLI."""
