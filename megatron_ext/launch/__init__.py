"""The launcher: from a dataset directory, a base model and an experiment name to a
training run on this machine (torchrun) or on a Slurm cluster (sbatch), resumable by
rerunning the same command. Floor 8: may import every floor below."""
