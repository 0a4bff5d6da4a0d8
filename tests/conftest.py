"""Helpers the test modules share. Fixtures: a tiny backbone per session (`tiny_backbone`, `tiny_dir`,
`other_dir`), the late-prompt modules' encoders (`bert`, `roberta`) and the CLI with a few commands
registered (`cli_with`, `data_cli`). Imported (`from conftest import ...`): FAST, `make_workspace`,
`edit_yaml`, `cli_main` (`cli_with` for module fixtures), the late-prompt records (PROMPT_*). Markers
(pyproject.toml): `simulation` and `subprocess` for tests that start a federation or another process
(both in the default run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tinybert import make_tiny_backbone

# A federation a tiny backbone runs in seconds: 3 rounds of DP-SGD on 32-token records.
FAST = {
    "rounds": 3,
    "min_hospitals": 1,
    "model": {"n_virtual_tokens": 4, "max_length": 32},
    "training": {"local_epochs": 1, "batch_size": 8, "lr": 0.05},
    "privacy": {"target_epsilon": 2.0},
}


def edit_yaml(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrite the YAML file at `path` with `change` applied to its data (in place)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def make_workspace(
    root: Path,
    backbone: Path | None,
    *,
    hospitals: int = 3,
    per_hospital: int = 60,
    test_size: int = 60,
    overrides: dict | None = None,
    cap: float = 10.0,
    allow_non_private: bool = True,
    accountant: str | None = None,
    name: str = "t",
    seed: int = 1,
) -> Path:
    """root/ws: the seeded synthetic demo federation (`overrides`, default FAST), each site on `backbone`
    (None: the embedded default) with epsilon cap `cap` and, if given, `accountant`. No ledgers yet."""
    from fedprompt.client.demo_data import generate_demo
    from fedprompt.client.workspace import list_hospitals, write_workspace

    demo = generate_demo(hospitals=hospitals, per_hospital=per_hospital, test_size=test_size, seed=seed)
    ws = write_workspace(
        root / "ws",
        name=name,
        labels=demo.labels,
        hospitals=demo.hospitals,
        test_rows=demo.test,
        federation_overrides=FAST if overrides is None else overrides,
        epsilon_cap=cap,
        allow_non_private=allow_non_private,
        backbone=backbone,
    )
    if accountant is not None:  # "rdp": PRV costs seconds per epsilon on a shared 2-core box
        for site in list_hospitals(ws):
            edit_yaml(site, lambda d: d["privacy"].update(accountant=accountant))
    return ws


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_backbone(**options)`: tests/tinybert.py's random BERT (hidden 32, 2 layers unless `options`
    say otherwise), built once per session for each set of options. Tests only read it."""
    built: dict[tuple, Path] = {}

    def get(**options) -> Path:
        options = {"hidden": 32, "layers": 2, **options}
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
        if key not in built:
            built[key] = make_tiny_backbone(tmp_path_factory.mktemp("tinybert").resolve(), **dict(key))
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_dir(tiny_backbone) -> Path:
    """The default tiny backbone's folder."""
    return tiny_backbone()


@pytest.fixture(scope="session")
def other_dir(tiny_backbone) -> Path:
    """Same architecture and vocabulary as `tiny_dir`, other weights: another fingerprint."""
    return tiny_backbone(seed=7)


def cli_main(patch: pytest.MonkeyPatch, *commands: str) -> Callable[..., int]:
    """`fedprompt.cli.main` with only `commands` registered (until `patch` is undone): the real CLI's
    argument and error handling, without importing the other (heavier) commands."""
    from fedprompt import cli

    patch.setattr(cli, "COMMANDS", commands)
    return cli.main


@pytest.fixture
def cli_with(monkeypatch) -> Callable[..., Callable[..., int]]:
    """`cli_with("data", ...)`: `cli_main` for one test."""
    return lambda *commands: cli_main(monkeypatch, *commands)


@pytest.fixture
def data_cli(cli_with):
    """`fedprompt.cli.main` with only the `data` command registered."""
    return cli_with("data")


# The late-prompt modules' encoders and records (tests/test_late_prompt.py, test_prompt_recipe.py):
# records of different lengths, so that padding is exercised.
PROMPT_LAYERS = 4
PROMPT_MAX_LENGTH = 24
PROMPT_TEXTS = [
    "chest pain heart blood pressure",
    "brain seizure nerve headache with no fever and a normal exam of the patient",
    "tumor mass",
    "stomach liver bowel gastric colon history",
    "the patient denies pain",
    "carcinoma neoplasm of the colon with infection and inflammation",
]
PROMPT_LABELS = [0, 1, 2, 1, 0, 2]


@pytest.fixture(scope="session")
def bert(tiny_backbone):
    """The tiny BERT with PROMPT_LAYERS layers, loaded."""
    from fedprompt.common.backbone import load_backbone

    return load_backbone(tiny_backbone(layers=PROMPT_LAYERS))


@pytest.fixture(scope="session")
def roberta(tmp_path_factory, bert):
    """A RoBERTa-style encoder (positions from padding_idx + 1 = 2) with exactly PROMPT_MAX_LENGTH + 2
    positions, on the tiny BERT's tokenizer: the other BERT-family layout the late prompt supports."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    from fedprompt.common.backbone import load_backbone

    directory = tmp_path_factory.mktemp("roberta")
    bert.tokenizer.save_pretrained(directory)
    torch.manual_seed(1)
    config = RobertaConfig(
        vocab_size=len(bert.tokenizer),
        hidden_size=32,
        num_hidden_layers=PROMPT_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=PROMPT_MAX_LENGTH + 2,
        pad_token_id=1,
    )
    RobertaModel(config).save_pretrained(directory)
    return load_backbone(directory)
