"""Plan-time names, torch-free: what a run is called and which files the workflow plans (variants,
run ids, the aggregate's outputs). The workflow imports them while it builds the DAG."""
