"""A real, throwaway SLURM cluster on this machine, for integration tests.

See :mod:`tests.cluster.slurm` for the cluster itself, :mod:`tests.cluster.fixtures`
for the pytest fixtures and :mod:`tests.cluster.cli` for the command line.
"""

from tests.cluster.slurm import SlurmCluster, SlurmClusterError, install

__all__ = ["SlurmCluster", "SlurmClusterError", "install"]
