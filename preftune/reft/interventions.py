"""The LoReFT module, the interventions of one model, and attaching them to a model.

See :mod:`preftune.reft` for the maths and how positions reach the layers.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PreftuneError
from ..hf_helpers import unwrap_model
from .spec import ReftConfig, parse_layers

logger = logging.getLogger(__name__)

__all__ = ["LoReFT", "ReftInterventions", "add_interventions", "attach_reft", "get_reft", "disable_reft", "hidden_size_of"]

# The submodule name the interventions are registered under, so the optimizer, ``.to()`` and
# ``state_dict`` see them. Only this package reads it (through :func:`get_reft`).
SUBMODULE_NAME = "preftune_reft"


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

    # --- hooks, tensors --------------------------------------------------------------------------
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


# --- attaching to a model ----------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = unwrap_model(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for module in inner.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise PreftuneError(f"ReFT: cannot find the decoder layers of {type(inner).__name__}")


def hidden_size_of(model: nn.Module) -> int:
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def get_reft(model: nn.Module) -> ReftInterventions | None:
    """The interventions attached to ``model`` (None if it has none)."""
    return getattr(unwrap_model(model), SUBMODULE_NAME, None)


def add_interventions(model: nn.Module, config: ReftConfig, trainable: bool = True) -> ReftInterventions:
    """Attach LoReFT interventions to ``model`` in place and return them.

    The interventions become the submodule ``model.preftune_reft`` (so the optimizer, ``.to()``
    and ``state_dict`` see them). Whoever runs the model gets its batch context, generation and
    saving from :func:`preftune.reft.reft_hooks` (passed explicitly, never read off the model).
    """
    inner = unwrap_model(model)
    if get_reft(inner) is not None:
        raise PreftuneError("this model already carries ReFT interventions")
    layers = _decoder_layers(inner)
    bad = [layer for layer in config.layers if layer >= len(layers)]
    if bad:
        raise PreftuneError(f"--reft_layers {','.join(map(str, bad))}: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    reft = ReftInterventions(config, trainable=trainable)
    reft.to(next(inner.parameters()).device)
    reft.hook_into(layers)
    inner.add_module(SUBMODULE_NAME, reft)
    return reft


def _recorded_name(name: str | None) -> str | None:
    """The base model as reft_config.json records it: a local folder absolute (loadable from anywhere)."""
    from ..hub import local_path_or_name

    return None if name is None else local_path_or_name(name)


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
        hidden_size=hidden_size_of(model),
        base_model_name_or_path=_recorded_name(getattr(model_args, "model_name_or_path", None)),
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


