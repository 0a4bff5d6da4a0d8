"""`fedprompt hospital init`: a commented site.yaml template for one hospital.

Every field of SiteConfig (common/config.py) is written with what it means and its default; the
values are the recommended private settings (a lifetime cap of epsilon 8, no non-private rounds,
validation results kept at the site, equal FedAvg weights). Fields nobody can guess (the record
files, the ledger's place) are left `null` and marked REQUIRED until given on the command line or
filled in by hand; `SiteConfig.load` then accepts the file and `fedprompt data check` checks it.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic_core import PydanticUndefined

from fedprompt.common.atomic import atomic_write
from fedprompt.common.config import PrivacyCap, SiteConfig, SiteLimits
from fedprompt.common.errors import InputError, Problem
from fedprompt.common.schema import Schema

# The values of the required privacy fields that have no default: the docs' recommendation
# (docs/deployment.md section 4). 1e-5 is below 1/n for any site of up to 100,000 training
# records (or patients); `fedprompt data check` says when a larger site needs less.
RECOMMENDED = {"privacy.max_epsilon": 8.0, "privacy.delta": 1e-5}

# (dotted field, what it means), in the order a hospital fills them in. Nested fields follow
# their parent (SECTIONS). tests/test_site_template.py checks that this covers every field.
LAYOUT: list[tuple[str, str]] = [
    (
        "hospital_id",
        "This site's id: letters, digits, '-' or '_'. Use the id of its SuperNode key "
        "(`fedprompt pki hospital --id ...`); the privacy ledger is bound to it.",
    ),
    (
        "train",
        "The training records: a CSV file with a header row, or JSONL (one JSON object per line), "
        "UTF-8. Relative paths are read from this file's folder. The daemon only reads it.",
    ),
    (
        "validation",
        "Validation records (same format), evaluated at the site every round; the results stay "
        "in this site's log (see share_evaluation). null: no local validation.",
    ),
    ("test", "This site's own held-out records, used only by `fedprompt personalize`. null: none."),
    ("text_field", "The CSV column / JSONL field holding each record's text."),
    (
        "label_field",
        "The CSV column / JSONL field holding each record's label: a name from the federation's "
        "label space, exactly (`fedprompt data check --site THIS --federation federation.yaml`).",
    ),
    (
        "labels",
        "The federation's label space this site agreed to, e.g. [a, b, c] (any order): a plan with another one "
        "is refused before a record is read. Written from the federation.yaml given with --federation; "
        "null: every run is refused until set (`fedprompt hospital labels --site THIS --federation "
        "federation.yaml`).",
    ),
    (
        "patient_field",
        "Patient-level DP: the column / field naming each record's patient. Set, a whole "
        "patient is the unit the epsilon protects (head-only recipe only); null: each record is "
        "the unit, and a patient with k records is protected up to k times less.",
    ),
    ("privacy", "This site's own promise. The aggregator can ask for more privacy, never less."),
    (
        "privacy.max_epsilon",
        "The most epsilon this site will EVER spend: a lifetime cap over all runs together, "
        "never reset. A federation asking for epsilon 8 per run uses all of a cap of 8 in "
        "one run; later runs are refused until the cap is raised (a decision of the site).",
    ),
    (
        "privacy.delta",
        "DP's delta: well below 1 / (number of training records, or patients); "
        "`fedprompt data check` verifies it. Fixed for the life of the ledger.",
    ),
    (
        "privacy.min_noise_multiplier",
        "The least DP-SGD noise (sigma) this site accepts, whatever epsilon allows. 0: no floor.",
    ),
    (
        "privacy.accountant",
        "How epsilon is accounted: 'prv' (tight) or 'rdp' (a looser upper bound). Fixed for the life of the ledger.",
    ),
    (
        "privacy.retry_margin",
        "Retried DP-SGD rounds each run keeps room for: the noise is calibrated so that the run's rounds, "
        "its noised evaluations and this many more fit within the run's epsilon and what is left of the cap.",
    ),
    (
        "ledger",
        "The privacy ledger, the only record of the epsilon this site has spent: a file on a writable, "
        "backed-up volume (docs/deployment.md section 9). Created once in the life of the site with "
        "`fedprompt privacy init --site THIS`; never re-created.",
    ),
    (
        "ledger_anchor",
        "The ledger's anchor (detects an old copy restored over it): best on another volume than "
        "the ledger. null: LEDGER.anchor, beside the ledger.",
    ),
    (
        "allow_non_private",
        "May the aggregator run this site WITHOUT DP (reference runs)? One such round "
        "makes this site's epsilon infinite for good. Keep false.",
    ),
    (
        "share_evaluation",
        "Validation results: 'none' stays in this site's log; 'noised' sends per-class counts "
        "with Gaussian noise, each evaluation charged evaluation_epsilon to the ledger.",
    ),
    ("evaluation_epsilon", "What one noised evaluation costs (only with share_evaluation: noised)."),
    (
        "weight",
        "This site's declared size: its training records (or patients) to about 1 significant digit, "
        "e.g. 600 for 581. Sent as the FedAvg weight; it also sets the sample rate and the public "
        "constant the noisy sums are divided by, so the noise reveals this value and nothing finer. "
        "The site refuses to train with more than twice this many. null: rounded from the count at "
        "each run; declare it (docs/deployment.md section 5).",
    ),
    (
        "trusted_apps",
        "Flower app bundles this site accepts besides the code-free one that names the installed "
        "fedprompt: sha256 digests of bundles the site has reviewed. Even for these the installed code "
        "runs; any other bundle is refused ('untrusted app'). Keep empty.",
    ),
    (
        "log_records",
        "May this site's daemon log quote values read from the records (a record's text, a label outside "
        "the label space, a patient id) when it refuses bad records? false: file, line and field only; "
        "`fedprompt data check` shows the values at your own terminal. Keep false.",
    ),
    (
        "reply_after_s",
        "Timing: every reply leaves this many seconds after its message arrived (or, if not ready, at twice, "
        "four times ... that): set it above this site's slowest round, so that how long the site took says "
        "nothing about its records. 0: replies leave when ready.",
    ),
    ("device", "'auto' (a GPU if there is one), 'cpu' or 'cuda'."),
    (
        "backbone",
        "The frozen text encoder: a local HuggingFace model directory, the same as every other site's "
        "(its fingerprint is checked every round). null: the embedded all-MiniLM-L6-v2.",
    ),
    (
        "max_physical_batch_size",
        "The most records per forward/backward pass (memory only; the privacy accounting does not depend on it).",
    ),
    (
        "limits",
        "Plans this site refuses before reading a record, calibrating noise or writing to the ledger: "
        "what one run may cost this host and this site's privacy. Raise a limit only on purpose.",
    ),
    (
        "limits.max_total_rounds",
        "The most rounds a run may plan (the noise is calibrated for all of them at the first round).",
    ),
    (
        "limits.min_total_rounds",
        "The fewest rounds a private run's noise may be calibrated for: fewer would spend the run's "
        "whole epsilon in a few low-noise updates.",
    ),
    (
        "limits.max_steps",
        "The most DP-SGD steps a run may plan (steps per round x rounds): calibration and training grow "
        "with it (calibrating 20,000 steps took 35 s and 0.9 GB on a busy 2-core host).",
    ),
    ("limits.max_labels", "The largest label space this site trains or evaluates."),
    ("limits.max_tensor_values", "The most values in the prompt and head together (4 bytes each)."),
    (
        "limits.allow_fixed_batch",
        "Accept plans that fix the expected batch (batch_size)? The sample rate and the epsilon this "
        "site reports then follow its size. Keep false.",
    ),
    (
        "limits.max_run_epsilon",
        "The most epsilon one run may target; a plan asking for more is refused. null: the lifetime cap "
        "privacy.max_epsilon, which then wins silently over a larger target.",
    ),
]

HEADER = """\
# {name}: this hospital's fedprompt site config (docs/deployment.md section 4), written by
# `fedprompt hospital init`. Its settings win over anything the aggregator asks for.
# Fill in every line marked REQUIRED, then check the site (no federation.yaml needed):
#   fedprompt data check --site {path}
# and create the privacy ledger, once in the life of the site:
#   fedprompt privacy init --site {path}
"""


# The nested sections of site.yaml: written as their fields, one by one.
SECTIONS: dict[str, type[Schema]] = {"privacy": PrivacyCap, "limits": SiteLimits}


def _defaults() -> dict[str, object]:
    """Each field's default (dotted names), PydanticUndefined for the required ones."""
    out: dict[str, object] = {
        name: f.get_default(call_default_factory=True)
        for name, f in SiteConfig.model_fields.items()
        if name not in SECTIONS
    }
    for section, cls in SECTIONS.items():
        for name, f in cls.model_fields.items():
            out[f"{section}.{name}"] = f.get_default(call_default_factory=True)
    return out


def _scalar(value: object) -> str:
    """`value` as one line of YAML that reads back as itself."""
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()
    if "\n" in text or yaml.safe_load(text) != value:  # a JSON string is a YAML double-quoted scalar, on one line
        text = json.dumps(value, ensure_ascii=False)
    return text


def render(values: Mapping[str, object], name: str = "site.yaml", path: str = "site.yaml") -> tuple[str, list[str]]:
    """The template's text with `values` (dotted field -> value) filled in, and the fields still REQUIRED."""
    defaults = _defaults()
    lines, required = [HEADER.format(name=name, path=path).rstrip("\n")], []
    for key, meaning in LAYOUT:
        depth = key.count(".")
        indent = "  " * depth
        field = key.rsplit(".", 1)[-1]
        if key in SECTIONS:
            lines += ["", *textwrap.wrap(meaning, 100, initial_indent="# ", subsequent_indent="# "), f"{key}:"]
            continue
        default = defaults[key]
        value = values.get(key, RECOMMENDED.get(key, None if default is PydanticUndefined else default))
        if value is None and default is PydanticUndefined:
            note, text = "REQUIRED.", "null"
            required.append(key)
        elif default is PydanticUndefined:
            note, text = (
                f"Required; recommended: {_scalar(RECOMMENDED[key])}." if key in RECOMMENDED else "Required.",
                _scalar(value),
            )
        else:
            note, text = f"Default: {_scalar(default)}.", _scalar(value)
        comment = textwrap.wrap(
            meaning.replace("THIS", path),
            100 - len(indent),
            initial_indent=f"{indent}# ",
            subsequent_indent=f"{indent}# ",
        )
        lines += ([""] if depth == 0 else []) + comment + [f"{indent}# {note}", f"{indent}{field}: {text}"]
    return "\n".join(lines) + "\n", required


def check_values(values: Mapping[str, object]) -> None:
    """The given (top-level) values, by the rules SiteConfig itself applies; InputError names the
    command-line flag (`hospital_id` -> `--hospital-id`)."""

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    problems = [
        Problem(flag(key), None, None, f"expected a non-empty value without control characters, got {str(value)!r}")
        for key, value in values.items()
        if not str(value).strip() or any(ord(c) < 32 for c in str(value))
    ]
    probe = {
        "hospital_id": "probe",
        "train": "train.csv",
        "ledger": "ledger.json",
        "privacy": {"max_epsilon": RECOMMENDED["privacy.max_epsilon"], "delta": RECOMMENDED["privacy.delta"]},
        **values,
    }
    flagged = {p.path for p in problems}  # one problem per flag: the blank ones are named above
    problems += [
        Problem(flag(key), None, None, message)
        for key, message in SiteConfig.issues_of(probe)
        if key in values and flag(key) not in flagged
    ]
    if problems:
        raise InputError(problems)


def write_template(out: Path, values: Mapping[str, object]) -> list[str]:
    """Write the template to `out` (never over an existing file); returns the fields still REQUIRED."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise InputError.at(out, "already exists; refusing to overwrite it (edit that file, or choose another --out)")
    check_values(values)
    absolute = out.resolve()
    text, required = render(values, name=str(values.get("hospital_id", "site.yaml")), path=str(absolute))
    try:
        absolute.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(absolute, text.encode("utf-8"))
    except OSError as exc:
        raise InputError.at(out, f"cannot write the template: {exc.strerror or exc}") from None
    return required


def pin_labels(site_path: Path, labels: list[str]) -> bool:
    """Pin `labels` (the federation's label space) in the site.yaml at `site_path`, appended as a
    `labels:` line so that its comments stay; True if written, False if it already pins that set.
    InputError if it pins another one: changing the pin is the site's decision, made in the file."""
    site = SiteConfig.load(site_path)
    if site.labels is not None:
        if set(site.labels) == set(labels):
            return False
        raise InputError.at(
            site_path,
            f"labels: already pins {', '.join(site.labels)}; not {', '.join(labels)}: edit the file to change it",
        )
    text = Path(site_path).read_text(encoding="utf-8")
    line = f"labels: {_scalar(list(labels))}"
    # The template's `labels: null` is replaced in place; a file without the key gets it at the end.
    text, replaced = re.subn(r"^labels:[ \t]*(?:null|~)?[ \t]*$", line, text, count=1, flags=re.MULTILINE)
    if not replaced:
        note = "# The federation's label space this site trains on: a plan with another one is refused."
        text += ("" if text.endswith("\n") else "\n") + f"{note}\n{line}\n"
    atomic_write(Path(site_path), text.encode("utf-8"))
    return True
