"""``--eval_generate N``: a demo run writes greedy answers to the same held-out prompts at step 0,
at each evaluation and at the end; the last ones equal plain ``generate`` on the saved model, and
``preftune report`` shows each prompt's answers step by step."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from unittest import mock

import pytest
import torch

from preftune.cli import main

pytestmark = pytest.mark.slow

STEPS, EVERY, N = 40, 20, 4


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    # the demo's before/after table greedily decodes 64 prompts twice; this test never reads it
    skip_table = mock.patch("preftune.demo.evaluate_demo", return_value={"preference_accuracy": 0.0, "generation_accuracy": 0.0})
    with skip_table:
        assert main(["train", "--output_dir", str(out), "--max_steps", str(STEPS), "--eval_strategy", "steps", "--eval_steps", str(EVERY),
                     "--eval_generate", str(N), "--eval_generate_max_new_tokens", "8", "--disable_tqdm", "true"]) == 0
    return out


def test_samples_are_the_same_prompts_at_each_evaluation_and_the_last_equal_plain_generate(sampled_run, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.data.tokenize import TokenizeSettings, tokenize_examples
    from preftune.demo import demo_examples

    lines = [json.loads(line) for line in (sampled_run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in lines] == [0, EVERY, STEPS]  # before training, each evaluation, the end (once)
    prompts = [[s["prompt"] for s in r["samples"]] for r in lines]
    assert len(prompts[0]) == N and all(p == prompts[0] for p in prompts)
    assert prompts[0][0].startswith("Q: add one to ") and prompts[0][1].startswith("Q: copy ")  # the demo's held-out prompts
    first, last = [s["answer"] for s in lines[0]["samples"]], [s["answer"] for s in lines[-1]["samples"]]
    assert first != last  # training moved the answers

    # the last answers are what the saved model generates greedily from the same prompt tokens
    model = AutoModelForCausalLM.from_pretrained(str(sampled_run)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(sampled_run))
    _, evals, _ = demo_examples()
    pairs, _ = tokenize_examples(tokenizer, evals[:N], TokenizeSettings(max_length=32, max_prompt_length=16))
    for pair, sample in zip(pairs, lines[-1]["samples"]):
        assert sample["example_id"] == pair.example_id
        ids = torch.tensor([pair.prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == sample["answer"]


class SampleRows(HTMLParser):
    """(prompt text, [(step, answer, class)]) per prompt of the report's samples section."""

    def __init__(self):
        super().__init__()
        self.prompts: list[tuple[str, list]] = []
        self.inside = self.in_pre = False
        self.row = None
        self.text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") == "samples":
            self.inside = True
        if not self.inside:
            return
        if tag == "tr" and "data-step" in a:
            self.row = [int(a["data-step"]), "", a.get("class")]
        if tag == "pre":
            self.in_pre, self.text = True, ""

    def handle_endtag(self, tag):
        if tag == "section":
            self.inside = False
        if self.inside and tag == "pre":
            self.in_pre = False
            if self.row is None:
                self.prompts.append((self.text, []))
            else:
                self.row[1] = self.text
                self.prompts[-1][1].append(tuple(self.row))
                self.row = None

    def handle_data(self, data):
        if self.in_pre:
            self.text += data


def test_report_shows_each_prompt_answers_step_by_step(sampled_run, tmp_path):
    from preftune.samples import read_samples

    page = tmp_path / "report.html"
    assert main(["report", str(sampled_run), "--output", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert html.index('id="curves"') < html.index('id="samples"') < html.index('id="config"')  # next to the curves
    parsed = SampleRows()
    parsed.feed(html)
    records = read_samples(sampled_run)
    assert [p for p, _ in parsed.prompts] == [s["prompt"] for s in records[0]["samples"]]
    for i, (_, rows) in enumerate(parsed.prompts):
        answers = [r["samples"][i]["answer"] for r in records]
        assert [(step, answer) for step, answer, _ in rows] == list(zip([0, EVERY, STEPS], answers))
        assert [kind for _, _, kind in rows] == ["changed"] + ["same" if a == b else "changed" for a, b in zip(answers, answers[1:])]


def test_samples_file_edge_cases_and_flag_validation(tmp_path, capsys):
    from preftune.samples import read_samples

    (tmp_path / "samples.jsonl").write_text(
        '{"step": 5, "samples": [{"prompt": "p", "answer": "old"}]}\n{"step": 0, "samples": []}\n'
        '{"step": 5, "samples": [{"prompt": "p", "answer": "new"}]}\n{"step": 9, "sampl', encoding="utf-8")
    assert [(r["step"], r["samples"][:1]) for r in read_samples(tmp_path)] == [(0, []), (5, [{"prompt": "p", "answer": "new"}])]

    capsys.readouterr()
    assert main(["train", "--eval_generate", "-1"]) == 2
    assert "--eval_generate must be >= 0" in capsys.readouterr().err

    from preftune.demo import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(str(tmp_path / "tok"))  # the check comes before any model is loaded
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q: copy 1 A:", "chosen": " 1", "rejected": " 2"}) + "\n", encoding="utf-8")
    assert main(["train", "--model_name_or_path", str(tmp_path / "tok"), "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
                 "--eval_generate", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: --eval_generate") and "--eval_fraction" in err and "\n" not in err
