"""Saving and loading ReFT interventions (``reft_interventions.safetensors`` + ``reft_config.json``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import PreftuneError
from ..rundir import REFT_CONFIG_FILE, REFT_WEIGHTS_FILE, write_json
from .interventions import ReftInterventions, add_interventions, get_reft, hidden_size_of
from .spec import FORMAT, read_reft_config

__all__ = ["save_interventions", "save_reft", "load_reft"]


def save_interventions(reft: ReftInterventions, output_dir: str | Path) -> None:
    """Write ``reft_interventions.safetensors`` and ``reft_config.json`` into ``output_dir``."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(reft.tensors(), str(out / REFT_WEIGHTS_FILE), metadata={"format": "pt", "preftune": FORMAT})
    write_json(out / REFT_CONFIG_FILE, reft.config.to_json())


def save_reft(model: nn.Module, output_dir: str | Path):
    reft = get_reft(model)
    if reft is None:
        raise PreftuneError("this model carries no ReFT interventions")
    save_interventions(reft, output_dir)



def load_reft(run_dir: str | Path, base_model: nn.Module | str | None = None) -> nn.Module:
    """Put the saved interventions of ``run_dir`` on ``base_model`` (a model, a path, or None).

    None loads the base model named in ``reft_config.json``. Returns the model in eval mode with
    frozen interventions; generate with :func:`reft_generate` / :func:`generate_with_reft`.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir).expanduser()
    config = read_reft_config(run_dir)
    if base_model is None or isinstance(base_model, (str, Path)):
        name = str(base_model) if base_model is not None else config.base_model_name_or_path
        if not name:
            raise PreftuneError(f"{str(run_dir)!r}: the ReFT config names no base model (built-in demo?); pass base_model")
        from ..training_model import causal_lm_from_pretrained, choose_device

        choice = choose_device()
        base_model = causal_lm_from_pretrained(name, kind="base model", dtype=choice.dtype, attn_implementation=choice.attn_implementation)
    if hidden_size_of(base_model) != config.hidden_size:
        raise PreftuneError(f"the ReFT interventions in {str(run_dir)!r} need hidden size {config.hidden_size}, the base model has {hidden_size_of(base_model)}")
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


