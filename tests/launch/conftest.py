"""Fixtures of the launcher's tests: the real single-node Slurm cluster."""

from tests.launch.slurm_cluster import slurm_cluster

__all__ = ["slurm_cluster"]  # a fixture: pytest finds it here
