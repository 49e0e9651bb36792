"""Native LoReFT: low-rank representation interventions at chosen layers and prompt positions.

LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models", eq. 2) edits
the hidden state ``h`` (the block output of a decoder layer, the residual stream) at a few
token positions instead of updating weights::

    phi(h) = h + R^T (W h + b - R h)

    h   (H,)     block output of layer l at one intervened position (H = hidden size)
    R   (r, H)   projection with orthonormal rows (R R^T = I_r): the r-dim subspace edited
    W   (r, H)   learned linear source, b (r,) its bias (the paper's "learned projected source")
    r            rank (``--reft_rank``; the paper's and pyreft's ``low_rank_dimension``)

In the subspace spanned by R the representation is replaced by ``W h + b``; outside it ``h``
is untouched. R is kept orthonormal during training by ``torch.nn.utils.parametrizations
.orthogonal`` (as pyreft does). Unlike pyreft, ``W`` starts equal to ``R`` and ``b`` at 0, so an
untrained intervention is the identity and training starts from the base model exactly (as
LoRA's zero-initialised B does); a DPO reference copied from the starting policy is then the
base model.

Where (pyreft's ``--reft_positions`` syntax): ``fK`` = the first K prompt tokens, ``lK`` = the
last K prompt tokens, joined with ``+`` (``f1+l1``, ``f3``, ``l2``, ``f5+l5``). Prompt tokens
only, never completion tokens. With ``--reft_share_weights`` one intervention per layer acts on
the union of the first and last positions (pyreft's ``share_weights=True``); without it the
first and last positions get one intervention each (applied first-then-last where a short
prompt makes them overlap). Prompts shorter than K use all their tokens.

How the positions reach the layers: every intervened decoder layer carries a forward hook.
The hooks act only inside :meth:`ReftInterventions.at_prompts`, a context that resolves the
positions of every prompt occurrence of the current batch, given as ``prompt_spans`` rows
``(row, start, length)``, into flat indices of the ``(R * T)`` hidden states. The engine
enters it through the generic ``preftune_batch_context`` hook a model may carry (see
:func:`preftune.engine.token_logps`), for both batch layouts: the packed layout holds each
prompt once, the padded layout twice (chosen and rejected rows), and both give the same
log-probs. Outside the context the model is the plain base model. For generation,
:func:`reft_generate` enters it for the prefill forward only, so the prompt positions are
intervened on and generated tokens are not (pyreft's ``intervene_on_prompt=True``).

In transformers 5, gradient checkpointing wraps a layer's ``forward`` and forward hooks run
after it, outside the recomputed region (pinned by ``tests/test_reft.py``).

Saved files (``output_dir``): ``reft_interventions.safetensors`` (``layer{l}_{group}.R``,
``.W``, ``.b`` per intervention, R materialised) and ``reft_config.json`` (layers, rank,
positions, share_weights, hidden size, base model). :func:`load_reft` puts them back on a base
model; the reloaded model gives bit-identical outputs.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PreftuneError
from .hf_helpers import unwrap_model
from .rundir import REFT_CONFIG_FILE, REFT_WEIGHTS_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "ReftConfig", "LoReFT", "ReftInterventions", "parse_positions", "parse_layers",
    "attach_reft", "add_interventions", "get_reft", "disable_reft", "save_reft", "load_reft", "reft_generate",
    "generate_with_reft",
]

_FORMAT = "preftune-loreft-v1"


def parse_positions(text: str) -> list[tuple[str, int]]:
    """``"f1+l1"`` -> ``[("f", 1), ("l", 1)]`` (pyreft's position syntax)."""
    parts = [p.strip() for p in str(text).split("+")]
    out: list[tuple[str, int]] = []
    for part in parts:
        m = re.fullmatch(r"([fl])(\d+)", part)
        if m is None or int(m.group(2)) < 1:
            raise PreftuneError(f"--reft_positions {text!r}: expected fK, lK or fK+lK with K >= 1 (pyreft syntax), e.g. f1+l1")
        if any(kind == m.group(1) for kind, _ in out):
            raise PreftuneError(f"--reft_positions {text!r}: {m.group(1)}K given twice")
        out.append((m.group(1), int(m.group(2))))
    return out


def parse_layers(text: str | list[int]) -> list[int]:
    """``"18,28"`` -> ``[18, 28]`` (sorted, unique)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        layers = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError:
        raise PreftuneError(f"--reft_layers {text!r}: expected comma-separated layer indices, e.g. 18,28") from None
    if not layers or layers[0] < 0:
        raise PreftuneError(f"--reft_layers {text!r}: expected non-negative layer indices, e.g. 18,28")
    return layers


@dataclass
class ReftConfig:
    """What ``reft_config.json`` holds: enough to rebuild the interventions on their base model."""

    layers: list[int]
    rank: int
    positions: str
    share_weights: bool
    hidden_size: int
    base_model_name_or_path: str | None = None
    intervention: str = "LoReFT"
    component: str = "block_output"
    format: str = _FORMAT

    def groups(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """Intervention groups of one layer: ``[(name, [(kind, k), ...]), ...]``."""
        spec = parse_positions(self.positions)
        if self.share_weights and len(spec) > 1:
            return [("shared", spec)]
        return [("first" if kind == "f" else "last", [(kind, k)]) for kind, k in spec]

    def keys(self) -> list[str]:
        return [f"layer{layer}_{group}" for layer in self.layers for group, _ in self.groups()]

    def num_parameters(self) -> int:
        """Trainable parameters: per intervention R and W (r x H each) and b (r)."""
        return len(self.keys()) * (2 * self.rank * self.hidden_size + self.rank)


class LoReFT(nn.Module):
    """``phi(h) = h + R^T (W h + b - R h)`` on ``(N, H)`` hidden states (see the module docstring).

    ``rotate.weight`` is R ``(r, H)``, kept orthonormal by an orthogonal parametrization when
    ``orthogonal=True`` (training); a loaded, frozen intervention keeps R as a plain tensor.
    ``source`` is ``h -> W h + b``.
    """

    def __init__(self, hidden_size: int, rank: int, orthogonal: bool = True):
        super().__init__()
        if not 0 < rank <= hidden_size:
            raise PreftuneError(f"--reft_rank {rank} must be between 1 and the hidden size {hidden_size}")
        self.rotate = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(self.rotate.weight)  # orthonormal rows, since rank <= hidden
        if orthogonal:
            torch.nn.utils.parametrizations.orthogonal(self.rotate)
        self.source = nn.Linear(hidden_size, rank)
        with torch.no_grad():  # W = R, b = 0: the identity until trained
            self.source.weight.copy_(self.rotate.weight)
            self.source.bias.zero_()

    @property
    def R(self) -> torch.Tensor:
        return self.rotate.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        R = self.rotate.weight.contiguous()  # (r, H); evaluates the parametrization once (contiguous: same kernels as a loaded R)
        return h + (self.source(h) - h @ R.T) @ R


@dataclass
class _Positions:
    index: dict[str, torch.Tensor]  # group -> flat indices into (rows * seq_len)
    rows: int
    seq_len: int
    once: bool  # generation: drop the positions after the prefill forward


def _span_positions(spans: torch.Tensor, seq_len: int, kind: str, k: int) -> torch.Tensor:
    """Flat indices of the first/last ``k`` tokens of every prompt span ``(row, start, length)``."""
    rows, start, length = spans[:, 0:1], spans[:, 1:2], spans[:, 2:3]  # (K, 1) each
    j = torch.arange(k, device=spans.device)[None]  # (1, k)
    offset = j if kind == "f" else length - k + j  # (K, k) offsets inside the prompt
    valid = (offset >= 0) & (offset < length)
    return (rows * seq_len + start + offset)[valid]


class _LayerHook:
    """Forward hook of one decoder layer (a plain object, so ``copy.deepcopy`` rebinds it)."""

    def __init__(self, owner: "ReftInterventions", layer: int):
        self.owner = owner
        self.layer = layer

    def __call__(self, module, args, output):
        return self.owner._intervene(self.layer, output)


class ReftInterventions(nn.Module):
    """The LoReFT interventions of one model, their hooks, and the current prompt positions."""

    def __init__(self, config: ReftConfig, trainable: bool = True):
        super().__init__()
        self.config = config
        self.interventions = nn.ModuleDict({key: LoReFT(config.hidden_size, config.rank, orthogonal=trainable) for key in config.keys()})
        self._groups = config.groups()
        self._state: _Positions | None = None
        self._disabled = False
        self._handles: list = []
        for p in self.parameters():
            p.requires_grad_(trainable)

    # --- positions --------------------------------------------------------------------------
    @contextmanager
    def at_prompts(self, prompt_spans: torch.Tensor, rows: int, seq_len: int, once: bool = False):
        """Intervene at the configured positions of each prompt span ``(row, start, length)``.

        ``rows`` x ``seq_len`` is the shape of the hidden states the spans index into.
        """
        spans = prompt_spans.reshape(-1, 3).long()
        index = {}
        for group, spec in self._groups:
            idx = torch.cat([_span_positions(spans, seq_len, kind, k) for kind, k in spec])
            index[group] = torch.unique(idx) if len(spec) > 1 else idx  # union for shared f+l
        previous, self._state = self._state, _Positions(index, rows, seq_len, once)
        try:
            yield self
        finally:
            self._state = previous

    def batch_context(self, batch: dict):
        """The engine's per-batch hook: positions from ``batch['prompt_spans']``."""
        rows, seq_len = batch["input_ids"].shape
        return self.at_prompts(batch["prompt_spans"], rows, seq_len)

    @contextmanager
    def disabled(self):
        """The base model: no intervention acts (e.g. for a DPO reference)."""
        previous, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = previous

    def _intervene(self, layer: int, output):
        state = self._state
        if state is None or self._disabled:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (R, T, H)
        r, t, h = hidden.shape
        if (r, t) != (state.rows, state.seq_len):
            raise RuntimeError(
                f"ReFT positions were resolved for hidden states of shape ({state.rows}, {state.seq_len}) but layer {layer} "
                f"produced ({r}, {t}); enter at_prompts() around exactly one forward of that batch"
            )
        flat = hidden.reshape(r * t, h)  # (R*T, H)
        for group, _ in self._groups:
            idx = state.index[group]
            if idx.numel() == 0:
                continue
            module = self.interventions[f"layer{layer}_{group}"]
            dtype = module.source.weight.dtype
            edited = module(flat.index_select(0, idx).to(dtype)).to(flat.dtype)  # (N, H)
            flat = flat.index_copy(0, idx, edited)
        if state.once and layer == self.config.layers[-1]:
            self._state = None  # prefill done: generated tokens are not intervened on
        hidden = flat.view(r, t, h)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # --- hooks, saving --------------------------------------------------------------------------
    def hook_into(self, layers: nn.ModuleList):
        for layer in self.config.layers:
            self._handles.append(layers[layer].register_forward_hook(_LayerHook(self, layer)))

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, module in self.interventions.items():
            out[f"{key}.R"] = module.rotate.weight.detach().cpu().contiguous()
            out[f"{key}.W"] = module.source.weight.detach().cpu().contiguous()
            out[f"{key}.b"] = module.source.bias.detach().cpu().contiguous()
        return out

    def save_pretrained(self, output_dir: str | Path):
        """Write ``reft_interventions.safetensors`` and ``reft_config.json`` into ``output_dir``."""
        from safetensors.torch import save_file

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(out / REFT_WEIGHTS_FILE), metadata={"format": "pt", "preftune": _FORMAT})
        meta = asdict(self.config)
        meta["trainable_parameters"] = self.config.num_parameters()
        (out / REFT_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --- attaching to a model ----------------------------------------------------------------------
def _inner(model: nn.Module) -> nn.Module:
    return unwrap_model(model)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = _inner(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for module in inner.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise PreftuneError(f"ReFT: cannot find the decoder layers of {type(inner).__name__}")


def _hidden_size(model: nn.Module) -> int:
    config = _inner(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def get_reft(model: nn.Module) -> ReftInterventions | None:
    """The interventions attached to ``model`` (None if it has none)."""
    return getattr(_inner(model), "preftune_reft", None)


def add_interventions(model: nn.Module, config: ReftConfig, trainable: bool = True) -> ReftInterventions:
    """Attach LoReFT interventions to ``model`` in place and return them.

    The interventions become the submodule ``model.preftune_reft`` (so the optimizer, ``.to()``
    and ``state_dict`` see them); the model gets ``preftune_batch_context`` (entered by the
    engine around each forward) and ``preftune_save_pretrained`` (called by
    ``PreferenceTrainer.save_model``).
    """
    inner = _inner(model)
    if get_reft(inner) is not None:
        raise PreftuneError("this model already carries ReFT interventions")
    layers = _decoder_layers(inner)
    bad = [layer for layer in config.layers if layer >= len(layers)]
    if bad:
        raise PreftuneError(f"--reft_layers {','.join(map(str, bad))}: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    reft = ReftInterventions(config, trainable=trainable)
    reft.to(next(inner.parameters()).device)
    reft.hook_into(layers)
    inner.preftune_reft = reft
    inner.preftune_batch_context = reft.batch_context
    inner.preftune_save_pretrained = reft.save_pretrained
    return reft


def attach_reft(model: nn.Module, model_args) -> nn.Module:
    """Freeze ``model`` and add trainable LoReFT interventions as ``model_args`` asks.

    Returns the same model, ready for :class:`preftune.trainer.PreferenceTrainer` with any
    method. Only the intervention parameters are trainable (counted, logged and checked).
    """
    config = ReftConfig(
        layers=parse_layers(model_args.reft_layers),
        rank=int(model_args.reft_rank),
        positions=model_args.reft_positions,
        share_weights=bool(model_args.reft_share_weights),
        hidden_size=_hidden_size(model),
        base_model_name_or_path=getattr(model_args, "model_name_or_path", None),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    reft = add_interventions(model, config, trainable=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = config.num_parameters()
    if trainable != expected or trainable != sum(p.numel() for p in reft.parameters()):
        raise RuntimeError(f"ReFT: {trainable} trainable parameters, expected {expected} (intervention parameters only)")
    logger.info(
        "ReFT: %d LoReFT interventions (layers %s, rank %d, positions %s%s): %d trainable parameters, %.4f%% of %d",
        len(reft.interventions), ",".join(map(str, config.layers)), config.rank, config.positions,
        ", shared" if config.share_weights else "", trainable, 100.0 * trainable / max(total, 1), total,
    )
    return model


@contextmanager
def disable_reft(model: nn.Module):
    """Run ``model`` as its base model (interventions off), e.g. for DPO reference log-probs."""
    reft = get_reft(model)
    if reft is None:
        yield model
        return
    with reft.disabled():
        yield model


def save_reft(model: nn.Module, output_dir: str | Path):
    reft = get_reft(model)
    if reft is None:
        raise PreftuneError("this model carries no ReFT interventions")
    reft.save_pretrained(output_dir)


def _read_config(run_dir: Path) -> ReftConfig:
    path = run_dir / REFT_CONFIG_FILE
    if not path.is_file():
        raise PreftuneError(f"{str(run_dir)!r} has no {REFT_CONFIG_FILE}; pass the output_dir of a ReFT run")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return ReftConfig(
            layers=[int(x) for x in meta["layers"]], rank=int(meta["rank"]), positions=str(meta["positions"]),
            share_weights=bool(meta["share_weights"]), hidden_size=int(meta["hidden_size"]),
            base_model_name_or_path=meta.get("base_model_name_or_path"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PreftuneError(f"{str(path)!r} is not a valid ReFT config ({type(e).__name__}: {e})") from None


def load_reft(run_dir: str | Path, base_model: nn.Module | str | None = None) -> nn.Module:
    """Put the saved interventions of ``run_dir`` on ``base_model`` (a model, a path, or None).

    None loads the base model named in ``reft_config.json``. Returns the model in eval mode with
    frozen interventions; generate with :func:`reft_generate` / :func:`generate_with_reft`.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir).expanduser()
    config = _read_config(run_dir)
    if base_model is None or isinstance(base_model, (str, Path)):
        name = str(base_model) if base_model is not None else config.base_model_name_or_path
        if not name:
            raise PreftuneError(f"{str(run_dir)!r}: the ReFT config names no base model (built-in demo?); pass base_model")
        from .config import ModelArguments
        from .modeling import choose_device, load_model

        base_model = load_model(name, ModelArguments(model_name_or_path=name), choose_device())
    if _hidden_size(base_model) != config.hidden_size:
        raise PreftuneError(f"the ReFT interventions in {str(run_dir)!r} need hidden size {config.hidden_size}, the base model has {_hidden_size(base_model)}")
    weights_path = run_dir / REFT_WEIGHTS_FILE
    if not weights_path.is_file():
        raise PreftuneError(f"{str(run_dir)!r} has {REFT_CONFIG_FILE} but no {REFT_WEIGHTS_FILE}")
    tensors = load_file(str(weights_path))
    expected = {f"{key}.{part}" for key in config.keys() for part in ("R", "W", "b")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PreftuneError(f"{str(weights_path)!r} does not match {REFT_CONFIG_FILE} (missing {missing[:3]}, unexpected {extra[:3]})")
    for p in base_model.parameters():
        p.requires_grad_(False)
    reft = add_interventions(base_model, config, trainable=False)
    with torch.no_grad():
        for key, module in reft.interventions.items():
            module.rotate.weight.copy_(tensors[f"{key}.R"])
            module.source.weight.copy_(tensors[f"{key}.W"])
            module.source.bias.copy_(tensors[f"{key}.b"])
    base_model.eval()
    return base_model


# --- generation --------------------------------------------------------------------------------
def reft_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with the interventions applied to the prompt positions during prefill.

    ``input_ids`` ``(B, T)``: prompts, left-padded when ``B > 1`` (give ``attention_mask``).
    Generated tokens are not intervened on. Needs the KV cache (the default). Returns what
    ``generate`` returns (prompt + new tokens).
    """
    reft = get_reft(model)
    if reft is None:
        raise PreftuneError("reft_generate: this model carries no ReFT interventions (load them with load_reft)")
    if generate_kwargs.get("use_cache") is False:
        raise PreftuneError("reft_generate needs use_cache=True: the interventions act on the prompt during prefill only")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, seq_len = input_ids.shape
    lengths = attention_mask.sum(1)  # (B,)
    starts = seq_len - lengths
    real = torch.arange(seq_len, device=input_ids.device)[None] >= starts[:, None]
    if not torch.equal(real, attention_mask.bool()):
        raise PreftuneError("reft_generate: pad batched prompts on the left (tokenizer.padding_side = 'left')")
    gen_config = getattr(model, "generation_config", None)
    expand = int(generate_kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1)
    expand *= int(generate_kwargs.get("num_return_sequences", getattr(gen_config, "num_return_sequences", 1)) or 1)
    spans = torch.stack([torch.arange(rows * expand, device=input_ids.device), starts.repeat_interleave(expand), lengths.repeat_interleave(expand)], 1)
    with reft.at_prompts(spans, rows * expand, seq_len, once=True):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


def generate_with_reft(model: nn.Module, tokenizer, prompt, max_new_tokens: int = 128, **generate_kwargs) -> str:
    """Generate a reply to one prompt and return the new text.

    ``prompt``: a string (tokenized with the tokenizer's special tokens, BOS included, unless the
    string already starts with BOS, as a rendered chat template does) or a list of chat messages
    (rendered with the tokenizer's chat template and a generation prompt).
    """
    if isinstance(prompt, (list, tuple)):
        prompt = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)), return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = reft_generate(model, ids, max_new_tokens=max_new_tokens, **generate_kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
