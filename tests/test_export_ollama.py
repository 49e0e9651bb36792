"""``preftune export --ollama``: the Modelfile's TEMPLATE is executed by Go's ``text/template``
(Ollama's template engine) and must equal the Jinja chat template's rendering; templates that are
not fixed text around each turn are refused. Skipped without a ``go`` toolchain (``.ci/run``
installs golang-go)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from _gguf_models import LLAMA2_CHAT, LLAMA3_CHAT, MISTRAL_CHAT, QWEN2_CHAT, one_line_error, qwen2_style_tokenizer, save_model, tiny
from preftune.cli import main

pytestmark = pytest.mark.slow


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
	Template string
	System   string
	Messages []*Message
}

// Renders each case the way Ollama calls its templates: .System (the system messages, joined)
// and .Messages (all messages, system ones included).
func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("prompt").Parse(c.Template))
		var b jsonBuffer
		if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type jsonBuffer []byte

func (b *jsonBuffer) Write(p []byte) (int, error) { *b = append(*b, p...); return len(p), nil }
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, messages) -> text, through a compiled Go program (skips without go)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go); .ci/run installs it")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_RENDER, encoding="utf-8")
    built = subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], capture_output=True, text=True,
                           cwd=folder, env={**os.environ, "GOCACHE": str(folder / "cache"), "GO111MODULE": "off"})
    assert built.returncode == 0, built.stderr

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        cases = [{"Template": template, "System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
                  "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]} for msgs in conversations]
        done = subprocess.run([str(folder / "render")], input=json.dumps(cases), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


CONVERSATIONS = [
    [("user", "Hi")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Add 2 and 3.")],
    [("system", "Answer in one word."), ("user", "Sky colour?")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Why is {{ this }} here?")],
]


@pytest.mark.parametrize("template", [QWEN2_CHAT, LLAMA2_CHAT, LLAMA3_CHAT, MISTRAL_CHAT], ids=["qwen2", "llama2", "llama3", "mistral"])
def test_ollama_go_template_renders_what_the_jinja_template_renders(template, go_render):
    from preftune.export.ollama import go_template, turn_format_of

    tok = qwen2_style_tokenizer()
    tok.add_special_tokens({"bos_token": "<|startoftext|>", "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    fmt = turn_format_of(tok, template)
    conversations, expected = [], []
    for chat in CONVERSATIONS:
        messages = [{"role": role, "content": text} for role, text in chat]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        except Exception:
            assert template is MISTRAL_CHAT and chat[0][0] == "system"  # the only template without a system role
            messages = messages[1:]  # Ollama would still send the conversation; the system prompt has nowhere to go
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        conversations.append(messages)
        expected.append(text.removeprefix(tok.bos_token))  # Ollama adds BOS itself
    got = go_render(go_template(fmt, tok.bos_token), conversations)
    assert got == expected
    assert any("{{ this }}" in text for text in got)  # message text is data, never template code


def test_ollama_modelfile_and_untranslatable_templates(tmp_path, capsys):
    tok = qwen2_style_tokenizer()
    folder = save_model(tmp_path, tiny("qwen2", len(tok)), tok)
    out = tmp_path / "chat.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--ollama"]) == 0
    printed = capsys.readouterr().out
    modelfile = tmp_path / "chat.Modelfile"
    assert f"ollama create NAME -f {modelfile}" in printed
    text = modelfile.read_text(encoding="utf-8")
    assert text.startswith('FROM ./chat.gguf\nTEMPLATE """{{ if .System }}<|im_start|>system\n')
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text

    counting = qwen2_style_tokenizer()
    counting.chat_template = "{% for message in messages %}{{ 'Turn ' ~ loop.index ~ ': ' ~ message['content'] ~ '\\n' }}{% endfor %}"
    other = save_model(tmp_path, tiny("qwen2", len(counting)), counting, "counting")
    err = one_line_error(capsys, ["export", str(other), "--gguf", str(tmp_path / "counting.gguf"), "--ollama"])
    assert "TEMPLATE by hand" in err
    assert not (tmp_path / "counting.gguf").exists()  # refused before the big file is written


def test_ollama_modelfile_sends_text_as_typed_for_a_model_trained_on_plain_text(tmp_path, capsys):
    """A merged adapter whose run trained on plain strings (``preftune merge`` copies the run's
    ``prompt_rendering`` record into ``preftune_merge.json``) is prompted as typed, as ``preftune chat``
    does, although its tokenizer has a chat template; ``--chat_template_file`` still asks for turns."""
    tok = qwen2_style_tokenizer()
    folder = save_model(tmp_path, tiny("qwen2", len(tok)), tok)
    (folder / "preftune_merge.json").write_text(json.dumps({"prompt_rendering": {"templated": 0, "plain_text": 24, "default_template": False}}))
    assert main(["export", str(folder), "--gguf", str(tmp_path / "plain.gguf"), "--ollama"]) == 0
    assert "trained on plain text" in capsys.readouterr().out
    assert (tmp_path / "plain.Modelfile").read_text(encoding="utf-8").startswith('FROM ./plain.gguf\nTEMPLATE """{{ .Prompt }}"""')

    template_file = tmp_path / "template.jinja"
    template_file.write_text(QWEN2_CHAT, encoding="utf-8")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "turns.gguf"), "--ollama", "--chat_template_file", str(template_file)]) == 0
    assert "<|im_start|>" in (tmp_path / "turns.Modelfile").read_text(encoding="utf-8")
