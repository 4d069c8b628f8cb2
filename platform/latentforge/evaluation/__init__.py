"""Metrics (FID, CLIP score) and the periodic evaluation that runs inside training.

Nothing here imports Ray; `pipelines/evaluate.py` and `jobs/evaluate.py` wire it to data and MLflow.
"""
