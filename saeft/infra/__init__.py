"""Infrastructure, torch-free: atomic file I/O, the job's environment record, GPUs, fault injection,
MLflow tracking and the warm worker with the workflow's background processes."""
