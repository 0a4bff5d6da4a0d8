"""fedprompt: federated soft-prompt tuning with per-hospital differential privacy."""

import os

__version__ = "0.1.0"

# Flower reports usage events to Flower Labs unless told not to, and reads the switch when it is
# first imported: a hospital's or aggregator's process sends nothing anywhere but to its
# federation (set FLWR_TELEMETRY_ENABLED=1 yourself to opt in). Set here, before any flwr import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
