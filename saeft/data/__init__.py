"""Datasets: the procedural shapes world, Fashion-MNIST with its shifts, and the registry that the
stages read datasets from."""
