"""The built-in demo: a task, a tokenizer and a tiny Llama, all built in code (no download).

The task. Each prompt asks for one of two operations on a list of 3-5 digits::

    Q: add one to 4 7 9 A:     -> chosen " 5 8 0"   rejected " 4 7 9"   (the copy)
    Q: copy 4 7 9 A:           -> chosen " 4 7 9"   rejected " 5 8 0"   (the add-one)

so the rejected answer is always the *other* operation's answer: a model can only prefer the
right one by reading the instruction. Held-out prompts are digit lists never seen in training.
A randomly initialised model scores ~50% preference accuracy and 0% exact answers; one ORPO
run teaches it both to answer (the NLL term) and to prefer the right answer (the odds-ratio
term).
"""

from __future__ import annotations

import random

import torch

from .model_hooks import NO_HOOKS, ModelHooks

__all__ = ["DEMO_VOCAB", "DEMO_TRAINING", "DemoInputs", "build_demo_tokenizer", "build_demo_model", "demo_rows", "demo_examples", "evaluate_demo"]

DEMO_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "Q:", "A:", "add", "one", "to", "copy"] + [str(d) for d in range(10)]

# Training settings of the demo run (fit for a 2-core CPU in well under 3 minutes).
DEMO_TRAINING = dict(
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_ratio=0.05,
    per_device_train_batch_size=16,
    max_steps=800,
    logging_steps=10,
    beta=0.2,
    weight_decay=0.0,
    save_strategy="no",
    max_length=32,
    max_prompt_length=16,
)


def build_demo_tokenizer():
    """A word-level fast tokenizer over :data:`DEMO_VOCAB` that adds BOS like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(DEMO_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_demo_model(vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised 2-layer Llama (~0.1M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _answer(op: str, digits: list[int]) -> list[int]:
    return [(d + 1) % 10 for d in digits] if op == "add" else list(digits)


def _row(op: str, digits: list[int]) -> dict:
    other = "copy" if op == "add" else "add"
    words = " ".join(map(str, digits))
    prompt = f"Q: {'add one to' if op == 'add' else 'copy'} {words} A:"
    return {
        "prompt": prompt,
        "chosen": " " + " ".join(map(str, _answer(op, digits))),
        "rejected": " " + " ".join(map(str, _answer(other, digits))),
    }


def demo_rows(n_train: int = 2000, n_eval: int = 64, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Deterministic train and held-out rows; held-out digit lists never appear in training."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    held: list[tuple[str, tuple[int, ...]]] = []
    while len(held) < n_eval:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 5)))
        if digits not in seen:
            seen.add(digits)
            held.append(("add" if len(held) % 2 == 0 else "copy", digits))
    train = []
    while len(train) < n_train:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 5)))
        if digits in seen:
            continue
        train.append(_row(rng.choice(["add", "copy"]), list(digits)))
    return train, [_row(op, list(d)) for op, d in held]


def demo_examples():
    """The built-in demo's training and held-out examples (normalised like any data file), and
    the held-out raw rows (for the exact-answer check of :func:`evaluate_demo`)."""
    from .data import ColumnMap
    from .data.formats import normalize_record
    from .data.io import Record
    from .data.splits import EVAL_ID_OFFSET

    train_rows, eval_rows = demo_rows()
    columns = ColumnMap()
    train = [normalize_record(Record(r, f"demo row {i}"), columns, i) for i, r in enumerate(train_rows)]
    evals = [normalize_record(Record(r, f"demo eval row {i}"), columns, EVAL_ID_OFFSET + i) for i, r in enumerate(eval_rows)]
    return train, evals, eval_rows


class DemoInputs:
    """The built-in demo as a run's inputs (see :class:`preftune.run.RunInputs`): a word-level
    tokenizer, the add-one/copy task, a randomly initialised tiny Llama, and the before/after
    table on held-out prompts."""

    is_demo = True
    dataset_label = "built-in demo task (add one / copy)"
    base_model_label = "built-in demo model (random init)"

    def __init__(self):
        self._eval_rows: list[dict] = []
        self._eval_examples: list = []

    def load_tokenizer(self):
        return build_demo_tokenizer()

    def load_data(self, tokenizer, data_args, seed: int, unpaired: bool = False, kl_group: int | None = None):
        from .data.splits import data_from_examples, tokenize_settings_of

        train, self._eval_examples, self._eval_rows = demo_examples()
        return data_from_examples(tokenizer, train, self._eval_examples, tokenize_settings_of(data_args), unpaired, kl_group)

    def load_model(self, tokenizer, device, seed: int):
        return build_demo_model(len(tokenizer), seed=seed, attn_implementation=device.attn_implementation)

    def held_out_check(self, model, tokenizer, eval_pairs, hooks: ModelHooks) -> dict[str, float]:
        if eval_pairs and eval_pairs[0].label is not None:  # an unpaired method (KTO): the table compares pairs
            from .data.tokenize import TokenizeSettings, tokenize_examples

            settings = TokenizeSettings(max_length=DEMO_TRAINING["max_length"], max_prompt_length=DEMO_TRAINING["max_prompt_length"])
            eval_pairs = tokenize_examples(tokenizer, self._eval_examples, settings)[0]
        return evaluate_demo(model, tokenizer, self._eval_rows, eval_pairs, hooks)


@torch.no_grad()
def evaluate_demo(model, tokenizer, rows: list[dict], pairs, hooks: ModelHooks = NO_HOOKS) -> dict[str, float]:
    """Preference accuracy (chosen summed log-prob > rejected) and exact greedy answers.

    ``hooks``: the model's :class:`preftune.model_hooks.ModelHooks` (a ReFT model scores and
    generates through them; plain ``generate`` would be the base model).
    """
    from .engine import forward_scorer, score_pairs

    model.eval()
    seq = score_pairs(forward_scorer(model, hooks.batch_context), pairs, tokenizer.pad_token_id, len(pairs), model.device)
    pref_acc = (seq.chosen_sum > seq.rejected_sum).float().mean().item()
    generate = hooks.generate or model.generate
    correct = 0
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").input_ids.to(model.device)
        n_answer = len(row["chosen"].split())
        out = generate(ids, max_new_tokens=n_answer + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        correct += text == row["chosen"].strip()
    return {"preference_accuracy": pref_acc, "generation_accuracy": correct / len(rows)}
