"""What a model name and sampling settings mean, for everyone: the model registry
(registry.py: checkpoints, calibration files; checkpoints.py: loading, chat templates,
memory budgets) and the API's sampling settings
with the sampler that honours them (sampling.py)."""
