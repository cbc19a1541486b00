"""Lightly-format predictions and custom metadata in a datasource, and the Worker's active-learning scores.

`formats` reads `.lightly/predictions/tasks.json` and each task's `schema.json` and holds the bulk reader
every file here goes through; `predictions` reads one task's per-sample files into arrays; `metadata`
reads `.lightly/metadata`; `scores` computes the scores and class distributions that the selection's
SCORES and PREDICTIONS inputs take. Plain functions on arrays, no Prefect.
"""
