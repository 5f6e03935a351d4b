"""The erasure engine (crce.training.engine) and the objectives it optimises."""


class TrainingError(RuntimeError):
    """A run that cannot train (bad settings for the data, a non-finite loss, ...)."""
