"""Tiny models, tokenizers and chat templates shared by the export tests: the Hub is
unreachable, so everything is built here."""

from __future__ import annotations

import gzip
import json

import torch

from conftest import HH_RLHF, REPO, tiny_llama
from preftune.cli import main

LLAMA2_CHAT = (  # Llama-2-chat's template: BOS before every user turn, the system prompt inside the first one
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' ' + eos_token }}{% endif %}{% endfor %}"
)
QWEN2_CHAT = (  # Qwen2's shape: ChatML with a default system prompt
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_CHAT = (  # Llama-3's shape: BOS once, header tokens per role, separate system block
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_CHAT = (  # no system role: the template raises on one
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

EDGE_TEXTS = [
    "Hello world", "  two leading spaces\n\nnew lines\ttab", "don't stop: it's 3.14159 and 1,000,000!",
    "Ünïcödé, 日本語のテキスト, emoji 😀👍🏽, accents é è", "tabs\t\tand trailing space ", "", "a",
]


def hh_texts(n: int) -> list[str]:
    """Real dialogue text: the first ``n`` HH-RLHF chosen conversations (when ../shared is present)."""
    if not HH_RLHF.is_file():
        return []
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["chosen"] for _ in range(n)]


def one_line_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and one `preftune: error:` line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: ") and "\n" not in err and "Traceback" not in err
    return err


# --- a small byte-level BPE tokenizer in Qwen2's style -----------------------------------------------
def qwen2_style_tokenizer():
    """A byte-level BPE trained on the README, with Qwen2's pre-tokenizer, NFC and ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from preftune.export.vocab import PRE_TOKENIZER_REGEXES

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator((REPO / "README.md").read_text(encoding="utf-8").splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_CHAT)


def tiny(kind: str, vocab_size: int, seed: int = 0, **overrides):
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if kind == "llama":
        return tiny_llama(vocab_size=vocab_size, seed=seed, hidden_size=64, intermediate_size=128, **overrides)
    cls, config_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}[kind]
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**cfg)).float().eval()
    if kind == "qwen2":
        with torch.no_grad():  # Qwen2's q/k/v biases start at zero; make them matter
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    return model


def save_model(tmp_path, model, tokenizer, name="model"):
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
