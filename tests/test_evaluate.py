"""``preftune eval`` end to end on a 60-step demo run, checked against a plain Hugging Face forward.

The reference below scores each pair the textbook way, independent of preftune's engine: one
ordinary forward over ``prompt + completion + EOS``, log-softmax in float64, and the ORPO
definitions written out::

    lc, lr  = mean log P(completion token | everything before it), chosen / rejected
    reward  = beta * l,   accuracy = mean[lc > lr]
    log odds ratio = (lc - lr) - (log(1 - e^lc) - log(1 - e^lr))
    nll_loss = -(sum of chosen token log-probs) / (number of chosen tokens)
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from _trained_runs import demo_eval_rows, demo_initial_model, demo_run, mark_finished
from preftune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return demo_run(tmp_path_factory)


def reference_metrics(model, tokenizer, rows, beta):
    """ORPO-style preference metrics from one plain, right-padded forward, float64 (module docstring)."""
    model.eval()
    seqs, starts = [], []
    for key in ("chosen", "rejected"):
        for r in rows:
            prompt = tokenizer(r["prompt"]).input_ids  # the demo tokenizer adds BOS
            full = tokenizer(r["prompt"] + r[key]).input_ids + [tokenizer.eos_token_id]
            assert full[: len(prompt)] == prompt
            seqs.append(full)
            starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)  # (2N, T, V)
    token_logps = [[logp[i, p - 1 + j, t].item() for j, t in enumerate(s[p:])] for i, (s, p) in enumerate(zip(seqs, starts))]
    n = len(rows)
    lcs = [sum(t) / len(t) for t in token_logps[:n]]
    lrs = [sum(t) / len(t) for t in token_logps[n:]]
    nll_sum = -sum(sum(t) for t in token_logps[:n])
    nll_n = sum(len(t) for t in token_logps[:n])
    log1mexp = lambda x: math.log(-math.expm1(x))  # noqa: E731
    odds = [(c - r) - (log1mexp(c) - log1mexp(r)) for c, r in zip(lcs, lrs)]
    return {
        "logps/chosen": sum(lcs) / n,
        "logps/rejected": sum(lrs) / n,
        "rewards/chosen": beta * sum(lcs) / n,
        "rewards/margins": beta * sum(c - r for c, r in zip(lcs, lrs)) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(lcs, lrs)) / n,
        "log_odds_chosen": sum(odds) / n,
        "log_odds_ratio": sum(-math.log1p(math.exp(-o)) for o in odds) / n,
        "nll_loss": nll_sum / nll_n,
    }


def assert_close(got: dict, want: dict, tol=2e-4):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=tol, rel=tol), k


def _model_and_tokenizer(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def _demo_init(run):
    """The weights the run started from (recorded during training) and the run's tokenizer."""
    from transformers import AutoTokenizer

    return demo_initial_model(run), AutoTokenizer.from_pretrained(str(run))


def test_eval_of_a_run_matches_plain_forward_and_the_trainers_eval(run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(run), "--output_dir", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    (only,) = record["models"]
    metrics = only["metrics"]
    assert only["pairs"] == record["examples"] == 64  # defaulted to the demo's held-out pairs
    assert record["settings"]["beta"] == 0.2 and record["settings"]["max_length"] == 32  # the run's settings, not the defaults
    model, tok = _model_and_tokenizer(run)
    assert_close(metrics, reference_metrics(model, tok, demo_eval_rows(), beta=0.2))
    # the trainer logged the same quantities on the same pairs at the end of training
    final = json.loads((run / "run_complete.json").read_text())["final_metrics"]
    for k in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "log_odds_chosen", "nll_loss"):
        assert metrics[k] == pytest.approx(final[f"eval_{k}"], abs=1e-4), k
    table = capsys.readouterr().out
    assert "rewards/accuracies" in table and f"{metrics['nll_loss']:.4f}" in table
    assert not (run / "eval.json").exists()  # --output_dir respected


def test_compare_base_and_generate(run, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", str(run), "--compare", "base", "--generate", "3", "--max_new_tokens", "6", "--max_samples", "16", "--output_dir", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "eval.json").read_text())
    tuned, base = record["models"]
    assert base["name"] == "base (demo init)"
    # `base` of a demo run is the random init training started from: eval rebuilds it from the
    # run's seed; the reference is the weights recorded when that training began
    init_model, tok = _demo_init(run)
    assert_close(base["metrics"], reference_metrics(init_model, tok, demo_eval_rows()[:16], beta=0.2))
    from preftune.inference_model import load_base

    rebuilt = load_base(str(run)).model.state_dict()  # what `--compare base` evaluates: bit for bit the start
    assert all(torch.equal(rebuilt[k], v) for k, v in init_model.state_dict().items())
    # something real moved during the 60 steps
    assert tuned["metrics"]["nll_loss"] < base["metrics"]["nll_loss"] - 0.5
    assert tuned["metrics"]["logps/chosen"] > base["metrics"]["logps/chosen"]
    assert "difference" in capsys.readouterr().out

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and record["generations"]["count"] == 3
    model, _ = _model_and_tokenizer(run)
    md = (out / "generations.md").read_text()
    for row, ref in zip(rows, demo_eval_rows()):
        assert row["prompt"] == ref["prompt"] and row["chosen"] == ref["chosen"]
        assert [a["model"] for a in row["answers"]] == [str(run), "base (demo init)"]
        ids = tok(ref["prompt"], return_tensors="pt").input_ids
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row["answers"][0]["answer"] == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert ref["prompt"] in md and row["answers"][1]["answer"] in md


def test_lora_adapter_folder_with_a_data_file_and_column_mapping(run, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    base, tok = _demo_init(run)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    lora.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    (adapter / "run_config.json").write_text((run / "run_config.json").read_text())  # a demo run: base = demo init
    mark_finished(adapter)
    rows = demo_eval_rows()[:12]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n" for r in rows))

    argv = ["eval", str(adapter), "--dataset_name", str(data), "--prompt_column", "question", "--chosen_column", "good",
            "--rejected_column", "bad", "--beta", "0.5", "--batch_size", "5"]
    assert main(argv) == 0
    record = json.loads((adapter / "eval.json").read_text())  # default: the model's folder
    metrics = record["models"][0]["metrics"]
    assert record["models"][0]["kind"] == "LoRA adapter" and record["examples"] == 12
    want = reference_metrics(lora, tok, rows, beta=0.5)
    assert_close(metrics, want)
    with lora.disable_adapter():
        without = reference_metrics(lora, tok, rows, beta=0.5)
    assert abs(without["logps/chosen"] - want["logps/chosen"]) > 1e-3  # the adapter really was applied


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "kernels-community" not in line]  # bitsandbytes' import-time notice, if installed
    assert len(err) == 1, err
    assert err[0].startswith("preftune: error: ")
    return err[0]


def test_eval_errors_are_one_line(run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "not found" in _one_line_error(capsys)

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-5").mkdir(parents=True)
    assert main(["eval", str(unfinished)]) == 2
    assert "checkpoint-5" in _one_line_error(capsys)

    assert main(["eval", str(run), "--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)]) == 2
    assert "missing.jsonl" in _one_line_error(capsys)

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: copy 1 A:", "good": " 1", "rejected": " 2"}) + "\n")
    assert main(["eval", str(run), "--dataset_name", str(data), "--output_dir", str(tmp_path)]) == 2
    assert "chosen" in _one_line_error(capsys)
