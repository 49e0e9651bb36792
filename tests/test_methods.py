"""The method registry and what it drives: declarations, configuration checks, DPO mixtures and
options on the engine (LD-DPO weights, WPO), the eval loss, and the equivalences every loss must
keep: gradient accumulation == one large batch and 2 processes == 1 (every method and loss type),
resume == uninterrupted (BCO running mean, TR-DPO reference)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from preftune.config import ModelArguments, PreftuneConfig
from preftune.engine import SequenceLogps, reduce_sequence_logps, sequence_logps
from preftune.errors import PreftuneError
from preftune.layout import PairTokens, collate_pairs
from preftune.methods import METHODS, Hyperparameters, get_method
from preftune.objective import METRIC_DOCS, Window, compute_objective

from conftest import FP32, REPO, free_port, tiny_llama

f64 = torch.float64


def test_every_declaration_is_complete():
    hp_fields = {f.name for f in dataclasses.fields(Hyperparameters)}
    config_fields = {f.name for f in dataclasses.fields(PreftuneConfig)}
    for name, spec in METHODS.items():
        assert spec.name == name and spec.logps in ("average", "sum") and spec.summary
        assert set(spec.hyperparameters) <= hp_fields & config_fields, name
        assert set(spec.metrics) <= set(METRIC_DOCS), name
        assert len(set(spec.loss_types)) == len(spec.loss_types)
        args = PreftuneConfig(output_dir="/tmp/unused", method=name, use_cpu=True)
        assert args.needs_reference == spec.needs_reference and args.loss_type == list(spec.loss_types[:1])
    assert {"orpo", "dpo", "simpo", "cpo", "sft", "kto"} <= set(METHODS)  # the shipped methods; a new one needs no edit here


@pytest.mark.parametrize("settings,message", [
    (dict(method="orpo", loss_type="sigmoid"), "--loss_type chooses a variant of dpo or kto"),
    (dict(method="dpo", loss_type="kto"), "--loss_type must be one of sigmoid, hinge"),
    (dict(method="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per --loss_type: got 1 weights for 2"),
    (dict(method="dpo", loss_type=["nca_pair"], f_divergence_type="js_divergence"), "has no form for --loss_type nca_pair"),
    (dict(method="dpo", loss_type="aot", use_weighting=True), "does not work with --loss_type aot"),
    (dict(method="dpo", loss_type="exo_pair"), "exo_pair needs --label_smoothing > 0"),
    (dict(method="dpo", sync_ref_model=True, precompute_ref_log_probs=True), "cannot be precomputed"),
    (dict(method="orpo", ld_alpha=0.5), "--ld_alpha does not apply to --method orpo"),
    (dict(method="dpo", simpo_gamma=1.0), "--simpo_gamma does not apply to --method dpo (it is a setting of simpo)"),
    (dict(method="orpo", cpo_alpha=0.5), "--cpo_alpha does not apply to --method orpo (it is a setting of cpo, slic)"),
    (dict(method="dpo", ld_alpha=1.5), "--ld_alpha must be in"),
    (dict(method="dpo", f_divergence_type="hellinger"), "--f_divergence_type must be one of"),
    (dict(method="kto", per_device_train_batch_size=1), "--per_device_train_batch_size of at least 2"),
    (dict(method="kto", max_tokens_per_batch=512), "--max_tokens_per_batch does not work with --method kto"),
    (dict(method="kto", loss_type=["kto", "apo_zero_unpaired"]), "takes one --loss_type"),
    (dict(method="kto", train_sampling_strategy="group_by_length"), "takes batches in data order"),
    (dict(method="sft", sync_ref_model=True), "--method sft has no reference model"),
    (dict(method="simpo", precompute_ref_log_probs=True), "--precompute_ref_log_probs is a reference-model option and --method simpo has no "
     "reference model: it applies to --method dpo, kto only"),
    (dict(method="orpo", ref_model_name_or_path="base"), "--ref_model_name_or_path is a reference-model option"),
    (dict(method="cpo", ref_model_mixup_alpha=0.5), "--ref_model_mixup_alpha is a reference-model option"),
    (dict(method="rlhf"), "--method must be one of orpo, dpo"),
])
def test_configuration_mistakes_are_one_line_errors(settings, message):
    with pytest.raises(PreftuneError, match=re.escape(message)):
        PreftuneConfig(output_dir="/tmp/unused", use_cpu=True, **settings)


def test_loss_type_lists_on_the_command_line_and_in_yaml(tmp_path):
    from preftune.commands.train import build_train_parser, parse_train_args

    _, _, args = parse_train_args(["--method", "dpo", "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"])
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: dpo\nloss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1]\n")
    _, _, args = parse_train_args(["--config", str(cfg)])
    assert args.loss_type == ["sigmoid", "bco_pair", "sft"] and args.loss_weights == [0.8, 0.2, 1.0]
    cfg.write_text("method: kto\nloss_type: apo_zero_unpaired\n")
    assert parse_train_args(["--config", str(cfg)])[2].loss_type == ["apo_zero_unpaired"]
    assert parse_train_args(["--method", "kto"])[2].train_sampling_strategy == "sequential"
    help_text = build_train_parser().format_help()
    for name in ("discopop", "sigmoid_norm", "apo_zero_unpaired", "kto:", "--ld_alpha", "--sync_ref_model", "--desirable_weight", "--label_column"):
        assert name in help_text, name


# --------------------------------------------------------------------------------------------
# DPO mixtures and options in the objective


def fake_seq(n=5, seed=0, aligned=False):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (2, n), generator=g).to(f64)
    sums = -torch.rand(2, n, generator=g, dtype=f64) * counts * 3
    extra = dict(chosen_aligned_sum=-torch.rand(n, generator=g, dtype=f64) * counts[0], rejected_aligned_sum=-torch.rand(n, generator=g, dtype=f64) * counts[1]) if aligned else {}
    return SequenceLogps(sums[0], sums[1], counts[0], counts[1], -sums[0] * 1.1, counts[0] + 2, **extra), (sums[0] + 0.3, sums[1] - 0.2)


def ls(x):
    return -torch.log1p(torch.exp(-x))


def test_mpo_mixture_is_the_weighted_sum_trl_computes():
    """0.8 sigmoid + 0.2 bco_pair + 1.0 sft: sft is the token-mean NLL of the batch's chosen completions."""
    seq, ref = fake_seq()
    hp = Hyperparameters(beta=0.1, loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0))
    got = compute_objective(get_method("dpo"), hp, seq, Window(pairs=5, nll_tokens=float(seq.nll_count.sum())), ref=ref).loss
    c, r = seq.chosen_sum - ref[0], seq.rejected_sum - ref[1]
    sigmoid = -ls(0.1 * (c - r))
    bco = -ls(0.1 * c) - ls(-0.1 * r)
    nll = seq.nll_sum.sum() / seq.nll_count.sum()
    assert got.item() == pytest.approx((0.8 * sigmoid.mean() + 0.2 * bco.mean() + nll).item(), rel=1e-12)


def test_wpo_weights_scale_every_term_including_sft():
    """TRL multiplies each loss type's per-pair loss by w_c w_r, the sft term (a batch constant) too."""
    seq, ref = fake_seq(aligned=True)
    hp = Hyperparameters(beta=0.1, loss_type=("ipo", "sft"), loss_weights=(1.0, 0.5), use_weighting=True)
    got = compute_objective(get_method("dpo"), hp, seq, Window(pairs=5, nll_tokens=float(seq.nll_count.sum())), ref=ref).loss
    w = torch.exp(seq.chosen_aligned_sum / seq.chosen_count + seq.rejected_aligned_sum / seq.rejected_count)
    c, r = seq.chosen_sum - ref[0], seq.rejected_sum - ref[1]
    ipo = (c / seq.chosen_count - r / seq.rejected_count - 1 / 0.2) ** 2
    nll = seq.nll_sum.sum() / seq.nll_count.sum()
    assert got.item() == pytest.approx(((ipo * w).mean() + 0.5 * (nll * w).mean()).item(), rel=1e-12)


def test_bco_running_mean_shifts_rewards_by_the_mean_over_steps():
    seq, ref = fake_seq()
    dpo = get_method("dpo")
    hp = Hyperparameters(beta=0.1, loss_type=("bco_pair",), bco_running_mean=True)
    values = {"reward": torch.tensor([0.2, 0.4], dtype=f64)}
    state = dpo.advance_state({}, values, hp)  # step 1: mean 0.3
    state = dpo.advance_state(state, {"reward": torch.tensor([0.9], dtype=f64)}, hp)  # step 2: (0.3 + 0.9) / 2
    assert state == {"bco_steps": 2, "bco_reward_shift": pytest.approx(0.6)}
    window = Window(pairs=5, nll_tokens=1.0, values={"reward": torch.zeros(5, dtype=f64)}, index=torch.arange(5), state=state)
    got = compute_objective(dpo, hp, seq, window, ref=ref).loss
    c, r = seq.chosen_sum - ref[0], seq.rejected_sum - ref[1]
    assert got.item() == pytest.approx((-ls(0.1 * c - 0.6) - ls(-(0.1 * r - 0.6))).mean().item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# the engine's LD-DPO weights and WPO sums


def test_ld_alpha_weights_the_tail_of_the_longer_completion():
    # chosen 5 tokens, rejected 2: shared length 2; chosen tokens 3-5 weigh alpha, prompt tokens are not summed
    pair = PairTokens([1, 7, 8], [10, 11, 12, 13, 14], [20, 21], 0)
    for layout in ("packed", "padded"):
        batch = collate_pairs([pair], 0, layout, score_prompt=True, tail_weight=0.25)
        logps = -(torch.arange(len(batch["score_target"]), dtype=f64) + 1.0)  # a distinct value per scored token
        seq = reduce_sequence_logps(batch, logps)
        by_seq = {s: logps[(batch["score_seq"] == s) & batch["score_is_completion"]].tolist() for s in (0, 1)}
        c, r = by_seq[0], by_seq[1]
        assert seq.chosen_sum.item() == pytest.approx(c[0] + c[1] + 0.25 * (c[2] + c[3] + c[4]))
        assert seq.rejected_sum.item() == pytest.approx(r[0] + r[1])
        assert seq.nll_sum.item() == pytest.approx(-logps[batch["score_seq"] == 0].sum().item())  # NLL unweighted, prompt included


def test_wpo_aligned_sums_equal_the_full_softmax():
    model = tiny_llama(seed=4)
    pairs = [PairTokens([1, 5, 9, 3], [40, 41, 2], [50, 2], 0), PairTokens([1, 6], [7, 8, 9, 10, 2], [11, 12, 2], 1)]
    batch = collate_pairs(pairs, 0, "packed")
    with torch.no_grad():
        seq = sequence_logps(model, batch, chunk_size=3, with_aligned=True)
        for i, p in enumerate(pairs):
            for completion, got in ((p.chosen, seq.chosen_aligned_sum[i]), (p.rejected, seq.rejected_aligned_sum[i])):
                ids = torch.tensor([p.prompt + completion])
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)[len(p.prompt) - 1 : -1]
                target = logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
                want = (target - torch.logsumexp(2 * logp, -1)).sum()
                assert got.item() == pytest.approx(want.item(), abs=2e-5)  # float32 engine, float64 reference


# --------------------------------------------------------------------------------------------
# eval loss


def test_eval_loss_is_the_objectives_own_loss_with_the_aux_term(tmp_path):
    import transformers as tf

    from preftune.trainer import PreferenceTrainer

    config = tf.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                              router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(config)
    pairs = random_pairs(6)
    # fp32: the expected loss below is a plain fp32 forward
    args = PreftuneConfig(output_dir=str(tmp_path), per_device_eval_batch_size=6, report_to="none", use_cpu=True, disable_tqdm=True, **FP32)
    trainer = PreferenceTrainer(model=model, args=args, train_pairs=pairs, eval_pairs=pairs, pad_token_id=0)
    got = trainer.evaluate()["eval_loss"]
    batch = collate_pairs(pairs, 0)
    model.eval()
    with torch.no_grad():
        seq = sequence_logps(model, batch)
    window = Window(pairs=6, nll_tokens=float(batch["num_nll_tokens"]))
    with_aux = compute_objective(get_method("orpo"), Hyperparameters.from_config(args), seq, window, aux_coef=0.5).loss.item()
    without = compute_objective(get_method("orpo"), Hyperparameters.from_config(args), seq, window).loss.item()
    assert got == pytest.approx(with_aux, rel=1e-5) and abs(with_aux - without) > 1e-3


# --------------------------------------------------------------------------------------------
# gradient accumulation and processes


def random_pairs(n, seed=0, vocab=97, labelled=False):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [PairTokens([1] + tok(rng.randint(1, 9)), tok(rng.randint(1, 7)), tok(rng.randint(1, 7)), i, label=(i % 3 != 1) if labelled else None)
            for i in range(n)]


# every method and every DPO loss type; options; the settings whose loss needs window-wide values
# every method without loss types, so a new method is covered without editing this list
EQUIVALENCE_CASES = [dict(method=name) for name, spec in METHODS.items() if not spec.loss_types] + [
    dict(method="dpo", loss_type=t, label_smoothing=0.1 if t in ("exo_pair", "robust", "aot") else 0.0)
    for t in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm", "sft")
] + [
    dict(method="dpo", loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(method="dpo", loss_type=["sigmoid", "sft"], use_weighting=True),
    dict(method="dpo", loss_type="bco_pair", bco_running_mean=True),
    dict(method="dpo", loss_type="ipo", ld_alpha=0.5, f_divergence_type="alpha_divergence"),
    dict(method="kto"),
    dict(method="kto", loss_type="apo_zero_unpaired", undesirable_weight=1.5),
]


# 2 processes: every method, and every setting whose loss gathers window-wide values across processes
# (aot ranks, WPO's mean weight on an sft term, BCO's reward mean, KTO's KL); the other loss types
# reduce per pair exactly like dpo sigmoid, which gradient accumulation checks for each of them
DDP_CASES = [c for c in EQUIVALENCE_CASES if c.get("loss_type") in (None, "sigmoid", "aot", "aot_unpaired") or c.get("use_weighting")
             or c.get("bco_running_mean")]


def steps_for(case) -> int:
    """Two optimizer steps where state carries over from step to step (running mean, KL estimate), else one."""
    return 2 if case.get("bco_running_mean") or case["method"] == "kto" else 1


def case_id(case):
    return "-".join(str(v if not isinstance(v, list) else "+".join(map(str, v))) for v in case.values())


def train_case(out_dir, case, batch_size, accumulation, steps=1, pairs=None):
    """Train tiny_llama(seed=3) with SGD on 16 pairs (labelled for KTO); return the weights. In fp32:
    the callers compare batchings (accumulation, processes) that bf16 would round differently."""
    from preftune.training_model import choose_device
    from preftune.reference import build_reference
    from preftune.trainer import PreferenceTrainer

    args = PreftuneConfig(output_dir=str(out_dir), max_steps=steps, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                          report_to="none", save_strategy="no", logging_steps=1, seed=7, disable_tqdm=True, max_grad_norm=0.0, use_cpu=True,
                          per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, memory_preflight=False,
                          **FP32, **case)
    pairs = pairs or random_pairs(16, labelled=get_method(args.method).unpaired)
    model = tiny_llama(seed=3)
    reference = build_reference(model, ModelArguments(), args, choose_device("float32", "sdpa"), pairs, [], SimpleNamespace(pad_token_id=0))
    PreferenceTrainer(model=model, args=args, train_pairs=pairs, reference=reference, pad_token_id=0).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b, start, what):
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4, what  # the runs trained, so equal weights mean equal updates
    for k in a:
        scale = max(a[k].abs().max().item(), 1.0)
        assert (a[k] - b[k]).abs().max().item() <= 2e-5 * scale, (what, k, (a[k] - b[k]).abs().max().item())


def test_gradient_accumulation_equals_one_large_batch_for_every_method_and_loss_type(tmp_path):
    """8 pairs x 1 micro-batch == 2 pairs x 4 micro-batches, for every case."""
    start = dict(tiny_llama(seed=3).named_parameters())
    for case in EQUIVALENCE_CASES:
        big = train_case(tmp_path / "big", case, 8, 1, steps_for(case))
        small = train_case(tmp_path / "small", case, 2, 4, steps_for(case))
        assert_same_weights(big, small, start, case_id(case))


def test_kto_kl_term_depends_on_the_window():
    """Guard for the test above: KTO's KL estimate over each micro-batch (TRL under gradient
    accumulation) gives another loss than over the whole step, so the equality is not vacuous."""
    seq, _ = fake_seq(n=8, seed=2)
    # KL log-ratios +3 in the first micro-batch, -3 in the second: z = 3 and 0 apart, 0 over the window
    kl_logratio = torch.tensor([3.0] * 4 + [-3.0] * 4, dtype=f64)
    ref = (seq.chosen_sum + 0.5, seq.rejected_sum - kl_logratio)
    desirable = torch.tensor([True, True, True, False] * 2)
    kto, hp = get_method("kto"), Hyperparameters(beta=0.5, loss_type=("kto",))
    whole = compute_objective(kto, hp, seq, Window(8, 1.0), ref=ref, desirable=desirable).loss
    halves = [SequenceLogps(*(t[s] for t in dataclasses.astuple(seq)[:6])) for s in (slice(0, 4), slice(4, 8))]
    per_micro = sum(compute_objective(kto, hp, h, Window(8, 1.0), ref=(ref[0][s], ref[1][s]), desirable=desirable[s]).loss
                    for h, s in zip(halves, (slice(0, 4), slice(4, 8))))
    assert abs(whole.item() - per_micro.item()) > 1e-4


DDP_SCRIPT = '''
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_methods as t
torch.set_num_threads(1)
import torch.distributed as dist
for i, case in enumerate(t.DDP_CASES):
    w = t.train_case({out!r} + f"/ddp{{i}}", case, 4, 1, t.steps_for(case))
    if int(__import__("os").environ["RANK"]) == 0:
        torch.save(w, {out!r} + f"/ddp{{i}}.pt")
# without this, gloo's threads can abort the interpreter's exit ("terminate called without an active
# exception", exit -6 on rank 0): 3 of 12 bare gloo launches did on this machine, 0 of 12 with it
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_equal_one_for_every_method_and_window_loss(tmp_path):
    """2 processes x 4 pairs (gloo DDP, one torchrun launch looping over the cases) == 1 process x 8 pairs."""
    import os

    script = tmp_path / "ddp_cases.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    start = dict(tiny_llama(seed=3).named_parameters())
    for i, case in enumerate(DDP_CASES):
        single = train_case(tmp_path / "single", case, 8, 1, steps_for(case))
        assert_same_weights(single, torch.load(tmp_path / f"ddp{i}.pt"), start, case_id(case))


# --------------------------------------------------------------------------------------------
# resume


def test_resume_restores_bco_running_mean_and_tr_dpo_reference(tmp_path):
    """A run resumed from step 2 ends where the uninterrupted run ends: the BCO reward shift and the
    TR-DPO reference (synced at step 2) come back from the checkpoint."""
    from preftune.training_model import choose_device
    from preftune.reference import build_reference
    from preftune.rundir import SYNCED_REF_MODEL_FILE as REF_MODEL_FILE
    from preftune.trainer import PreferenceTrainer

    pairs = random_pairs(16)
    case = dict(method="dpo", loss_type="bco_pair", bco_running_mean=True, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)

    def trainer_for(out, steps):
        args = PreftuneConfig(output_dir=str(out), max_steps=steps, learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="constant",
                              report_to="none", save_strategy="steps", save_steps=2, logging_steps=1, seed=7, disable_tqdm=True, use_cpu=True,
                              per_device_train_batch_size=4, memory_preflight=False, **case)
        model = tiny_llama(seed=3)
        reference = build_reference(model, ModelArguments(), args, choose_device("float32", "sdpa"), pairs, [], SimpleNamespace(pad_token_id=0))
        return PreferenceTrainer(model=model, args=args, train_pairs=pairs, reference=reference, pad_token_id=0), reference

    full, full_ref = trainer_for(tmp_path / "full", 4)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["MethodStateCallback"]["attributes"]["values"]
    assert saved["bco_steps"] == 2 and saved["bco_reward_shift"] != 0.0
    initial = dict(tiny_llama(seed=3).named_parameters())
    synced = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(ckpt / REF_MODEL_FILE)).items()}
    assert max((synced[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # the reference really moved

    resumed, resumed_ref = trainer_for(tmp_path / "full", 4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    for a, b in zip(full_ref.model.parameters(), resumed_ref.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # a checkpoint without the synced reference cannot be resumed exactly: refused, not silently wrong
    (ckpt / REF_MODEL_FILE).unlink()
    again, _ = trainer_for(tmp_path / "full", 4)
    with pytest.raises(PreftuneError, match="TR-DPO reference it trained against is lost"):
        again.train(resume_from_checkpoint=str(ckpt))


def test_tr_dpo_mixes_the_policy_into_the_reference():
    from preftune.ref_sync import mix_into

    ref, policy = tiny_llama(seed=1), tiny_llama(seed=2)
    before = [p.detach().clone() for p in ref.parameters()]
    mix_into(ref, policy, 0.6)
    for r, b, p in zip(ref.parameters(), before, policy.parameters()):
        torch.testing.assert_close(r, 0.6 * p + 0.4 * b)
    with pytest.raises(PreftuneError, match="same parameters and shapes"):
        mix_into(ref, tiny_llama(seed=2, hidden_size=48), 0.5)


def test_precomputed_reference_for_kto_and_ld_dpo_equals_on_the_fly(tmp_path):
    """The precomputed table holds what the on-the-fly reference returns: KTO's completion and KL
    completion log-probs, LD-DPO's weighted sums (its alpha is part of the cache fingerprint)."""
    from preftune.training_model import choose_device
    from preftune.reference import build_reference

    model = tiny_llama(seed=5)
    for case, pairs in ((dict(method="kto"), random_pairs(10, labelled=True)), (dict(method="dpo", ld_alpha=0.3), random_pairs(10))):
        def reference(precompute):
            # fp32: the on-the-fly reference is called below outside the trainer's autocast
            args = PreftuneConfig(output_dir=str(tmp_path / case["method"]), use_cpu=True, precompute_ref_log_probs=precompute, **FP32, **case)
            return build_reference(model, ModelArguments(), args, choose_device("float32", "sdpa"), pairs, [], SimpleNamespace(pad_token_id=0))

        batch = collate_pairs(pairs, 0, tail_weight=case.get("ld_alpha"))
        on_the_fly, table = reference(False)(model, batch), reference(True)(model, batch)
        for a, b in zip(on_the_fly, table):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    unweighted = build_reference(model, ModelArguments(), PreftuneConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, method="dpo",
                                 precompute_ref_log_probs=True, **FP32), choose_device("float32", "sdpa"), pairs, [], SimpleNamespace(pad_token_id=0))
    assert unweighted.fingerprint != reference(True).fingerprint


def test_tr_dpo_is_refused_without_a_separate_reference(tmp_path):
    """With PEFT the reference is the policy's own base weights (adapters off): nothing to sync."""
    from preftune.reference.models import ModelReference
    from preftune.trainer import PreferenceTrainer

    model = tiny_llama(seed=1)
    args = PreftuneConfig(output_dir=str(tmp_path), use_cpu=True, method="dpo", sync_ref_model=True, report_to="none")
    adapters_off = ModelReference(model, 64, "the base model with adapters disabled", adapters_off=True)
    with pytest.raises(PreftuneError, match="--sync_ref_model needs a separate reference model"):
        PreferenceTrainer(model=model, args=args, train_pairs=random_pairs(4), reference=adapters_off, pad_token_id=0)
