"""Aggregator side: Flower ServerApp, update validation, checkpoints, export, report."""
