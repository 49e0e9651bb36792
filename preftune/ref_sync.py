"""TR-DPO: a reference model that follows the policy (``--sync_ref_model``).

Gorbatovski et al. 2024, *Learn Your Reference Model for Real Good Alignment*, arXiv:2404.09656,
"soft update": every ``τ`` optimizer steps (``--ref_model_sync_steps``, at global steps τ, 2τ, ...)
::

    θ_ref ← α θ + (1 − α) θ_ref            (α: --ref_model_mixup_alpha)

parameter by parameter, as TRL's ``SyncRefModelCallback``. It needs a separate reference model
(the frozen copy of the starting policy, or ``--ref_model_name_or_path`` with the same
architecture): a PEFT run's adapters-off reference is the policy's own base weights, and a
precomputed reference has no weights at all.

The synced reference is part of the training state: every checkpoint gets
``ref_model.safetensors`` (:data:`preftune.rundir.SYNCED_REF_MODEL_FILE`, written before the
checkpoint is marked complete), and a resumed run
loads it, so resuming continues with the same reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import PreftuneError
from .rundir import CHECKPOINT_PREFIX, SYNCED_REF_MODEL_FILE

__all__ = ["RefModelSyncCallback", "mix_into"]


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``reference ← alpha · policy + (1 − alpha) · reference``, parameter by parameter."""
    ref_params, policy_params = list(reference.parameters()), list(policy.parameters())
    if len(ref_params) != len(policy_params) or any(r.shape != p.shape for r, p in zip(ref_params, policy_params)):
        raise PreftuneError("--sync_ref_model needs a reference model with the policy's architecture (same parameters and shapes)")
    for r, p in zip(ref_params, policy_params):
        r.mul_(1.0 - alpha).add_(p.to(r.dtype), alpha=alpha)


class RefModelSyncCallback(TrainerCallback):
    """Mix the policy into ``reference`` every ``steps`` optimizer steps; save and restore it with checkpoints."""

    def __init__(self, reference: nn.Module, alpha: float, steps: int):
        self.reference = reference
        self.alpha = alpha
        self.steps = steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # ``model`` is the Trainer's own model (not the DDP wrapper; PEFT is refused for TR-DPO)
        if state.global_step % self.steps == 0:
            mix_into(self.reference, model, self.alpha)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if ckpt.is_dir():
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.reference.state_dict().items()}
            save_file(_untied(tensors), str(ckpt / SYNCED_REF_MODEL_FILE))

    def load(self, checkpoint: str | Path) -> bool:
        """Load the synced reference saved in ``checkpoint``; False when the checkpoint has none."""
        path = Path(checkpoint) / SYNCED_REF_MODEL_FILE
        if not path.is_file():
            return False
        from safetensors.torch import load_file

        saved = load_file(str(path))
        current = self.reference.state_dict()
        with torch.no_grad():
            for name, tensor in current.items():
                if name in saved:
                    tensor.copy_(saved[name].to(tensor.dtype))
        return True


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): give each name its own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        key = t.untyped_storage().data_ptr()
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out
