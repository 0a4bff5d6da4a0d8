"""fedprompt: federated soft-prompt tuning with per-hospital differential privacy."""

__version__ = "0.1.0"
