"""Mixed precision: ``--bf16 true|false|auto`` and ``--fp16`` on any device, bf16 where it is fast.

* ``auto`` follows the hardware (CPU flags are faked here, so both answers are exercised);
* the flags need no ``--use_cpu`` on a machine without an accelerator;
* a bf16 training step really runs in bf16 (the engine calls the decoder itself, so accelerate's
  autocast-wrapped ``forward`` is not what applies it) and agrees with fp32 on the first-step
  loss and gradients within bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from preftune import precision
from preftune.commands.train import parse_train_args
from preftune.errors import PreftuneError
from preftune.precision import resolve_precision


@pytest.mark.parametrize("flags,fast", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx2", "avx512f"}, False), (set(), False)])
def test_bf16_auto_follows_the_cpu(monkeypatch, flags, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    choice = resolve_precision("auto", False, "cpu")
    assert choice.bf16 is fast and not choice.fp16
    assert ("CPU with AVX512-BF16" in choice.reason or "CPU with AMX-BF16" in choice.reason) is fast
    assert choice.describe().startswith("bf16 mixed precision" if fast else "fp32 compute")
    # explicit choices do not look at the hardware
    assert resolve_precision("true", False, "cpu").bf16 and not resolve_precision(False, False, "cpu").bf16
    # --fp16 on a CPU: accelerate has no fp16 autocast there, so it is fp32, and says so; fp16 on a GPU
    on_cpu, on_gpu = resolve_precision("false", True, "cpu"), resolve_precision("false", True, "cuda")
    assert not on_cpu.fp16 and not on_cpu.bf16 and on_cpu.describe().startswith("fp32 compute (--fp16 true, which a CPU runs as fp32")
    assert on_gpu.fp16 and on_gpu.describe() == "fp16 mixed precision (--fp16 true)"


def test_precision_flags_parse_without_use_cpu():
    common = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl"]
    _, _, args = parse_train_args(common + ["--bf16"])  # a bare flag means true, as for every bool flag
    assert args.bf16 is True and args.precision_choice.reason == "--bf16 true"
    if not torch.cuda.is_available():
        assert args.use_cpu  # set for the user: transformers refuses bf16 on a CPU without it
    _, _, args = parse_train_args(common + ["--bf16", "auto"])
    assert isinstance(args.bf16, bool) and args.precision_choice.reason.startswith("--bf16 auto: ")
    _, _, args = parse_train_args(common + ["--fp16", "true"])
    assert not args.bf16 and args.fp16 is torch.cuda.is_available()  # what runs: fp32 on a CPU
    with pytest.raises(PreftuneError, match="--bf16 must be true, false or auto, got 'fast'"):
        parse_train_args(common + ["--bf16", "fast"])
    with pytest.raises(PreftuneError, match="choose one of --bf16 true and --fp16 true"):
        parse_train_args(common + ["--bf16", "true", "--fp16", "true"])


def _first_step(tmp_path, bf16: bool):
    """Loss and LoRA-free parameter gradients of the first training step (ORPO, packed layout,
    segment attention) on a tiny Llama."""
    from conftest import tiny_llama

    from preftune.attention import segment_implementation
    from preftune.config import PreftuneConfig
    from preftune.layout import PairTokens
    from preftune.trainer import PreferenceTrainer

    model = tiny_llama(seed=6, attn=segment_implementation("sdpa"), initializer_range=0.1)
    g = torch.Generator().manual_seed(8)
    r = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    pairs = [PairTokens([1] + r(n_p), r(n_c), r(n_r), i) for i, (n_p, n_c, n_r) in enumerate([(9, 4, 6), (3, 7, 2), (12, 2, 5), (5, 5, 5)])]
    args = PreftuneConfig(output_dir=str(tmp_path / ("bf16" if bf16 else "fp32")), bf16="true" if bf16 else "false",
                          per_device_train_batch_size=4, nll_on_prompt=True, report_to="none", memory_preflight=False)
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, pad_token_id=0)
    batch = trainer.data_collator(pairs)
    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), grads


def test_bf16_first_step_agrees_with_fp32(tmp_path):
    loss32, g32 = _first_step(tmp_path, bf16=False)
    loss16, g16 = _first_step(tmp_path, bf16=True)
    assert loss16.dtype == torch.float32  # the loss is computed in fp32
    rel = abs(loss16.item() - loss32.item()) / abs(loss32.item())
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); the loss sums many
    assert rel < 1e-2, rel
    assert rel > 1e-6, "bf16 run gave the fp32 loss: autocast was not applied"
    flat16, flat32 = torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32])
    assert flat16.dtype == torch.float32  # parameters and their gradients stay fp32
    cosine = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0).item()
    assert cosine > 0.999, cosine
