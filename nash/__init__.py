"""nash: iterative self-improvement rounds for language models.

The library (config, records, sampling, pair selection, training, evaluation, run
registry) runs without Prefect; `flows/` wraps it.
"""

__version__ = "0.1.0"
