"""Datasets: the procedural shapes world and the registry that the stages read datasets from."""
