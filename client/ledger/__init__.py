"""The hospital's privacy ledger: every DP-SGD step this site ever took, on disk, for good.

The ledger is the site's legal promise that it never exceeds its own epsilon cap, so it is built
to fail closed: it never under-counts (steps are recorded before training, under a lock, after
re-reading the file), never resets silently (a missing, unreadable or shrunken ledger is an
error, not an empty one), and never corrupts (atomic replace + fsync, strict validation on read).

Epsilon is what Opacus's own accountant reports for the same history: consecutive entries with
the same (noise_multiplier, sample_rate) are merged, exactly as the accountant's own `step()`
merges them, so a site that trained for many rounds with one sigma is accounted as one long run.

A tamper-evident audit trail (schema "fedprompt-ledger/2"):
- `history`: one entry per round, written BEFORE training, never changed afterwards: run_id, round,
  noise_multiplier (sigma; null for a non-private round), sample_rate (q), steps, non_private,
  epsilon_cap (the cap it was checked against), records_sha256 (the records file it trains on),
  model_in_sha256 (the model it received, `state_sha256`), recorded_at, `prev` (the hash of the
  entry before it; the first entry: the hash of the header) and `hash` (its own hash).
- `completions`: the out-hash of each update that left, appended after training and before the reply
  (`complete`): entry (index), entry_hash, model_out_sha256, completed_at, prev (the completion before
  it; the first: the header hash), hash. A separate append-only chain, so that `history` stays one
  immutable entry per round; an entry without a completion was recorded but its update never left
  (crash, refusal after recording) -- or it predates this schema, or it charged an evaluation.
- Every hash is `record_hash`: sha256 of the canonical JSON (sorted keys, no whitespace) of the
  object without its own "hash" key; the header is schema, hospital_id, mechanism, delta,
  created_at, migrated_from. The top-level `epsilon_cap` (the cap at the last record) is not hashed.
- A "fedprompt-ledger/1" ledger is read as if migrated (its entries chained from a header with
  migrated_from {"schema": "fedprompt-ledger/1", "entries": N}, their new hash fields null); the
  next write stores it so. Deterministic: every process computes the same hashes.
- The chain has no secret: it shows a deleted, edited, inserted or reordered entry (with its
  index), not a chain rewritten from scratch. The ANCHOR does that: a small file (site.yaml
  `ledger_anchor`, default `<ledger>.anchor`; best on another volume) holding the entry and
  completion counts and heads, rewritten atomically after every ledger write (ledger first, then
  anchor) and checked on every open and before every record: a ledger with fewer entries than its
  anchor, or another entry where the anchor's head was, is an older copy restored (rollback) and is
  refused. A ledger AHEAD of its anchor is accepted (a crash between the two writes).

The package, one concern a module: `hashing` (canonical JSON, file and model hashes), `models` (the
on-disk models, schema 1 included), `chain` (reading, verifying and writing the file, its lock),
`anchor`, and `core` (`PrivacyLedger`, `verify_ledger`); the epsilon is common/accounting.py's.
"""

from fedprompt.common.accounting import compute_epsilon, json_epsilon

from .anchor import ANCHOR_SCHEMA, default_anchor
from .core import PrivacyLedger, verify_ledger
from .errors import LedgerIntegrityError
from .hashing import canonical_json, file_sha256, record_hash, state_sha256
from .models import MECHANISMS, SCHEMA, SCHEMA_V1, Completion, LedgerEntry, Mechanism

__all__ = [
    "ANCHOR_SCHEMA",
    "MECHANISMS",
    "SCHEMA",
    "SCHEMA_V1",
    "Completion",
    "LedgerEntry",
    "LedgerIntegrityError",
    "Mechanism",
    "PrivacyLedger",
    "canonical_json",
    "compute_epsilon",
    "default_anchor",
    "file_sha256",
    "json_epsilon",
    "record_hash",
    "state_sha256",
    "verify_ledger",
]
