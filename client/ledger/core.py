"""`PrivacyLedger`: one hospital's cumulative DP accounting (common/accounting.py) over its ledger
file and anchor; and `verify_ledger`, `fedprompt privacy verify`'s verdict."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from fedprompt.common.accounting import compute_epsilon, json_epsilon
from fedprompt.common.errors import LedgerError, PrivacyBudgetExceeded

from .anchor import _Anchor, _anchor_doc, _check_anchor, _contains_head, _read_anchor, default_anchor
from .chain import _exclusive_lock, _read_state, _write_atomic
from .errors import _NEVER_RECREATE, LedgerIntegrityError
from .models import _SHA256, MECHANISMS, SCHEMA, Completion, LedgerEntry, _now, _State

if TYPE_CHECKING:
    from fedprompt.common.config import SiteConfig


def _triples(history: Iterable[LedgerEntry]) -> list[tuple[float | None, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step_args(
    noise_multiplier: float | None, sample_rate: float, steps: int, *, non_private: bool = False
) -> None:
    if non_private:
        if noise_multiplier is not None:
            raise ValueError(f"a non-private round has no noise_multiplier (null), got {noise_multiplier!r}")
    elif _is_number(noise_multiplier) and noise_multiplier == 0:
        raise ValueError(
            "noise_multiplier 0 is non-private training: it spends infinite epsilon, is a separate, "
            "labelled mode, and is recorded only by `record_non_private`"
        )
    elif not (_is_number(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_cap(epsilon_cap: float) -> None:
    if not (_is_number(epsilon_cap) and epsilon_cap > 0):
        raise ValueError(f"epsilon_cap must be a finite number > 0, got {epsilon_cap!r}")


def _non_private_note(state: _State) -> str:
    first = next((e for e in state.history if e.non_private), None)
    if first is None:
        return ""
    return (
        f" (this site trained WITHOUT differential privacy in run {first.run_id!r} round {first.round}: its epsilon "
        "is infinite, for good)"
    )


class PrivacyLedger:
    """One hospital's cumulative DP accounting. Construct with `create`, `open` or `for_site`."""

    def __init__(self, path: Path, state: _State, anchor_path: Path | None = None):
        self.path = path
        self.anchor_path = anchor_path if anchor_path is not None else default_anchor(path)
        self._state = state
        self._pending: int | None = None  # the entry this object recorded last, until `complete`
        self._found: tuple[_Anchor | None, LedgerIntegrityError | None] = (None, None)
        self.anchor_status = "in step"  # as of the last open/record: "in step", "ahead" or "none"

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        hospital_id: str,
        epsilon_cap: float,
        delta: float,
        mechanism: str = "prv",
        anchor: str | Path | None = None,
    ) -> PrivacyLedger:
        """A new, empty ledger and its anchor. Refuses if the ledger exists (it is never overwritten) or
        if the anchor says the site's ledger already held entries (the site has trained: restore it)."""
        if not (isinstance(hospital_id, str) and hospital_id):
            raise ValueError(f"hospital_id must be a non-empty string, got {hospital_id!r}")
        _check_cap(epsilon_cap)
        if not (_is_number(delta) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        path = Path(path)
        anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
        state = _State(hospital_id, mechanism, float(delta), float(epsilon_cap), _now(), ())
        # Check-then-write under the lock: every writer takes it, so no one can slip in between.
        with _exclusive_lock(path):
            if os.path.lexists(path):
                raise LedgerError(f"privacy ledger {path} already exists; refusing to overwrite it. {_NEVER_RECREATE}")
            if not anchor_path.parent.is_dir():  # e.g. its volume is not mounted: never create it somewhere else
                raise LedgerError(f"the folder of the ledger anchor {anchor_path} does not exist; nothing was created")
            previous = _read_anchor(anchor_path)
            if previous is not None and (previous.entries or previous.completions):
                raise LedgerIntegrityError(
                    f"refusing to create privacy ledger {path}: its anchor {anchor_path} says the ledger of hospital "
                    f"{previous.hospital_id!r} held {previous.entries} entries, so this site has trained. "
                    f"{_NEVER_RECREATE}",
                    kind="rollback",
                )
            _write_atomic(path, state.to_doc())
            _write_atomic(anchor_path, _anchor_doc(state), anchor=True)
        return cls(path, state, anchor_path)

    @classmethod
    def create_for_site(cls, site: SiteConfig) -> PrivacyLedger:
        """The site's new, empty ledger as its site.yaml describes it (cap, delta, accountant,
        `ledger_anchor`): `privacy init`, and the commands that write a new site (`data demo`,
        `data partition`, the compose demo). The ledger's folder is made; the anchor's must exist.
        Refuses, as `create` does, an existing ledger or one whose anchor says the site has trained."""
        try:
            site.ledger.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger folder {site.ledger.parent}: {exc.strerror or exc}") from exc
        return cls.create(
            site.ledger,
            hospital_id=site.hospital_id,
            epsilon_cap=site.privacy.max_epsilon,
            delta=site.privacy.delta,
            mechanism=site.privacy.accountant,
            anchor=site.ledger_anchor,
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hospital_id: str | None = None,
        delta: float | None = None,
        anchor: str | Path | None = None,
    ) -> PrivacyLedger:
        """An existing ledger, validated (chain included) and checked against its anchor (default
        `<ledger>.anchor`); optionally checked to belong to `hospital_id` at `delta`."""
        ledger = cls._load(path, anchor, hospital_id=hospital_id, delta=delta)
        ledger._check_found_anchor()
        return ledger

    @classmethod
    def for_site(cls, site: SiteConfig, *, anchored: bool = True) -> PrivacyLedger:
        """The site's ledger, checked against its site.yaml and (unless `anchored` is false: only to
        repair the anchor, `reanchor`) against its anchor."""
        ledger = cls._load(
            site.ledger,
            site.ledger_anchor,
            hospital_id=site.hospital_id,
            delta=site.privacy.delta,
            mechanism=site.privacy.accountant,
            source=site.source,
        )
        if anchored:
            ledger._check_found_anchor()
        return ledger

    @classmethod
    def _load(
        cls,
        path: str | Path,
        anchor: str | Path | None,
        *,
        hospital_id: str | None = None,
        delta: float | None = None,
        mechanism: str | None = None,
        source: Path | None = None,
    ) -> PrivacyLedger:
        """Ledger and anchor as they are on disk, the ledger validated; the anchor is compared by
        `_check_found_anchor`."""
        path = Path(path)
        anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
        # The anchor BEFORE the ledger: writers write the ledger, then its anchor, so an anchor read
        # first is never ahead of the ledger read after it (no false rollback without the lock).
        try:
            found: tuple[_Anchor | None, LedgerIntegrityError | None] = (_read_anchor(anchor_path), None)
        except LedgerIntegrityError as exc:
            found = (None, exc)  # reported after the ledger's own problems
        state = _read_state(path)
        if hospital_id is not None and state.hospital_id != hospital_id:
            raise LedgerIntegrityError(
                f"privacy ledger {path} belongs to hospital {state.hospital_id!r}, not {hospital_id!r}", kind="identity"
            )
        if delta is not None and state.delta != delta:
            raise LedgerIntegrityError(
                f"privacy ledger {path} accounts at delta {state.delta:g}, but delta {delta:g} was asked for: "
                "epsilons at different deltas are not comparable",
                kind="identity",
            )
        if mechanism is not None and state.mechanism != mechanism:
            raise LedgerIntegrityError(
                f"privacy ledger {path} uses the {state.mechanism!r} accountant but {source or 'site.yaml'} "
                f"says {mechanism!r}: epsilons from different accountants are not comparable",
                kind="identity",
            )
        ledger = cls(path, state, anchor_path)
        ledger._found = found
        return ledger

    def _check_found_anchor(self) -> str:
        anchor, error = self._found
        if error is not None:
            raise error
        self.anchor_status = _check_anchor(self._state, anchor, self.anchor_path, self.path)
        return self.anchor_status

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

    @property
    def completions(self) -> list[Completion]:
        return list(self._state.completions)

    @property
    def head(self) -> str:
        """The hash of the last entry (of the header if there is none)."""
        return self._state.head()

    @property
    def stored_schema(self) -> str:
        """The schema of the file as read: SCHEMA_V1 until the next write migrates it."""
        return self._state.stored_schema

    @property
    def non_private(self) -> bool:
        """Has this site ever trained without DP? Then its epsilon is infinite, for good."""
        return any(e.non_private for e in self._state.history)

    def _epsilon(self, steps: Iterable[tuple[float | None, float, int]]) -> float:
        return compute_epsilon(self.mechanism, steps, self.delta)

    # --- accounting -----------------------------------------------------------------------------

    def epsilon_spent(self) -> float:
        """math.inf once the site has trained without DP."""
        return self._epsilon(_triples(self._state.history))

    def project(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after adding these steps to the history in memory; nothing is written."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        return self._epsilon([*_triples(self._state.history), (float(noise_multiplier), float(sample_rate), steps)])

    def project_all(self, releases: Iterable[tuple[float, float, int]]) -> float:
        """Epsilon after adding these (noise multiplier, sample rate, steps) releases, in order, to the
        history in memory; nothing is written (client/preflight.py: a whole run's rounds)."""
        triples = [(float(sigma), float(q), steps) for sigma, q, steps in releases]
        for triple in triples:
            _check_step_args(*triple)
        return self._epsilon([*_triples(self._state.history), *triples])

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None = None,
        model_in_sha256: str | None = None,
    ) -> float:
        """Durably add planned steps, or refuse; returns the new epsilon_spent.

        Call BEFORE training or sending: a crash afterwards over-counts, never under-counts.
        `records_sha256` (`file_sha256` of the records) and `model_in_sha256` (`state_sha256` of the
        model received) bind the entry to what it trains; `complete` adds the update that leaves.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        return self._append(
            float(noise_multiplier),
            float(sample_rate),
            steps,
            epsilon_cap=epsilon_cap,
            run_id=run_id,
            round=round,
            records_sha256=records_sha256,
            model_in_sha256=model_in_sha256,
        )

    def record_non_private(
        self,
        sample_rate: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None = None,
        model_in_sha256: str | None = None,
    ) -> float:
        """Durably record a round trained WITHOUT DP (a site with allow_non_private), before it runs.

        Never refused by the cap; returns math.inf, which `epsilon_spent` stays at for good, so the
        site's cap check refuses every later private round.
        """
        _check_step_args(None, sample_rate, steps, non_private=True)
        return self._append(
            None,
            float(sample_rate),
            steps,
            epsilon_cap=epsilon_cap,
            run_id=run_id,
            round=round,
            records_sha256=records_sha256,
            model_in_sha256=model_in_sha256,
        )

    def _append(
        self,
        sigma: float | None,
        q: float,
        steps: int,
        *,
        epsilon_cap: float,
        run_id: str,
        round: int,
        records_sha256: str | None,
        model_in_sha256: str | None,
    ) -> float:
        _check_cap(epsilon_cap)
        if not (isinstance(run_id, str) and run_id):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if not (_is_int(round) and round >= 0):
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        for name, value in (("records_sha256", records_sha256), ("model_in_sha256", model_in_sha256)):
            if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
                raise ValueError(f"{name} must be None or a sha256 hex digest, got {value!r}")
        with _exclusive_lock(self.path):
            disk = self._reread()
            if sigma is None:
                projected = math.inf
            else:
                projected = self._epsilon([*_triples(disk.history), (sigma, q, steps)])
                if projected > epsilon_cap:
                    raise PrivacyBudgetExceeded(
                        f"hospital {disk.hospital_id}: epsilon spent "
                        f"{self._epsilon(_triples(disk.history)):.4f}{_non_private_note(disk)}, this round (sigma "
                        f"{sigma:g}, q {q:g}, {steps} steps) would bring it to {projected:.4f}, over the site's cap "
                        f"{epsilon_cap:g} (delta {disk.delta:g}, accountant {disk.mechanism}); nothing was recorded"
                    )
            entry = LedgerEntry(
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                run_id=run_id,
                round=round,
                recorded_at=_now(),
                non_private=sigma is None,
                epsilon_cap=float(epsilon_cap),
                records_sha256=records_sha256,
                model_in_sha256=model_in_sha256,
            ).linked(disk.head())
            self._commit(
                replace(disk, epsilon_cap=float(epsilon_cap), history=(*disk.history, entry), stored_schema=SCHEMA)
            )
            self._pending = len(self._state.history) - 1
        return projected

    def complete(self, model_out_sha256: str) -> Completion:
        """Durably bind the update that leaves (`state_sha256` of its tensors) to the entry this object
        recorded last. Call after training, BEFORE the reply: if it fails, nothing may be sent."""
        if self._pending is None:
            raise ValueError("nothing to complete: call record() (or record_non_private()) on this ledger object first")
        if not (isinstance(model_out_sha256, str) and _SHA256.fullmatch(model_out_sha256)):
            raise ValueError(f"model_out_sha256 must be a sha256 hex digest, got {model_out_sha256!r}")
        with _exclusive_lock(self.path):
            disk = self._reread()  # history extends ours, so history[pending] is still our entry
            index = self._pending
            if any(c.entry == index for c in disk.completions):
                raise LedgerError(f"privacy ledger {self.path}: history[{index}] is already completed")
            done = Completion(
                entry=index, entry_hash=disk.history[index].hash, model_out_sha256=model_out_sha256, completed_at=_now()
            ).linked(disk.completions_head())
            self._commit(replace(disk, completions=(*disk.completions, done), stored_schema=SCHEMA))
            self._pending = None
        return done

    def reanchor(self, last_head: str | None = None) -> str:
        """Rewrite the anchor from the ledger as it is now, its chain verified: for a lost or moved
        anchor. Never over a rollback: an anchor that shows one stays (restore the latest ledger); a
        ledger with entries and no usable anchor is re-anchored only if its chain holds `last_head`,
        the last head the aggregator recorded for this site (a cut ledger does not)."""
        with _exclusive_lock(self.path):
            fresh = type(self)._load(self.path, self.anchor_path)
            anchor, error = fresh._found
            if error is not None or anchor is None:
                before = "unusable" if error is not None else "missing"
                _contains_head(fresh._state, last_head, self.path)
            else:
                before = _check_anchor(fresh._state, anchor, self.anchor_path, self.path)  # raises on a rollback
            _write_atomic(self.anchor_path, _anchor_doc(fresh._state), anchor=True)
            self._state = fresh._state
            self.anchor_status = "in step"
        return before

    def _commit(self, new: _State) -> None:
        """Write the ledger, then its anchor (in that order: see `_load`); under the lock."""
        _write_atomic(self.path, new.to_doc())
        self._state = new  # only now: a failed write leaves this object as it was
        _write_atomic(self.anchor_path, _anchor_doc(new), anchor=True)
        self.anchor_status = "in step"

    def _reread(self) -> _State:
        """The file as it is now, which must extend what this process already saw and its anchor."""
        fresh = type(self)._load(self.path, self.anchor_path)
        disk = fresh._state
        ours = self._state
        if (disk.hospital_id, disk.mechanism, disk.delta) != (ours.hospital_id, ours.mechanism, ours.delta):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} was replaced by another ledger (hospital {disk.hospital_id!r}, "
                f"accountant {disk.mechanism}, delta {disk.delta:g}) while in use",
                kind="identity",
            )
        if (
            disk.history[: len(ours.history)] != ours.history
            or disk.completions[: len(ours.completions)] != ours.completions
        ):
            raise LedgerIntegrityError(
                f"privacy ledger {self.path} lost entries this process had already seen: it was reset or "
                f"replaced; refusing to record. {_NEVER_RECREATE}",
                kind="rollback",
            )
        self.anchor_status = fresh._check_found_anchor()
        return disk

    def to_json(self) -> dict[str, Any]:
        """epsilon_spent is "inf" (a string: JSON has no infinity) once the site trained without DP
        (`non_private` true); a non-private entry's sigma is null in `history`."""
        return {
            "hospital_id": self.hospital_id,
            "mechanism": self.mechanism,
            "delta": self.delta,
            "epsilon_spent": json_epsilon(self.epsilon_spent()),
            "epsilon_cap": self.epsilon_cap,
            "non_private": self.non_private,
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._state.history],
        }


def verify_ledger(
    path: str | Path,
    *,
    anchor: str | Path | None = None,
    hospital_id: str | None = None,
    delta: float | None = None,
    mechanism: str | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """`fedprompt privacy verify`'s verdict (JSON-safe): the chain, the anchor, the identity, and the
    epsilon recomputed from the entries. Never raises for a bad ledger: `ok` false and `failure`
    {kind, where, index, message} say what and where (index: the first bad entry of `where`)."""
    path = Path(path)
    anchor_path = Path(anchor) if anchor is not None else default_anchor(path)
    verdict: dict[str, Any] = {"ok": False, "ledger": str(path), "anchor": str(anchor_path), "failure": None}
    try:
        ledger = PrivacyLedger._load(
            path, anchor_path, hospital_id=hospital_id, delta=delta, mechanism=mechanism, source=source
        )
        anchor_status = ledger._check_found_anchor()
    except LedgerIntegrityError as exc:
        verdict["failure"] = {"kind": exc.kind, "where": exc.where, "index": exc.index, "message": str(exc)}
        return verdict
    state = ledger._state
    completed = {c.entry for c in state.completions}
    verdict.update(
        ok=True,
        schema=state.stored_schema,
        migration_pending=state.stored_schema != SCHEMA,
        hospital_id=state.hospital_id,
        mechanism=state.mechanism,
        delta=state.delta,
        entries=len(state.history),
        completions=len(state.completions),
        head=state.head(),
        completions_head=state.completions_head(),
        anchor_status=anchor_status,
        incomplete=[i for i in range(len(state.history)) if i not in completed],
        non_private=ledger.non_private,
        epsilon_spent=json_epsilon(ledger.epsilon_spent()),
    )
    return verdict
