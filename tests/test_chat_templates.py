"""Chat-template families: the prompt/completion boundary is exact for single- and multi-turn
data with a system message, tools reach the template, and a completion that cannot be
located is refused with the reason.

Each template below is written here, behaving like the family's published template in the
respect that matters for the boundary (turn markup, BOS/EOS, default system prompt, system
folding, reasoning blocks, generation prompt). The expected prompt and completion texts are
written out by hand per family (plain f-strings, not Jinja), and the test checks that the
tokens preftune trains on decode to exactly them and tokenize as the whole conversation does.
The tokenizer is a byte-level BPE trained in the test on a few sentences, with the family's
special tokens, so nothing is downloaded.
"""

from __future__ import annotations

import functools

import pytest

from preftune.data.formats import PreferenceExample
from preftune.data.tokenize import TokenizeSettings, tokenize_examples

CORPUS = [
    "Be brief. What is the capital of France? Paris is the capital. And of Italy? Good answer. Bad answer.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. Tools: get_weather city Paris sunny 21 degrees",
    "system user assistant model tool think step reasoning the weather is nice today",
] * 20

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = (
    "{%- set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '" + QWEN25_DEFAULT_SYSTEM + "' -%}"
    "<|im_start|>system\n{{ sys }}"
    # transformers renders with trim_blocks: a newline right after a block tag is dropped, so
    # newlines that follow one are written as expressions
    "{% if tools %}{{ '\\n\\n# Tools\\n\\n<tools>' }}{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}{{ '\\n</tools>' }}{% endif %}<|im_end|>\n"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'assistant' and m.tool_calls %}<|im_start|>assistant{% if m['content'] %}\n{{ m['content'] }}{% endif %}"
    "{% for tc in m.tool_calls %}{{ '\\n' }}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3: reasoning ("<think>...</think>" in the content) is kept only for assistant turns after
# the last user turn; the final turn always gets a think block, empty if it had none.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_user %}<|im_start|>assistant\n<think>\n{{ reasoning }}\n</think>\n\n{{ content }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ content }}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# DeepSeek-R1: the generation prompt opens a think block that the rendered answer does not have
# (and reasoning is stripped from every rendered assistant turn).
DEEPSEEK_R1 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<\uff5cUser\uff5c>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<\uff5cAssistant\uff5c>{{ content }}<\uff5cend\u2581of\u2581sentence\uff5c>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<\uff5cAssistant\uff5c><think>\n{% endif %}"
)
# Mistral (v0.1 style): no system role; the system text goes into the first [INST].
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}[INST] {% if loop.first and system is defined %}{{ system }}\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

R1_USER, R1_ASSISTANT, R1_EOS, R1_BOS = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5cbegin\u2581of\u2581sentence\uff5c>"

# family -> (template, bos, eos, other special tokens)
FAMILIES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2.5": (QWEN25, None, "<|im_end|>", ["<|im_start|>"]),
    "qwen3": (QWEN3, None, "<|im_end|>", ["<|im_start|>"]),
    "deepseek-r1": (DEEPSEEK_R1, R1_BOS, R1_EOS, [R1_USER, R1_ASSISTANT]),
    "mistral": (MISTRAL, "<s>", "</s>", []),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}


@functools.lru_cache(maxsize=None)
def _trained_bpe(specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    return core.to_str()


def family_tokenizer(family: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, others = FAMILIES[family]
    specials = tuple(t for t in (bos, eos, *others) if t)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_bpe(specials)), bos_token=bos, eos_token=eos)
    tok.chat_template = template
    return tok


def ex(prompt, chosen="Good answer.", rejected="Bad answer.", tools=None):
    return PreferenceExample(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
                             None, "t.jsonl line 1", 0, tools, "conversational")


SYSTEM = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
U2 = {"role": "user", "content": "And of Italy?"}
SINGLE = [SYSTEM, U1]
MULTI = [SYSTEM, U1, A1, U2]

S, Q1, R1, Q2 = "Be brief.", "What is the capital of France?", "Paris.", "And of Italy?"
# family -> turns -> (prompt text, chosen completion text), written out by hand
EXPECTED = {
    "llama3": {
        "single": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                   f"{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "Good answer.<|eot_id|>"),
        "multi": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                  f"{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{R1}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                  f"{Q2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "Good answer.<|eot_id|>"),
    },
    "qwen2.5": {
        "single": (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", "Good answer.<|im_end|>"),
        "multi": (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{R1}<|im_end|>\n"
                  f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", "Good answer.<|im_end|>"),
    },
    "qwen3": {
        "single": (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                   "<think>\n\n</think>\n\nGood answer.<|im_end|>"),
        "multi": (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{R1}<|im_end|>\n"
                  f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\nGood answer.<|im_end|>"),
    },
    "deepseek-r1": {  # the prompt ends where the generation prompt ("...<think>\n") and the conversation part
        "single": (f"{R1_BOS}{S}{R1_USER}{Q1}{R1_ASSISTANT}", f"Good answer.{R1_EOS}"),
        "multi": (f"{R1_BOS}{S}{R1_USER}{Q1}{R1_ASSISTANT}{R1}{R1_EOS}{R1_USER}{Q2}{R1_ASSISTANT}", f"Good answer.{R1_EOS}"),
    },
    "mistral": {
        "single": (f"<s>[INST] {S}\n\n{Q1} [/INST]", "Good answer.</s>"),
        "multi": (f"<s>[INST] {S}\n\n{Q1} [/INST]{R1}</s>[INST] {Q2} [/INST]", "Good answer.</s>"),
    },
    "gemma": {  # no system role: preftune folds the system text into the first user turn
        "single": (f"<bos><start_of_turn>user\n{S}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n", "Good answer.<end_of_turn>\n<eos>"),
        "multi": (f"<bos><start_of_turn>user\n{S}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n{R1}<end_of_turn>\n"
                  f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n", "Good answer.<end_of_turn>\n<eos>"),
    },
    "phi3": {  # the template emits no BOS: preftune adds the tokenizer's
        "single": (f"<s><|system|>\n{S}<|end|>\n<|user|>\n{Q1}<|end|>\n<|assistant|>\n", "Good answer.<|end|>\n<|endoftext|>"),
        "multi": (f"<s><|system|>\n{S}<|end|>\n<|user|>\n{Q1}<|end|>\n<|assistant|>\n{R1}<|end|>\n<|user|>\n{Q2}<|end|>\n<|assistant|>\n",
                  "Good answer.<|end|>\n<|endoftext|>"),
    },
}
NOTES = {"deepseek-r1": {"not_prefix": 1}, "gemma": {"system_folded": 1}}


def no_limits():
    return TokenizeSettings(max_length=None, max_prompt_length=None)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("turns", ["single", "multi"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_boundary_is_exact(family, turns):
    tok = family_tokenizer(family)
    prompt_text, chosen_text = EXPECTED[family][turns]
    rejected_text = chosen_text.replace("Good", "Bad")
    (pair,), report = tokenize_examples(tok, [ex(SINGLE if turns == "single" else MULTI)], no_limits())
    assert decode(tok, pair.prompt) == prompt_text
    assert decode(tok, pair.chosen) == chosen_text
    assert decode(tok, pair.rejected) == rejected_text
    # the ids are the tokenization of the whole conversation, not of two pieces glued together
    whole = tok(prompt_text + chosen_text, add_special_tokens=False)["input_ids"]
    if tok.bos_token and not prompt_text.startswith(tok.bos_token):
        whole = [tok.bos_token_id] + whole
    assert pair.prompt + pair.chosen == whole
    assert pair.chosen[-1] == tok.eos_token_id and pair.chosen.count(tok.eos_token_id) == 1
    assert {k: v for k, v in report.notes.items() if v} == {"templated": 1, **NOTES.get(family, {})}


def test_qwen25_default_system_prompt_is_prompt_not_completion():
    tok = family_tokenizer("qwen2.5")
    (pair,), _ = tokenize_examples(tok, [ex([U1])], no_limits())
    assert decode(tok, pair.prompt) == f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok, pair.chosen) == "Good answer.<|im_end|>"


def test_qwen3_reasoning_dropped_from_earlier_turns_kept_in_the_answer():
    tok = family_tokenizer("qwen3")
    earlier = {"role": "assistant", "content": "<think>\nrecall geography\n</think>\n\nParis."}
    e = ex([U1, earlier, U2], chosen="<think>\nstep\n</think>\n\nRome.", rejected="<think>\nguess\n</think>\n\nMilan.")
    (pair,), _ = tokenize_examples(tok, [e], no_limits())
    prompt = decode(tok, pair.prompt)
    assert "recall geography" not in prompt and f"<|im_start|>assistant\n{R1}<|im_end|>" in prompt
    assert decode(tok, pair.chosen) == "<think>\nstep\n</think>\n\nRome.<|im_end|>"
    assert decode(tok, pair.rejected) == "<think>\nguess\n</think>\n\nMilan.<|im_end|>"


def test_tools_column_and_tool_call_messages_reach_the_template():
    tok = family_tokenizer("qwen2.5")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    result = {"role": "tool", "content": "sunny, 21 degrees"}
    from preftune.data.formats import ColumnMap, normalize_record
    from preftune.data.io import Record

    user = {"role": "user", "content": "Weather in Paris?"}
    row = {"chosen": [user, call, result, {"role": "assistant", "content": "Sunny."}],
           "rejected": [user, call, result, {"role": "assistant", "content": "Rainy."}], "tools": tools}
    e = normalize_record(Record(row, "t.jsonl line 1"), ColumnMap(), 0)
    assert e.tools == tools and e.prompt[1]["tool_calls"] and e.prompt[1]["content"] == ""
    (pair,), _ = tokenize_examples(tok, [e], no_limits())
    prompt = decode(tok, pair.prompt)
    assert prompt == (
        f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}\n\n# Tools\n\n<tools>\n" + '{"type": "function", "function": {"name": "get_weather", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}' + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny, 21 degrees\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert decode(tok, pair.chosen) == "Sunny.<|im_end|>" and decode(tok, pair.rejected) == "Rainy.<|im_end|>"


def test_tools_column_as_json_string_and_bad_tools_is_a_bad_row():
    from preftune.data.formats import BadRow, ColumnMap, normalize_record
    from preftune.data.io import Record

    base = {"prompt": "q", "chosen": "a", "rejected": "b"}
    ok = normalize_record(Record({**base, "tools": '[{"type": "function", "function": {"name": "f"}}]'}, "r"), ColumnMap(), 0)
    assert ok.tools == [{"type": "function", "function": {"name": "f"}}]
    bad = normalize_record(Record({**base, "tools": "{not json"}, "t.jsonl line 4"), ColumnMap(), 0)
    assert isinstance(bad, BadRow) and bad.reason == "wrong type" and "'tools' is not valid JSON" in bad.detail


def test_completion_that_cannot_be_located_is_refused_with_the_reason():
    # The prompt turns are rendered with the total turn count, which changes once the answer is
    # appended: the prompt is no longer the start of the conversation.
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} ({{ loop.index }}/{{ messages | length }})\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    e = ex([U1])
    with pytest.raises(ValueError, match=r"t.jsonl line 1: completion not located: the chat template renders the prompt's own turns differently"):
        tokenize_examples(tok, [e], no_limits())
    pairs, report = tokenize_examples(tok, [e], no_limits(), on_bad_row="skip")
    assert pairs == [] and report.bad["completion not located"] == 1


def test_template_error_is_a_bad_row_naming_the_row():
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = "{% if messages | length > 1 %}{{ raise_exception('only one turn, please') }}{% endif %}{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="t.jsonl line 1: chat template error: only one turn, please"):
        tokenize_examples(tok, [ex([U1])], no_limits())


def test_generation_prompt_not_a_prefix_trains_on_the_rendered_answer():
    # DeepSeek-R1 strips reasoning from rendered assistant turns: the completion is what the
    # template renders for the answer (counted), never the prompt's "<think>" opener.
    tok = family_tokenizer("deepseek-r1")
    e = ex([U1], chosen="<think>\nhmm\n</think>Paris.", rejected="Lyon.")
    (pair,), report = tokenize_examples(tok, [e], no_limits())
    assert decode(tok, pair.prompt) == f"{R1_BOS}{R1_USER}{Q1}{R1_ASSISTANT}"
    assert decode(tok, pair.chosen) == f"Paris.{R1_EOS}" and report.notes["not_prefix"] == 1
