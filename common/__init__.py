"""Shared by aggregator and hospitals: config, backbone, model, wire format, metrics."""
