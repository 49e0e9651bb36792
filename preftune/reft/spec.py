"""What a set of LoReFT interventions is, without torch: the position and layer syntax and the
saved config. :mod:`preftune.config` validates ``--reft_*`` flags against this module, so parsing
options never imports the model code."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PreftuneError
from ..rundir import REFT_CONFIG_FILE

__all__ = ["ReftConfig", "parse_positions", "parse_layers", "read_reft_config", "FORMAT"]

FORMAT = "preftune-loreft-v1"


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
    format: str = FORMAT

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


    def to_json(self) -> dict:
        """The ``reft_config.json`` object (plus the trainable-parameter count, for readers)."""
        meta = asdict(self)
        meta["trainable_parameters"] = self.num_parameters()
        return meta


def read_reft_config(run_dir: Path) -> ReftConfig:
    """``reft_config.json`` of ``run_dir`` as a :class:`ReftConfig`; one-line errors when missing or invalid."""
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
