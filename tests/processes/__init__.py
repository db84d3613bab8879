"""Tests that run the product as several processes: the launcher, learner and actor processes, ranks over
mlx.distributed, remote starts through SSH and network namespaces, resume after kills."""
