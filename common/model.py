"""Frozen encoder + soft prompt + linear head, and its saved form (config.json + safetensors)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import torch
from pydantic import AfterValidator, Field, ValidationError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from .atomic import atomic_write
from .backbone import Backbone
from .config import (
    MaxLength,
    ModelSettings,
    NVirtualTokens,
    Pooling,
    PrivacyRequest,
    PromptInit,
    PromptLayer,
    PromptStyle,
    Seed,
    distinct_labels,
)
from .errors import InputError, Problem
from .schema import NonEmptyStr, Schema, Sha256, issues

# PromptConfig.prompt_layer: where the soft prompt enters the encoder. 0: at the input (prepended to
# the word embeddings); k in 1..L-1: a "late" prompt, concatenated to the output of layer k-1, so
# layers 0..k-1 see the record alone and their output can be computed once and cached;
# NO_PROMPT: the record path is the plain encoder (the zero-shot classifier's features), the
# prompt tensor still travels (the wire format is fixed) but nothing reads it.
NO_PROMPT = -1
# PromptConfig.prompt_style, for a late prompt (prompt_layer k >= 1; the input prompt is tokens):
#   "tokens": the virtual tokens are concatenated to the states entering layer k; layers k.. attend
#             over both (an untrained prompt changes every record's features);
#   "prefix": the virtual tokens are keys and values that layer k's queries attend to in a softmax of
#             their own, added to the layer's attention output; the values carry no bias, so a prompt
#             near zero adds (almost) nothing and round 0 is the plain encoder (the zero-shot start).
PROMPT_STYLES = ("tokens", "prefix")
# A prefix starts at this fraction of the label tokens' layer-k states, centred: its values then add
# O(scale^2) to the layer's output (the prompt's own softmax is near uniform over centred keys).
PREFIX_INIT_SCALE = 1e-3
# Encoders whose layers take (hidden_states, attention_mask) alone: a late prompt runs their
# upper layers on its own. MPNet's layers also take a relative position bias computed from the
# sequence length, which virtual tokens do not have.
LATE_PROMPT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

# The only tensors that ever leave a hospital, under these fixed names.
PROMPT_KEY = "prompt.weight"
HEAD_WEIGHT_KEY = "head.weight"
HEAD_BIAS_KEY = "head.bias"
TRAINABLE_KEYS = (PROMPT_KEY, HEAD_WEIGHT_KEY, HEAD_BIAS_KEY)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "prompt.safetensors"
FORMAT = "fedprompt-prompt/1"


# The model's defaults are ModelSettings' (federation.yaml `model:`), defined there once.
_MODEL, _PRIVACY = ModelSettings(), PrivacyRequest()


@dataclass
class PromptConfig:
    """Everything needed to rebuild the classifier around the same backbone."""

    labels: list[str]
    hidden_size: int
    backbone_fingerprint: str
    n_virtual_tokens: int = _MODEL.n_virtual_tokens
    pooling: str = _MODEL.pooling
    max_length: int = _MODEL.max_length
    prompt_init: str = _MODEL.prompt_init
    # L2-normalise the pooled representation: the head is then a cosine classifier (its rows
    # start as label prototypes, so round 0 is the zero-shot classifier) and every record's
    # feature has norm 1, which bounds a head gradient before DP clipping.
    normalize: bool = _MODEL.normalize
    # federation.yaml's null (the last layer) needs the backbone: plan.prompt_config resolves it; a
    # config built in code without one puts the prompt at the input.
    prompt_layer: int = 0
    prompt_style: str = _MODEL.prompt_style
    seed: int = _MODEL.seed
    private: bool = _PRIVACY.private
    extra: dict = field(default_factory=dict)  # provenance (rounds, epsilons, run name)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def has_prompt(self) -> bool:
        """Whether the soft prompt is on the record path (see NO_PROMPT)."""
        return self.prompt_layer != NO_PROMPT

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            PROMPT_KEY: (self.n_virtual_tokens, self.hidden_size),
            HEAD_WEIGHT_KEY: (self.num_labels, self.hidden_size),
            HEAD_BIAS_KEY: (self.num_labels,),
        }


class SoftPrompt(nn.Module):
    """`n_virtual x hidden` learned vectors prepended to every sequence: to its word embeddings
    (prompt_layer 0) or to its hidden states entering layer k (a late prompt).

    Kept in its own module with no buffers so that Opacus can hook it; its exact per-sample
    gradient is registered in `common/grad_samplers.py` (the same for both places: the output
    is cat(weight, input) in either case).
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


def position_budget(encoder: PreTrainedModel, config: PromptConfig) -> tuple[int, int]:
    """(positions the records and an input prompt use, positions the encoder has).

    RoBERTa-style embeddings number positions from padding_idx + 1, so they reserve
    padding_idx + 1 (two, for RoBERTa) of max_position_embeddings. A late prompt enters after
    the position embeddings (at layer k, where nothing reads positions any more): its virtual
    tokens need no position, only the record's tokens do.
    """
    max_pos = int(getattr(encoder.config, "max_position_embeddings", 512))
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    reserved = padding_idx + 1 if isinstance(padding_idx, int) else 0
    virtual = config.n_virtual_tokens if config.prompt_layer == 0 else 0
    return reserved + virtual + config.max_length, max_pos


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, H] from the top layer's states of the record's own tokens ([B, T, H], mask [B, T])."""
    if pooling == "cls":
        return hidden[..., 0, :]
    # mean over real tokens (how all-MiniLM-L6-v2 was trained)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers, in the BERT-family layout (LATE_PROMPT_MODEL_TYPES): encoder.encoder.layer."""
    return cast(nn.ModuleList, cast(nn.Module, encoder.encoder).layer)


def lower_states(
    encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int
) -> torch.Tensor:
    """The encoder's hidden states entering layer k (k >= 1): embeddings, then layers 0..k-1."""
    hidden = cast(nn.Module, encoder.embeddings)(input_ids=input_ids)
    if hasattr(encoder, "embeddings_project"):  # ELECTRA: embedding size -> hidden size
        hidden = cast(nn.Module, encoder.embeddings_project)(hidden)
    return run_layers(encoder, hidden, attention_mask, 0, k)


def run_layers(
    encoder: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Encoder layers start..stop-1 on `hidden` ([B, T, H]) with a 2-D padding mask ([B, T]).

    The 4-D mask is built by the same transformers helper the encoder's own forward uses, so it
    has the format the configured attention implementation ("sdpa", "eager", ...) expects.
    """
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in encoder_layers(encoder)[start:stop]:
        hidden = layer(hidden, mask)
    return hidden


def prefix_layer(
    layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, prefix: torch.Tensor
) -> torch.Tensor:
    """One BERT-family layer whose queries also attend to `prefix` ([B, n, H]) in a softmax of its own.

    The record's own attention is the layer's (its configured implementation, `mask` from
    run_layers' helper); the prefix's context is added to it before the layer's output projection.
    The prefix's values use the value projection without its bias, so a zero prefix adds nothing.
    """
    block: Any = layer  # transformers' BERT-family layer: typed as a plain Module
    attention, sa = block.attention, block.attention.self
    context, _ = sa(hidden, attention_mask=mask)
    size = int(sa.attention_head_size)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, size).transpose(1, 2)

    values = nn.functional.linear(prefix, sa.value.weight)
    extra = nn.functional.scaled_dot_product_attention(
        heads(sa.query(hidden)), heads(sa.key(prefix)), heads(values), scale=float(sa.scaling)
    )
    context = context + extra.transpose(1, 2).reshape(context.shape)
    return block.feed_forward_chunk(attention.output(context, hidden))


class PromptClassifier(nn.Module):
    def __init__(self, backbone: Backbone, config: PromptConfig):
        super().__init__()
        if config.hidden_size != backbone.hidden_size:
            raise InputError.at(
                str(backbone.path), f"hidden size {backbone.hidden_size} != prompt's {config.hidden_size}"
            )
        layers = int(backbone.model.config.num_hidden_layers)
        if not NO_PROMPT <= config.prompt_layer < layers:
            raise InputError.at(
                str(backbone.path),
                f"prompt_layer {config.prompt_layer} is not {NO_PROMPT} (no prompt), 0 (input) or a layer "
                f"1..{layers - 1} of this {layers}-layer encoder",
                field="prompt_layer",
            )
        model_type = backbone.model.config.model_type
        if config.prompt_style not in PROMPT_STYLES:
            raise InputError.at(
                str(backbone.path),
                f"prompt_style {config.prompt_style!r} is not one of {', '.join(PROMPT_STYLES)}",
                field="prompt_style",
            )
        if config.prompt_layer > 0 and model_type not in LATE_PROMPT_MODEL_TYPES:
            raise InputError.at(
                str(backbone.path),
                f"a late prompt (prompt_layer {config.prompt_layer}) needs one of: "
                f"{', '.join(LATE_PROMPT_MODEL_TYPES)} (this encoder is {model_type!r})",
                field="prompt_layer",
            )
        used, max_pos = position_budget(backbone.model, config)
        if used > max_pos:
            raise InputError.at(
                str(backbone.path),
                f"max_length {config.max_length} + {used - config.max_length} positions (virtual tokens at the "
                f"input, positions the encoder reserves) = {used} exceeds the encoder's {max_pos} positions",
            )
        self.config = config
        self.backbone_fingerprint = backbone.fingerprint  # what the encoder really is (cache keys)
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
        """What the head sees: the pooled encoder output over the record (and the prompt, where it
        enters), normalised if configured."""
        input_ids, attention_mask = cut_padding(input_ids, attention_mask)
        return self.features_from_states(self.layer_states(input_ids, attention_mask), attention_mask)

    @torch.no_grad()
    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The record's part of the path that no trainable tensor touches, [B, T, H]: its word
        embeddings (prompt_layer 0), its hidden states entering layer k (a late prompt: cacheable,
        common/features.py cached_layer_states), or the top layer's states (no prompt)."""
        k = self.config.prompt_layer
        if k == 0:
            return self.encoder.get_input_embeddings()(input_ids)
        if k == NO_PROMPT:  # the plain encoder, exactly as the label prototypes are computed
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return lower_states(self.encoder, input_ids, attention_mask, k)

    def features_from_states(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """features() from layer_states() (computed now or cached, in any float precision).

        `states` is [B, T, H], or [P, R, T, H] for patient-level DP (R records of each of P patients,
        padding records masked out): the prompt is then drawn once per patient (its per-sample
        gradient is the patient's), and the features come back [P, R, H]."""
        states, attention_mask = cut_padding(states, attention_mask)
        lead = states.shape[:-2]
        states, mask = states.flatten(0, -3), attention_mask.flatten(0, -2)
        if self.config.prompt_layer == NO_PROMPT:
            hidden = states
        else:
            # the trainable part runs in the trainable tensors' precision (float32) whatever the cache holds
            x = states.to(self.head.weight.dtype)
            # one copy of the prompt per DP unit (SoftPrompt's grad sampler reads each copy's gradient)
            prompt = self.prompt(x.new_zeros(lead[0], 0, x.shape[-1]))
            if len(lead) == 2:
                prompt = prompt.repeat_interleave(lead[1], dim=0)
            hidden = self._upper_layers(x, mask, prompt)
        pooled = pool(hidden, mask, self.config.pooling).unflatten(0, lead)
        return nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def _upper_layers(self, x: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The top layer's states of the record's own tokens, from the states where the prompt enters."""
        k, n = self.config.prompt_layer, self.config.n_virtual_tokens
        layers = len(encoder_layers(self.encoder))
        if self.config.prompt_style == "prefix" and k > 0:
            lower = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=x, attention_mask=mask)
            x = prefix_layer(encoder_layers(self.encoder)[k], x, lower, prompt)
            return run_layers(self.encoder, x, mask, k + 1, layers)
        x = torch.cat([prompt, x], 1)
        ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
        full = torch.cat([ones, mask], 1)
        if k == 0:
            hidden = self.encoder(inputs_embeds=x, attention_mask=full).last_hidden_state
        else:
            hidden = run_layers(self.encoder, x, full, k, layers)
        return hidden[:, n:]  # the record's own positions ([CLS] first)

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


class LayerStateClassifier(nn.Module):
    """A PromptClassifier's logits from its cached layer states: forward(states, mask).

    What DP-SGD wraps to train a late prompt + head on cached_layer_states() rows
    (states, mask, labels): only the layers above the prompt run per step. Its trainable
    parameters are the classifier's own (prompt and head, shared, not copied).
    """

    def __init__(self, model: PromptClassifier):
        super().__init__()
        self.model = model

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.features_from_states(states, attention_mask))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.model.trainable_parameters()


class IndexedStateClassifier(nn.Module):
    """A PromptClassifier's logits for rows of cached layer states picked by index: forward(index).

    `index` is [B] record rows, or [P, R] rows of each of P patients (-1: padding), so the table
    DP-SGD samples is (index, labels): a few bytes a row whatever the states' size, and a patient's
    records are gathered only when the patient is drawn. The states stay where they were cached
    (CPU memory); each batch's rows move to the model's device.
    """

    def __init__(self, model: PromptClassifier, states: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.states, self.attention_mask = states, attention_mask  # not buffers: never copied to a device whole

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        rows = index.clamp(min=0).cpu()
        device = self.model.head.weight.device
        mask = self.attention_mask[rows].to(device) * (index >= 0).unsqueeze(-1).to(device)
        return self.model.head(self.model.features_from_states(self.states[rows].to(device), mask))


def cut_padding(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs are padded to max_length (cached states to their longest record): cut both to the
    longest real sequence in this batch."""
    longest = max(int(attention_mask.sum(dim=-1).max().item()), 1) if attention_mask.numel() else 1
    dim = attention_mask.dim() - 1  # the token axis, in x and in the mask
    return x.narrow(dim, 0, min(longest, x.shape[dim])), attention_mask.narrow(dim, 0, min(longest, x.shape[dim]))


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
    prompt = table[rows].clone()
    if config.prompt_layer > 0:
        # A late prompt lives among layer-k hidden states, whose scale is not the word
        # embeddings': start from the same tokens' states entering layer k (run as one sequence).
        with torch.no_grad():
            ids = rows.unsqueeze(0).to(embeddings.device)
            prompt = lower_states(backbone.model, ids, torch.ones_like(ids), config.prompt_layer)[0].float().cpu()
        if config.prompt_style == "prefix":  # (a late prompt's form: the input prompt is tokens)
            prompt = PREFIX_INIT_SCALE * (prompt - prompt.mean(0))
    bound = 1.0 / config.hidden_size**0.5
    return {
        PROMPT_KEY: prompt,
        HEAD_WEIGHT_KEY: (torch.rand(config.num_labels, config.hidden_size, generator=gen) * 2 - 1) * bound,
        HEAD_BIAS_KEY: torch.zeros(config.num_labels),
    }


def build_model(
    backbone: Backbone, config: PromptConfig, state: dict[str, torch.Tensor] | None = None
) -> PromptClassifier:
    model = PromptClassifier(backbone, config)
    model.load_trainable_state(state if state is not None else initial_state(backbone, config))
    return model


class PromptSchema(Schema):
    """PromptConfig's fields as a round plan and an export carry them, validated. A field added after
    the first plans and exports has a default: what those meant without it (not today's default,
    which PromptConfig takes from ModelSettings)."""

    labels: Annotated[list[NonEmptyStr], Field(min_length=2), AfterValidator(distinct_labels)]
    hidden_size: Annotated[int, Field(ge=1)]
    backbone_fingerprint: Sha256
    n_virtual_tokens: NVirtualTokens
    pooling: Pooling
    max_length: MaxLength
    prompt_init: PromptInit
    prompt_layer: PromptLayer = 0  # absent: the prompt at the input
    prompt_style: PromptStyle = "tokens"  # absent: concatenated tokens
    normalize: bool
    seed: Seed


class SavedConfig(PromptSchema):
    """An export's config.json (less its `format`), validated when it is loaded."""

    normalize: bool = False  # absent: an export written before it, trained on raw pooled features
    private: bool
    extra: dict[str, Any] = {}


def save_prompt(directory: str | Path, config: PromptConfig, state: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    saved = SavedConfig.model_validate(asdict(config))  # never writes what load_prompt would refuse
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(
        directory / WEIGHTS_NAME,
        save_tensors({k: v.contiguous() for k, v in state.items()}, metadata={"format": FORMAT}),
    )
    payload = {"format": FORMAT, **saved.model_dump()}
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
        config = PromptConfig(**SavedConfig.model_validate(raw).model_dump())
    except ValidationError as exc:
        raise InputError(
            [Problem(str(cfg_path), None, key, message) for key, message in issues(SavedConfig, exc)]
        ) from None
    try:
        state = load_file(str(w_path))
    except Exception as exc:
        raise InputError.at(w_path, f"unreadable safetensors: {exc}") from None
    expected = config.shapes()
    if set(state) != set(expected) or any(tuple(state[k].shape) != s for k, s in expected.items()):
        raise InputError.at(w_path, f"tensors {[(k, tuple(v.shape)) for k, v in state.items()]} != expected {expected}")
    return config, state
