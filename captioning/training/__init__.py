"""Training: the run folder every trainer uses, the caption trainer, self-critical training."""
