"""Frozen encoder + soft prompt + linear head, and its saved form (config.json + safetensors)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from .atomic import atomic_write
from .backbone import Backbone
from .errors import InputError

# The only tensors that ever leave a hospital, under these fixed names.
PROMPT_KEY = "prompt.weight"
HEAD_WEIGHT_KEY = "head.weight"
HEAD_BIAS_KEY = "head.bias"
TRAINABLE_KEYS = (PROMPT_KEY, HEAD_WEIGHT_KEY, HEAD_BIAS_KEY)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "prompt.safetensors"
FORMAT = "fedprompt-prompt/1"


@dataclass
class PromptConfig:
    """Everything needed to rebuild the classifier around the same backbone."""

    labels: list[str]
    hidden_size: int
    backbone_fingerprint: str
    n_virtual_tokens: int = 20
    pooling: str = "mean"
    max_length: int = 128
    prompt_init: str = "labels"
    # L2-normalise the pooled representation: the head is then a cosine classifier (its rows
    # start as label prototypes, so round 0 is the zero-shot classifier) and every record's
    # feature has norm 1, which bounds a head gradient before DP clipping. Absent in exports
    # written before it existed: those were trained on raw pooled features.
    normalize: bool = False
    seed: int = 0
    private: bool = True
    extra: dict = field(default_factory=dict)  # provenance (rounds, epsilons, run name)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            PROMPT_KEY: (self.n_virtual_tokens, self.hidden_size),
            HEAD_WEIGHT_KEY: (self.num_labels, self.hidden_size),
            HEAD_BIAS_KEY: (self.num_labels,),
        }


class SoftPrompt(nn.Module):
    """`n_virtual x hidden` learned vectors prepended to every sequence's word embeddings.

    Kept in its own module with no buffers so that Opacus can hook it; its exact per-sample
    gradient is registered in `common/grad_samplers.py`.
    """

    def __init__(self, n_virtual: int, hidden: int):
        super().__init__()
        self.n_virtual = n_virtual
        self.weight = nn.Parameter(torch.zeros(n_virtual, hidden))

    def forward(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        batch = word_embeddings.shape[0]
        # expand (no copy) per sample: each sample's gradient w.r.t. its own prompt slice
        # is what the grad sampler reads back, so nothing is summed over the batch here.
        prompt = self.weight.unsqueeze(0).expand(batch, -1, -1).to(word_embeddings.dtype)
        return torch.cat([prompt, word_embeddings], dim=1).contiguous()


class PromptClassifier(nn.Module):
    def __init__(self, backbone: Backbone, config: PromptConfig):
        super().__init__()
        if config.hidden_size != backbone.hidden_size:
            raise InputError.at(
                str(backbone.path), f"hidden size {backbone.hidden_size} != prompt's {config.hidden_size}"
            )
        max_pos = getattr(backbone.model.config, "max_position_embeddings", 512)
        if config.n_virtual_tokens + config.max_length > max_pos:
            raise InputError.at(
                str(backbone.path),
                f"n_virtual_tokens + max_length = {config.n_virtual_tokens + config.max_length} "
                f"exceeds the encoder's {max_pos} positions",
            )
        self.config = config
        self.encoder_tokenizer = backbone.tokenizer
        self.encoder = backbone.model
        self.encoder.requires_grad_(False)
        self.prompt = SoftPrompt(config.n_virtual_tokens, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.num_labels)

    def train(self, mode: bool = True) -> PromptClassifier:
        super().train(mode)
        # The encoder is frozen and stays in eval mode (no dropout): the backbone is a fixed
        # feature map, which also makes per-sample gradients reproducible for the checks.
        self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the head sees: the pooled encoder output over prompt + text (normalised if configured)."""
        # Inputs are padded to max_length; cut to the longest real sequence in this batch.
        longest = max(int(attention_mask.sum(dim=1).max().item()), 1) if attention_mask.numel() else 1
        input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        with torch.no_grad():
            words = self.encoder.get_input_embeddings()(input_ids)
        x = self.prompt(words)
        n = self.config.n_virtual_tokens
        ones = torch.ones(attention_mask.shape[0], n, dtype=attention_mask.dtype, device=attention_mask.device)
        hidden = self.encoder(inputs_embeds=x, attention_mask=torch.cat([ones, attention_mask], 1)).last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden[:, n]  # [CLS] sits right after the virtual tokens
        else:  # mean over real tokens (how all-MiniLM-L6-v2 was trained)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden[:, n:] * m).sum(1) / m.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    # --- trainable state -------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        # torch types nn.Linear's weight and bias as Tensor: they are Parameters
        head_weight, head_bias = self.head.weight, self.head.bias
        assert isinstance(head_weight, nn.Parameter) and isinstance(head_bias, nn.Parameter)
        return {PROMPT_KEY: self.prompt.weight, HEAD_WEIGHT_KEY: head_weight, HEAD_BIAS_KEY: head_bias}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", torch.float32).clone() for k, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        if set(state) != set(params):
            raise ValueError(f"trainable keys {sorted(state)} != {sorted(params)}")
        with torch.no_grad():
            for k, p in params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"{k}: shape {tuple(state[k].shape)} != {tuple(p.shape)}")
                p.copy_(state[k].to(p.device, p.dtype))

    # --- saved form --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return save_prompt(directory, self.config, self.trainable_state())

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone) -> PromptClassifier:
        config, state = load_prompt(directory)
        if config.backbone_fingerprint != backbone.fingerprint:
            raise InputError.at(
                Path(directory) / CONFIG_NAME,
                f"trained on backbone {config.backbone_fingerprint[:16]}..., but the local backbone "
                f"({backbone.path}) is {backbone.fingerprint[:16]}...",
                field="backbone_fingerprint",
            )
        model = cls(backbone, config)
        model.load_trainable_state(state)
        return model


def initial_state(backbone: Backbone, config: PromptConfig) -> dict[str, torch.Tensor]:
    """Deterministic (by `config.seed`) starting prompt and head, the same on every machine."""
    gen = torch.Generator().manual_seed(config.seed)
    embeddings = backbone.model.get_input_embeddings().weight
    assert isinstance(embeddings, torch.Tensor)
    table = embeddings.detach().float().cpu()
    n = config.n_virtual_tokens
    if config.prompt_init == "labels":
        ids = backbone.tokenizer(" ".join(config.labels), add_special_tokens=False)["input_ids"] or [0]
        rows = torch.tensor([ids[i % len(ids)] for i in range(n)])
    else:  # random vocabulary rows
        rows = torch.randint(0, table.shape[0], (n,), generator=gen)
    bound = 1.0 / config.hidden_size**0.5
    return {
        PROMPT_KEY: table[rows].clone(),
        HEAD_WEIGHT_KEY: (torch.rand(config.num_labels, config.hidden_size, generator=gen) * 2 - 1) * bound,
        HEAD_BIAS_KEY: torch.zeros(config.num_labels),
    }


def build_model(
    backbone: Backbone, config: PromptConfig, state: dict[str, torch.Tensor] | None = None
) -> PromptClassifier:
    model = PromptClassifier(backbone, config)
    model.load_trainable_state(state if state is not None else initial_state(backbone, config))
    return model


def save_prompt(directory: str | Path, config: PromptConfig, state: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(
        directory / WEIGHTS_NAME,
        save_tensors({k: v.contiguous() for k, v in state.items()}, metadata={"format": FORMAT}),
    )
    payload = {"format": FORMAT, **asdict(config)}
    atomic_write(directory / CONFIG_NAME, (json.dumps(payload, indent=2) + "\n").encode())
    return directory


def load_prompt(directory: str | Path) -> tuple[PromptConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InputError.at(p, "missing (expected an exported fedprompt model directory)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError.at(cfg_path, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError.at(cfg_path, f"expected a JSON object, got {type(raw).__name__}")
    if raw.pop("format", None) != FORMAT:
        raise InputError.at(cfg_path, f"expected format {FORMAT!r}", field="format")
    try:
        config = PromptConfig(**raw)
    except TypeError as exc:
        raise InputError.at(cfg_path, f"bad prompt config: {exc}") from None
    try:
        state = load_file(str(w_path))
    except Exception as exc:
        raise InputError.at(w_path, f"unreadable safetensors: {exc}") from None
    expected = config.shapes()
    if set(state) != set(expected) or any(tuple(state[k].shape) != s for k, s in expected.items()):
        raise InputError.at(w_path, f"tensors {[(k, tuple(v.shape)) for k, v in state.items()]} != expected {expected}")
    return config, state
