"""LatentForge: the library behind the ingest, precompute, train and evaluate stages.

It imports no Ray, reads no argv and does nothing at import time; `pipelines/` builds the
Ray graphs on top of it and `jobs/` holds the thin entry scripts.
"""

__version__ = "0.1.0"
