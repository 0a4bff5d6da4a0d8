"""The hospital's privacy ledger: every DP-SGD step this site ever took, on disk, for good.

The ledger is the site's legal promise that it never exceeds its own epsilon cap, so it is built
to fail closed: it never under-counts (steps are recorded before training, under a lock, after
re-reading the file), never resets silently (a missing, unreadable or shrunken ledger is an
error, not an empty one), and never corrupts (atomic replace + fsync, strict validation on read).

Epsilon is what Opacus's own accountant reports for the same history: consecutive entries with
the same (noise_multiplier, sample_rate) are merged, exactly as the accountant's own `step()`
merges them, so a site that trained for many rounds with one sigma is accounted as one long run.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.common.errors import LedgerError, PrivacyBudgetExceeded

if TYPE_CHECKING:
    from fedprompt.common.config import SiteConfig

SCHEMA = "fedprompt-ledger/1"
MECHANISMS = ("prv", "rdp")
# How long `record` waits for another process holding the ledger (it may be computing a PRV).
LOCK_TIMEOUT_S = 300.0
# Above this RDP epsilon the guarantee is meaningless and Opacus's PRV discretisation needs
# gigabytes (it was OOM-killed on a 23 GB host at RDP epsilon ~30000); report the RDP bound there,
# which is also a valid upper bound, so the ledger still never under-counts.
PRV_CEILING = 100.0

_TOP_KEYS = ("schema", "hospital_id", "mechanism", "delta", "epsilon_cap", "created_at", "history")
_ENTRY_KEYS = ("noise_multiplier", "sample_rate", "steps", "run_id", "round", "recorded_at")
_NEVER_RECREATE = (
    "Never recreate a ledger for a site that has trained: that forgets the epsilon it already spent; "
    "restore the file from a backup instead."
)


@dataclass(frozen=True)
class LedgerEntry:
    """One planned training round, recorded before it ran."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str
    round: int
    recorded_at: str


@dataclass(frozen=True)
class _State:
    hospital_id: str
    mechanism: str
    delta: float
    epsilon_cap: float
    created_at: str
    history: tuple[LedgerEntry, ...]

    def to_doc(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "hospital_id": self.hospital_id,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "epsilon_cap": self.epsilon_cap,
            "created_at": self.created_at,
            "history": [{k: getattr(e, k) for k in _ENTRY_KEYS} for e in self.history],
        }


def accountant_history(steps: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """(sigma, q, steps) triples as Opacus's accountant would hold them had it stepped through them."""
    merged: list[tuple[float, float, int]] = []
    for sigma, q, n in steps:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + n)
        else:
            merged.append((sigma, q, n))
    return merged


def compute_epsilon(mechanism: str, steps: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a (sigma, q, steps) history at `delta`, by Opacus's PRV or RDP accountant."""
    history = accountant_history(steps)
    if not history:
        return 0.0
    # Imported here: opacus pulls in torch (seconds), and the CLI should start fast.
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    rdp.history = list(history)
    rdp_eps = float(rdp.get_epsilon(delta))
    if mechanism == "rdp" or rdp_eps > PRV_CEILING:
        return rdp_eps
    prv = PRVAccountant()
    prv.history = list(history)
    prv_eps = float(prv.get_epsilon(delta))
    return prv_eps if math.isfinite(prv_eps) else rdp_eps


def _triples(history: Iterable[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if _is_number(noise_multiplier) and noise_multiplier == 0:
        raise ValueError(
            "noise_multiplier 0 is non-private training: it spends infinite epsilon, is a separate, "
            "labelled mode, and is never recorded in the privacy ledger"
        )
    if not (_is_number(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_cap(epsilon_cap: float) -> None:
    if not (_is_number(epsilon_cap) and epsilon_cap > 0):
        raise ValueError(f"epsilon_cap must be a finite number > 0, got {epsilon_cap!r}")


def _corrupt(path: Path, detail: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} is corrupted ({detail}). It was NOT reset and nothing may be trained "
        f"until it is repaired. {_NEVER_RECREATE}"
    )


def _read_state(path: Path) -> _State:
    """Load and strictly validate a ledger file; any doubt is a LedgerError, never a fresh ledger."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(
            f"no privacy ledger at {path}. For a site that has never trained, create one with "
            f"`fedprompt privacy init --site site.yaml`. {_NEVER_RECREATE}"
        ) from None
    except OSError as exc:
        raise LedgerError(f"cannot read privacy ledger {path}: {exc.strerror or exc}") from exc
    try:
        # NaN/Infinity/1e999 parse, but every number then goes through a finiteness check.
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"not valid JSON: {exc}") from None
    return _parse(doc, path)


def _parse(doc: Any, path: Path) -> _State:
    if not isinstance(doc, dict):
        raise _corrupt(path, f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise _corrupt(path, f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    _check_keys(doc, _TOP_KEYS, "top level", path)
    hospital_id, mechanism, delta, cap = doc["hospital_id"], doc["mechanism"], doc["delta"], doc["epsilon_cap"]
    if not (isinstance(hospital_id, str) and hospital_id):
        raise _corrupt(path, f"hospital_id must be a non-empty string, got {hospital_id!r}")
    if mechanism not in MECHANISMS:
        raise _corrupt(path, f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not (_is_number(delta) and 0 < delta < 1):
        raise _corrupt(path, f"delta must be in (0, 1), got {delta!r}")
    if not (_is_number(cap) and cap > 0):
        raise _corrupt(path, f"epsilon_cap must be a finite number > 0, got {cap!r}")
    _check_timestamp(doc["created_at"], "created_at", path)
    if not isinstance(doc["history"], list):
        raise _corrupt(path, "history must be a list")
    history = tuple(_parse_entry(e, i, path) for i, e in enumerate(doc["history"]))
    return _State(hospital_id, mechanism, float(delta), float(cap), doc["created_at"], history)


def _parse_entry(entry: Any, i: int, path: Path) -> LedgerEntry:
    where = f"history[{i}]"
    if not isinstance(entry, dict):
        raise _corrupt(path, f"{where} must be an object")
    _check_keys(entry, _ENTRY_KEYS, where, path)
    sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
    try:
        _check_step_args(sigma, q, steps)
    except ValueError as exc:
        raise _corrupt(path, f"{where}: {exc}") from None
    if not (isinstance(entry["run_id"], str) and entry["run_id"]):
        raise _corrupt(path, f"{where}.run_id must be a non-empty string")
    if not (_is_int(entry["round"]) and entry["round"] >= 0):
        raise _corrupt(path, f"{where}.round must be an integer >= 0, got {entry['round']!r}")
    _check_timestamp(entry["recorded_at"], f"{where}.recorded_at", path)
    return LedgerEntry(float(sigma), float(q), steps, entry["run_id"], entry["round"], entry["recorded_at"])


def _check_keys(obj: dict, expected: Sequence[str], where: str, path: Path) -> None:
    missing = [k for k in expected if k not in obj]
    unknown = sorted(k for k in obj if k not in expected)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])
        raise _corrupt(path, f"{where}: {'; '.join(parts)}")


def _check_timestamp(value: Any, where: str, path: Path) -> None:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise _corrupt(path, f"{where} must be an ISO 8601 timestamp, got {value!r}") from None


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """flock on a sidecar `<ledger>.lock`: the ledger itself is replaced on every write, so it can't hold a lock."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"cannot open the ledger lock {lock_path}: {exc.strerror or exc}; nothing was recorded") from exc
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerError(
                        f"privacy ledger {path} is locked by another process (waited {LOCK_TIMEOUT_S:g} s); nothing was recorded"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the flock


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` with `doc` so that a crash leaves either the old file or the new one, durably."""
    data = (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")
    try:
        # Keep the file's mode across rewrites; a new ledger is world-readable for audits (no personal data).
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise LedgerError(
            f"cannot write privacy ledger {path}: {exc.strerror or exc}; nothing was recorded, so nothing may be trained or sent"
        ) from exc
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # The new file is in place but may not survive a power cut: stop; the entry counts if it does.
        raise LedgerError(f"privacy ledger {path} was written but its directory could not be synced: {exc.strerror or exc}") from exc


class PrivacyLedger:
    """One hospital's cumulative DP accounting. Construct with `create`, `open` or `for_site`."""

    def __init__(self, path: Path, state: _State):
        self.path = path
        self._state = state
        self._cache: dict[tuple[tuple[float, float, int], ...], float] = {}

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, hospital_id: str, epsilon_cap: float, delta: float, mechanism: str = "prv") -> "PrivacyLedger":
        """A new, empty ledger. Refuses if the file exists: an existing ledger is never overwritten."""
        if not (isinstance(hospital_id, str) and hospital_id):
            raise ValueError(f"hospital_id must be a non-empty string, got {hospital_id!r}")
        _check_cap(epsilon_cap)
        if not (_is_number(delta) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        path = Path(path)
        state = _State(hospital_id, mechanism, float(delta), float(epsilon_cap), _now(), ())
        # Check-then-write under the lock: every writer takes it, so no one can slip in between.
        with _exclusive_lock(path):
            if os.path.lexists(path):
                raise LedgerError(f"privacy ledger {path} already exists; refusing to overwrite it. {_NEVER_RECREATE}")
            _write_atomic(path, state.to_doc())
        return cls(path, state)

    @classmethod
    def open(cls, path: str | Path, *, hospital_id: str | None = None, delta: float | None = None) -> "PrivacyLedger":
        """An existing ledger, validated; optionally checked to belong to `hospital_id` at `delta`."""
        path = Path(path)
        state = _read_state(path)
        if hospital_id is not None and state.hospital_id != hospital_id:
            raise LedgerError(f"privacy ledger {path} belongs to hospital {state.hospital_id!r}, not {hospital_id!r}")
        if delta is not None and state.delta != delta:
            raise LedgerError(
                f"privacy ledger {path} accounts at delta {state.delta:g}, but delta {delta:g} was asked for: "
                "epsilons at different deltas are not comparable"
            )
        return cls(path, state)

    @classmethod
    def for_site(cls, site: SiteConfig) -> "PrivacyLedger":
        ledger = cls.open(site.ledger, hospital_id=site.hospital_id, delta=site.privacy.delta)
        if ledger.mechanism != site.privacy.accountant:
            raise LedgerError(
                f"privacy ledger {ledger.path} uses the {ledger.mechanism!r} accountant but {site.source or 'site.yaml'} "
                f"says {site.privacy.accountant!r}: epsilons from different accountants are not comparable"
            )
        return ledger

    # --- state ----------------------------------------------------------------------------------

    @property
    def hospital_id(self) -> str:
        return self._state.hospital_id

    @property
    def mechanism(self) -> str:
        return self._state.mechanism

    @property
    def delta(self) -> float:
        return self._state.delta

    @property
    def epsilon_cap(self) -> float:
        """The cap passed at the last record (or at creation), kept for audit; the site.yaml's cap rules."""
        return self._state.epsilon_cap

    @property
    def created_at(self) -> str:
        return self._state.created_at

    @property
    def history(self) -> list[LedgerEntry]:
        return list(self._state.history)

    def _epsilon(self, steps: Iterable[tuple[float, float, int]]) -> float:
        key = tuple(accountant_history(steps))
        if key not in self._cache:
            if len(self._cache) >= 64:  # projections with ever-new arguments must not grow memory without bound
                self._cache.clear()
            self._cache[key] = compute_epsilon(self.mechanism, key, self.delta)
        return self._cache[key]

    # --- accounting -----------------------------------------------------------------------------

    def epsilon_spent(self) -> float:
        return self._epsilon(_triples(self._state.history))

    def project(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after adding these steps to the history in memory; nothing is written."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        return self._epsilon([*_triples(self._state.history), (float(noise_multiplier), float(sample_rate), steps)])

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, *, epsilon_cap: float, run_id: str, round: int) -> float:
        """Durably add planned steps, or refuse; returns the new epsilon_spent.

        Call BEFORE training or sending: a crash afterwards over-counts, never under-counts.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        _check_cap(epsilon_cap)
        if not (isinstance(run_id, str) and run_id):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if not (_is_int(round) and round >= 0):
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        with _exclusive_lock(self.path):
            disk = self._reread()
            projected = self._epsilon([*_triples(disk.history), (float(noise_multiplier), float(sample_rate), steps)])
            if projected > epsilon_cap:
                raise PrivacyBudgetExceeded(
                    f"hospital {disk.hospital_id}: epsilon spent {self._epsilon(_triples(disk.history)):.4f}, this round "
                    f"(sigma {noise_multiplier:g}, q {sample_rate:g}, {steps} steps) would bring it to {projected:.4f}, "
                    f"over the site's cap {epsilon_cap:g} (delta {disk.delta:g}, accountant {disk.mechanism}); nothing was recorded"
                )
            entry = LedgerEntry(float(noise_multiplier), float(sample_rate), steps, run_id, round, _now())
            new = replace(disk, epsilon_cap=float(epsilon_cap), history=(*disk.history, entry))
            _write_atomic(self.path, new.to_doc())
            self._state = new  # only now: a failed write leaves this object as it was
        return projected

    def _reread(self) -> _State:
        """The file as it is now, which must extend what this process already saw."""
        disk = _read_state(self.path)
        # Another process may have written: never trust an epsilon computed before this reload.
        self._cache.clear()
        ours = self._state
        if (disk.hospital_id, disk.mechanism, disk.delta) != (ours.hospital_id, ours.mechanism, ours.delta):
            raise LedgerError(
                f"privacy ledger {self.path} was replaced by another ledger (hospital {disk.hospital_id!r}, "
                f"accountant {disk.mechanism}, delta {disk.delta:g}) while in use"
            )
        if disk.history[: len(ours.history)] != ours.history:
            raise LedgerError(
                f"privacy ledger {self.path} lost entries this process had already seen: it was reset or "
                f"replaced; refusing to record. {_NEVER_RECREATE}"
            )
        return disk

    def to_json(self) -> dict[str, Any]:
        return {
            "hospital_id": self.hospital_id,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "epsilon_spent": self.epsilon_spent(),
            "epsilon_cap": self.epsilon_cap,
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._state.history],
        }
