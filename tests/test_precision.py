"""Mixed precision: ``--bf16 true|false|auto`` and ``--fp16`` on any device, bf16 where it is fast.

* ``auto`` is the default (CLI, YAML, the ``PreftuneConfig`` dataclass) and follows the hardware
  (CPU flags are faked here, so both answers are exercised on any machine);
* ``--bf16 false`` is fp32, ``--fp16 true`` works beside the default, and the start-up line, the
  run_config.json, the model card and the report say what ran and why;
* the flags need no ``--use_cpu`` on a machine without an accelerator;
* a bf16 training step really runs in bf16 (the engine calls the decoder itself, so accelerate's
  autocast-wrapped ``forward`` is not what applies it) and agrees with fp32 on the first-step
  loss and gradients within bf16 tolerance.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from preftune import precision
from preftune.commands.train import parse_train_args
from preftune.errors import PreftuneError
from preftune.precision import resolve_precision

FAST_CPU, SLOW_CPU = {"avx512f", "avx512_bf16"}, {"avx2", "avx512f"}
COMMON = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl"]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule; on a GPU machine auto asks the GPU")


@pytest.mark.parametrize("flags,fast", [(FAST_CPU, True), ({"amx_bf16", "amx_tile"}, True), (SLOW_CPU, False), (set(), False)])
def test_bf16_auto_follows_the_cpu(monkeypatch, flags, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    choice = resolve_precision("auto", False, "cpu")
    assert choice.bf16 is fast and not choice.fp16
    assert ("CPU has AVX512-BF16" in choice.reason or "CPU has AMX-BF16" in choice.reason) is fast
    assert choice.describe().startswith("bf16 mixed precision" if fast else "fp32 compute")
    # explicit choices do not look at the hardware
    assert resolve_precision("true", False, "cpu").bf16 and not resolve_precision(False, False, "cpu").bf16


@CPU_ONLY
@pytest.mark.parametrize("flags,fast", [(FAST_CPU, True), (SLOW_CPU, False)])
def test_the_default_is_auto_on_the_cli_in_yaml_and_in_the_dataclass(monkeypatch, tmp_path, flags, fast):
    from preftune.config import PreftuneConfig

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    want = ("bf16 mixed precision (auto: CPU has AVX512-BF16; --bf16 false for fp32)" if fast else
            "fp32 compute (auto: CPU lacks AVX512-BF16 and AMX-BF16, where bf16 is emulated and slower; --bf16 true for bf16)")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nbeta: 0.2\n")
    for args in (parse_train_args(COMMON)[2], parse_train_args(["--config", str(yaml_file)])[2], parse_train_args([])[2],  # [] is the demo
                 PreftuneConfig(output_dir=str(tmp_path / "o"))):
        assert args.precision_choice.describe() == want
        assert args.bf16 is fast and args.fp16 is False
        assert args.use_cpu is fast  # set only for bf16: transformers refuses bf16 on a CPU without it


@CPU_ONLY
def test_bf16_false_is_fp32_and_fp16_works_beside_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_flags", lambda: FAST_CPU)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nbf16: false\n")  # a YAML bool
    for args in (parse_train_args(COMMON + ["--bf16", "false"])[2], parse_train_args(["--config", str(yaml_file)])[2]):
        assert args.bf16 is False and args.fp16 is False and not args.use_cpu  # exactly the fp32 path of before
        assert args.precision_choice.describe() == "fp32 compute (--bf16 false)"
    # --fp16 true wins over the default auto; a CPU has no fp16 autocast (accelerate), so it runs fp32 and says so
    _, _, args = parse_train_args(COMMON + ["--fp16", "true"])
    assert args.bf16 is False and args.fp16 is False
    assert args.precision_choice.describe() == "fp32 compute (--fp16 true, which a CPU runs as fp32; --bf16 true for mixed precision)"
    # on a GPU the same flags give fp16 autocast
    gpu = resolve_precision("auto", True, "cuda")
    assert gpu.fp16 and not gpu.bf16 and gpu.describe() == "fp16 mixed precision (--fp16 true)"


def test_precision_flags_parse_without_use_cpu():
    _, _, args = parse_train_args(COMMON + ["--bf16"])  # a bare flag means true, as for every bool flag
    assert args.bf16 is True and args.precision_choice.reason == "--bf16 true"
    if not torch.cuda.is_available():
        assert args.use_cpu  # set for the user: transformers refuses bf16 on a CPU without it
    _, _, args = parse_train_args(COMMON + ["--bf16", "auto"])
    assert isinstance(args.bf16, bool) and args.precision_choice.reason.startswith("auto: ")
    with pytest.raises(PreftuneError, match="--bf16 must be true, false or auto, got 'fast'"):
        parse_train_args(COMMON + ["--bf16", "fast"])
    with pytest.raises(PreftuneError, match="choose one of --bf16 true and --fp16 true"):
        parse_train_args(COMMON + ["--bf16", "true", "--fp16", "true"])


@CPU_ONLY
@pytest.mark.parametrize("flags", [[], ["--bf16", "false"], ["--fp16", "true"]], ids=["default", "bf16-false", "fp16"])
def test_the_run_records_the_precision_it_used(tmp_path, caplog, flags):
    """The start-up line, run_config.json, the model card and the report name what ran: with the
    default, whatever auto chose on this machine; the resolved bools are what TrainingArguments got."""
    from preftune.cli import main
    from preftune.report import render_report

    out = tmp_path / "run"
    no_table = mock.patch("preftune.demo.evaluate_demo", return_value={"preference_accuracy": 0.0, "generation_accuracy": 0.0})
    with no_table, caplog.at_level("INFO", logger="preftune"):
        assert main(["train", "--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true", *flags]) == 0
    want = resolve_precision("false" if "--bf16" in flags else "auto", "--fp16" in flags, "cpu")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preftune: device"))
    assert want.describe() in line
    config = json.loads((out / "run_config.json").read_text())
    assert config["precision"] == want.describe()
    assert config["training"]["bf16"] is want.bf16 and config["training"]["fp16"] is want.fp16
    assert f"| precision | {want.describe()} |" in (out / "README.md").read_text()
    assert want.describe() in render_report(out, rerender_curves=False)


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
