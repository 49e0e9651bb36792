"""Tokenization: exact prompt/completion boundary, EOS, chat templates, truncation."""

from __future__ import annotations

import logging

import pytest

from preftune.data.formats import PreferenceExample
from preftune.data.tokenize import TokenizeSettings, tokenize_examples

LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def ex(prompt, chosen, rejected, system=None, i=0):
    return PreferenceExample(prompt, chosen, rejected, system, f"row {i}", i)


def no_limits(**kw):
    return TokenizeSettings(max_length=None, max_prompt_length=None, **kw)


def test_llama2_boundary_is_exact_prefix_and_eos_added(llama2_tokenizer):
    tok = llama2_tokenizer
    e = ex("\n\nHuman: Which pen is best?\n\nAssistant:", " A fountain pen.", " I don't know, sorry.")
    (pair,), report = tokenize_examples(tok, [e], no_limits())
    bos = [tok.bos_token_id]  # this tokenizer.json adds no BOS itself; preftune (like TRL) always does
    full_c = bos + tok(e.prompt + e.chosen, add_special_tokens=False)["input_ids"]  # natural tokenization of the whole text
    full_r = bos + tok(e.prompt + e.rejected, add_special_tokens=False)["input_ids"]
    assert pair.prompt[0] == tok.bos_token_id
    assert pair.prompt + pair.chosen == full_c + [tok.eos_token_id]
    assert pair.prompt + pair.rejected == full_r + [tok.eos_token_id]
    assert pair.chosen[-1] == tok.eos_token_id and pair.chosen[-2] != tok.eos_token_id
    assert report.boundary_merges == 0


def test_llama2_merge_across_boundary_moves_token_into_completion(llama2_tokenizer):
    # SentencePiece merges the prompt's trailing space with the first completion word ("▁Paris").
    tok = llama2_tokenizer
    e = ex("The capital of France is ", "Paris", "Rome")
    separately = [tok.bos_token_id] + tok("The capital of France is ", add_special_tokens=False)["input_ids"]
    (pair,), report = tokenize_examples(tok, [e], no_limits())
    assert report.boundary_merges == 1
    assert len(pair.prompt) < len(separately)  # the trailing "▁" token left the prompt
    natural = lambda text: [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert pair.prompt + pair.chosen[:-1] == natural("The capital of France is Paris")
    assert pair.prompt + pair.rejected[:-1] == natural("The capital of France is Rome")


def test_chat_template_conversational(llama2_tokenizer):
    tok = llama2_tokenizer
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    e = ex([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
           [{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": "Go."}])
    (pair,), _ = tokenize_examples(tok, [e], no_limits())
    prompt_text = tok.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(e.prompt + e.chosen, tokenize=False)
    assert tok.decode(pair.prompt) == tok.decode(tok(prompt_text, add_special_tokens=False)["input_ids"])
    # the template already emits BOS and EOS: neither is doubled
    assert pair.prompt.count(tok.bos_token_id) == 1
    assert pair.chosen.count(tok.eos_token_id) == 1 and pair.chosen[-1] == tok.eos_token_id
    assert pair.prompt + pair.chosen == tok(full_text, add_special_tokens=False)["input_ids"]


def test_system_column_with_template_renders_like_the_seed(llama2_tokenizer):
    tok = llama2_tokenizer
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    (pair,), _ = tokenize_examples(tok, [ex("Is the sky green?", "No.", "Yes.", system="Be truthful.")], no_limits())
    text = tok.decode(pair.prompt)
    assert "<<SYS>>" in text and "Be truthful." in text and "[INST] Is the sky green? [/INST]" in text


def test_default_template_used_once_and_logged(llama2_tokenizer, caplog):
    tok = llama2_tokenizer
    assert not tok.chat_template
    rows = [ex([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}], i=i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="preftune.data.tokenize"):
        pairs, report = tokenize_examples(tok, rows, no_limits())
    assert report.used_default_template
    assert sum("default ChatML template" in r.message for r in caplog.records) == 1
    # the pair is the ChatML text written out by hand (BOS added, as for plain text), not just
    # anything containing the assistant marker
    chatml_prompt = "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n"
    natural = lambda text: [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert pairs[0].prompt == natural(chatml_prompt)
    assert pairs[0].prompt + pairs[0].chosen == natural(chatml_prompt + "a<|im_end|>\n") + [tok.eos_token_id]
    # a tokenizer with its own template does not get the default
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    _, own = tokenize_examples(tok, rows[:1], no_limits())
    assert not own.used_default_template


def test_rendering_record_counts_plain_text_and_templated_examples(llama2_tokenizer):
    """What run_config.json records for `preftune chat --format auto`: which examples went through a template."""
    from preftune.data.tokenize import PromptRendering

    tok = llama2_tokenizer
    conversation = ex([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}])
    plain, with_system = ex("Q: 1 A:", " 2", " 3"), ex("Q: 1 A:", " 2", " 3", system="Be brief.")
    _, report = tokenize_examples(tok, [plain, with_system, conversation], no_limits())
    # no template of its own: strings stay text (even with a system column), the conversation gets ChatML
    assert PromptRendering.from_notes([report.notes]) == PromptRendering(templated=1, plain_text=2, default_template=True)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    _, report = tokenize_examples(tok, [plain, with_system], no_limits())
    assert PromptRendering.from_notes([report.notes]) == PromptRendering(templated=1, plain_text=1, default_template=False)
    _, report = tokenize_examples(tok, [plain], no_limits(chat_template="always"))
    assert PromptRendering.from_notes([report.notes]) == PromptRendering(templated=1)
    record = {"prompt_rendering": PromptRendering(3, 4, True).to_record()}
    assert PromptRendering.from_run_config(record) == PromptRendering(3, 4, True)
    assert PromptRendering.from_run_config({}) is None and PromptRendering.from_run_config({"prompt_rendering": {"templated": "x"}}) is None


def test_truncation_keep_end_keep_start_and_completion(demo_tokenizer):
    tok = demo_tokenizer
    prompt = "Q: copy 1 2 3 4 5 6 7 8 A:"  # 11 words + BOS = 12 tokens
    e = ex(prompt, " 1 2 3 4 5 6 7 8", " 2 3 4 5 6 7 8 9")
    (end,), _ = tokenize_examples(tok, [e], TokenizeSettings(max_length=None, max_prompt_length=4, truncation_mode="keep_end"))
    assert tok.convert_ids_to_tokens(end.prompt) == ["6", "7", "8", "A:"]
    (start,), _ = tokenize_examples(tok, [e], TokenizeSettings(max_length=None, max_prompt_length=4, truncation_mode="keep_start"))
    assert tok.convert_ids_to_tokens(start.prompt) == ["<s>", "Q:", "copy", "1"]
    (cut,), report = tokenize_examples(tok, [e], TokenizeSettings(max_length=16, max_prompt_length=None))
    assert len(cut.prompt) == 12 and len(cut.chosen) == 4 and report.completion_truncated == 1  # 16 - 12 = 4 of 9


def test_pair_with_no_room_is_dropped_and_counted(demo_tokenizer):
    e1 = ex("Q: copy 1 2 3 4 5 6 A:", " 1", " 2")
    e2 = ex("Q: copy 1 A:", " 1", " 2", i=1)
    pairs, report = tokenize_examples(demo_tokenizer, [e1, e2], TokenizeSettings(max_length=8, max_prompt_length=None))
    assert [p.example_id for p in pairs] == [1]
    assert sum(report.dropped.values()) == 1 and "no room" in report.summary()


def test_identical_after_truncation_is_dropped(demo_tokenizer):
    e = ex("Q: copy 1 A:", " 1 2 3", " 1 2 4")
    pairs, report = tokenize_examples(demo_tokenizer, [e], TokenizeSettings(max_length=6, max_prompt_length=None))
    assert pairs == [] and report.dropped["chosen equals rejected after truncation"] == 1


def test_invalid_truncation_mode():
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_examples(None, [], TokenizeSettings(truncation_mode="middle"))
