"""Running a Plan: parallelize on each rank, launching ranks through torch's launcher, the worker,
timing a training step."""
