"""hfhpc: the Hugging Face stack on air-gapped SLURM GPU clusters."""

__version__ = "0.1.0"
