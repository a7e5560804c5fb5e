"""Slurm jobs: render and submit training jobs (`mds submit`), scaling sweeps as job arrays
(`mds sweep`), and their report (`mds report`)."""
