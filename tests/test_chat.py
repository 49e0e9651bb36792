"""``preftune chat``: the real command in a pseudo-terminal, and the session logic in process.

The reference answer is always a plain ``model.generate`` (greedy) on the same prompt, so the
chat is checked to print exactly what the model writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from preftune.model_hooks import ModelHooks

from _trained_runs import demo_initial_model, demo_run, mark_finished
from preftune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return demo_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run):
    from preftune.inference_model import load_pretrained

    return load_pretrained(str(run))


def greedy(run, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run))
    model = AutoModelForCausalLM.from_pretrained(str(run)).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class Recorder:
    """A stand-in for stdout that keeps every write separately."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


def session(loaded, fmt="raw", max_new_tokens=12, system=None):
    from preftune.chat import ChatSession
    from preftune.config import GenerationArguments

    return ChatSession(loaded, fmt, GenerationArguments(max_new_tokens=max_new_tokens), system=system, out=Recorder())


def test_chat_in_a_terminal(run, tmp_path):
    """Type a message, read the streamed answer, Ctrl-C at the prompt, /system, /save, Ctrl-D."""
    pexpect = pytest.importorskip("pexpect")
    question = "Q: add one to 1 2 3 A:"
    expected = greedy(run, question, max_new_tokens=8)
    assert expected, "the 60-step demo model should answer something"
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    child = pexpect.spawn(sys.executable, ["-m", "preftune", "chat", str(run), "--max_new_tokens", "8"],
                          env=env, encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect("raw format")  # a demo run is chatted with as plain text, said once
        child.expect("trained on plain text")
        child.expect(">>> ")
        child.sendline(question)
        child.expect_exact(question)  # the terminal's echo
        child.expect(">>> ")
        assert child.before.strip() == expected
        child.sendintr()  # Ctrl-C at the prompt discards the line, does not quit
        child.expect("Ctrl-D quits")
        child.expect(">>> ")
        child.sendline("/system answer briefly")
        child.expect_exact("(system prompt set)")
        saved = tmp_path / "conversation.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("(saved 3 messages to")
        child.expect(">>> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    data = json.loads(saved.read_text())
    assert data["messages"] == [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": question},
        {"role": "assistant", "content": expected},
    ]
    assert data["format"] == "raw" and data["generation"]["do_sample"] is False


def test_answer_streams_word_by_word(run, loaded):
    s = session(loaded)
    answer, interrupted = s.reply("Q: copy 4 5 6 7 A:")
    assert not interrupted
    assert answer == greedy(run, "Q: copy 4 5 6 7 A:", 12)
    pieces = [w for w in s.out.writes if w.strip()]
    # the word-level demo tokenizer releases each word as soon as the next one starts
    assert len(pieces) == len(answer.split()) >= 2, s.out.writes
    assert s.messages[-1] == {"role": "assistant", "content": answer}


def test_ctrl_c_during_an_answer_keeps_what_was_written(loaded):
    tok = loaded.tokenizer

    def interrupted_generate(input_ids, streamer=None, **kwargs):
        streamer.put(input_ids[0])  # the prompt (skipped by the streamer)
        for word in ("7", "8", "9"):
            streamer.put(torch.tensor([tok.convert_tokens_to_ids(word)]))
        raise KeyboardInterrupt

    s = session(dataclasses.replace(loaded, hooks=ModelHooks(generate=interrupted_generate)))
    answer, interrupted = s.reply("Q: copy 7 8 9 A:")
    assert interrupted and answer == "7 8 9"
    assert s.out.text.rstrip().endswith("[stopped]")
    assert s.messages[-1]["content"] == "7 8 9"


def test_chat_format_keeps_history_and_trims_it_to_the_context(loaded):
    from preftune.inference_model import encode_prompt

    s = session(loaded, fmt="chatml", system="be exact")
    s.messages += [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"}]
    text = s._render(s.messages + [{"role": "user", "content": "second"}])
    assert text == ("<|im_start|>system\nbe exact<|im_end|>\n<|im_start|>user\nfirst question<|im_end|>\n"
                    "<|im_start|>assistant\nfirst answer<|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n")
    # the demo model has 64 positions: a long history is cut from the oldest turn
    s.messages = []
    for i in range(6):
        s.messages += [{"role": "user", "content": f"copy {i} " * 4}, {"role": "assistant", "content": f"{i} " * 4}]
    ids, room = s.prompt_ids("copy 9 9 ")  # (trailing space: the word-level demo tokenizer splits on spaces)
    assert len(ids) + room <= 64 and room >= 1
    kept = loaded.tokenizer.decode(ids)
    assert "copy 9 9" in kept and "copy 5" in kept and "copy 0" not in kept
    history = s.messages + [{"role": "user", "content": "copy 9 9 "}]
    turns = s.prompt_turns
    assert turns[0]["role"] == "user" and turns == history[-len(turns):]
    # the longest such suffix: one more turn back (a user message and its answer) leaves no room to answer
    one_more = history[-(len(turns) + 2):]
    assert len(encode_prompt(loaded.tokenizer, s._render(one_more))) + s.settings.max_new_tokens > 64


def test_commands_and_exit(loaded, tmp_path):
    from preftune.chat import chat_loop

    s = session(loaded)
    script = iter(["/help", "/system", "/nope", "/save", f"/save {tmp_path}", "/clear", "/exit", "never read"])

    def read(prompt):
        return next(script)

    assert chat_loop(s, "m", read) == 0
    out = s.out.text
    assert "/clear" in out and "no system prompt" in out and "unknown command /nope" in out
    assert "usage: /save FILE" in out and "is a folder" in out and "(conversation cleared)" in out
    assert next(script) == "never read"  # /exit ended the loop

    def eof(prompt):
        raise EOFError

    assert chat_loop(session(loaded), "m", eof) == 0


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "kernels-community" not in line]
    assert len(err) == 1 and err[0].startswith("preftune: error: "), err
    return err[0]


def test_chat_errors_are_one_line(run, tmp_path, capsys):
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "not found" in _one_line_error(capsys)
    assert main(["chat", str(tmp_path)]) == 2
    assert "holds no saved model" in _one_line_error(capsys)
    assert main(["chat", str(run), "--format", "chat"]) == 2
    assert "no chat template" in _one_line_error(capsys)
    assert main(["chat", str(run), "--top_p", "0"]) == 2
    assert "--top_p" in _one_line_error(capsys)


def test_reft_folder_loads_on_its_base_and_generates_through_the_reft_helper(run, tmp_path):
    from transformers import AutoTokenizer

    from preftune import reft
    from preftune.inference_model import load_pretrained

    tok = AutoTokenizer.from_pretrained(str(run))
    model = demo_initial_model(run)  # the demo's base, as training started from it (the loader rebuilds it)
    interventions = reft.add_interventions(model, reft.ReftConfig(layers=[0, 1], rank=2, positions="l1", share_weights=True, hidden_size=64), trainable=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in interventions.interventions.values():
            module.source.bias.normal_(0, 3.0)  # not the identity
    folder = tmp_path / "reft"
    reft.save_reft(model, folder)
    tok.save_pretrained(str(folder))
    (folder / "run_config.json").write_text((run / "run_config.json").read_text())
    mark_finished(folder)  # readers verify a run folder against the manifest its run wrote last

    loaded = load_pretrained(str(folder))
    assert loaded.kind == "ReFT" and loaded.hooks.generate is not None and loaded.hooks.batch_context is not None
    ids = torch.tensor([loaded.tokenizer("Q: copy 1 2 A:").input_ids])
    want = reft.reft_generate(model, ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    s = session(loaded, max_new_tokens=6)
    answer, _ = s.reply("Q: copy 1 2 A:")
    assert answer == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True).strip()


# --- /save: never over a run's files, never over a file without /save!, never half a file ---------
def saved_note(s) -> str:
    return [line for line in s.out.text.splitlines() if line][-1]


def run_command(s, line: str) -> str:
    from preftune.chat import chat_loop

    s.out.writes.clear()
    script = iter([line, "/exit"])
    assert chat_loop(s, "demo", lambda prompt: next(script)) == 0
    return saved_note(s)


def test_save_refuses_an_existing_file_unless_save_bang(loaded, tmp_path):
    s = session(loaded, system="be brief")
    s.messages += [{"role": "user", "content": "Q: copy 1 A:"}, {"role": "assistant", "content": "1"}]
    target = tmp_path / "chat.json"
    assert run_command(s, f"/save {target}") == f"(saved 3 messages to {target} as JSON)"
    first = target.read_bytes()
    s.messages += [{"role": "user", "content": "again"}, {"role": "assistant", "content": "2"}]
    note = run_command(s, f"/save {target}")
    assert note == f"error: /save {target}: exists; use /save! {target} to replace it, or choose another name"
    assert target.read_bytes() == first
    assert run_command(s, f"/save! {target}") == f"(saved 5 messages to {target} as JSON)"
    assert len(json.loads(target.read_text())["messages"]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left
    run_command(s, "/help")
    assert "/save! FILE" in s.out.text
    long_name = tmp_path / ("a" * 300 + ".json")  # a name the file system refuses: one line, not a traceback
    assert run_command(s, f"/save {long_name}") == f"error: /save {long_name}: File name too long; choose another name"


def test_save_never_writes_into_a_run_checkpoint_or_the_model_folder(run, loaded, tmp_path):
    """Not even /save!: a run's config.json overwritten made `preftune verify` call the run damaged."""
    from preftune.rundir import RUN_CONFIG_FILE
    from preftune.verify import all_intact, verify_folder

    from _trained_runs import copy_run

    copy = copy_run(run, tmp_path / "run")
    s = session(dataclasses.replace(loaded, folder=copy))
    s.messages += [{"role": "user", "content": "Q: copy 1 A:"}, {"role": "assistant", "content": "1"}]
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    (tmp_path / "link").symlink_to(copy)
    for line in (f"/save {copy / 'config.json'}", f"/save! {copy / 'config.json'}", f"/save! {copy / RUN_CONFIG_FILE}",
                 f"/save {copy / 'notes.md'}", f"/save! {tmp_path / 'link' / 'config.json'}"):
        note = run_command(s, line)
        assert note.startswith("error: /save") and f"{str(copy)!r} is the model folder being chatted with" in note, note
        assert f"e.g. {line.split()[0]} {tmp_path}/" in note, note  # a place outside the run
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    assert all_intact(verify_folder(copy))

    # another run's folder, a checkpoint folder (by its name), a plain model folder chatted with
    note = run_command(session(loaded), f"/save! {copy / 'chat.json'}")
    assert f"{str(copy)!r} is a run folder of `preftune train`" in note and not (copy / "chat.json").exists()
    checkpoint = tmp_path / "elsewhere" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    note = run_command(session(loaded), f"/save {checkpoint / 'x.txt'}")
    assert f"{str(checkpoint)!r} is a checkpoint of `preftune train`" in note and not (checkpoint / "x.txt").exists()
    plain = tmp_path / "plain_model"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    note = run_command(session(dataclasses.replace(loaded, folder=plain)), f"/save! {plain / 'config.json'}")
    assert "the model folder being chatted with" in note and (plain / "config.json").read_text() == "{}"


def test_a_failed_save_leaves_the_old_file_whole(tmp_path):
    """A write that fails half-way (a real file-size limit, in a forked child: the limit must not touch
    this process's files) leaves the file it was to replace as it was, and no temporary file: it was
    written to a temporary file and renamed."""
    import io
    import resource
    import signal
    from types import SimpleNamespace

    from preftune.chat import ChatSession, chat_loop
    from preftune.config import GenerationArguments

    target = tmp_path / "chat.md"
    target.write_text("my notes\n")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the chat's own code, then _exit
        code = 1
        try:
            os.close(read_end)
            out = io.StringIO()
            s = ChatSession(SimpleNamespace(folder=None), "raw", GenerationArguments(), out=out)
            s.messages = [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
            lines = iter([f"/save! {target}", f"/save {target}", "/exit"])
            code = chat_loop(s, "m", lambda prompt: next(lines))
            os.write(write_end, out.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        printed = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, printed
    assert target.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["chat.md"]
    assert f"error: /save {target}: File too large; nothing was written" in printed, printed


def test_save_format_follows_the_suffix(loaded, tmp_path):
    s = session(loaded, system="be brief")
    s.messages += [{"role": "user", "content": "Q: copy 1 2 A:"}, {"role": "assistant", "content": "1 2"},
                   {"role": "user", "content": "Q: copy 3 A:"}, {"role": "assistant", "content": "3"}]
    md = tmp_path / "chat.md"
    assert run_command(s, f"/save {md}") == f"(saved 5 messages to {md} as Markdown)"
    text = md.read_text()
    assert not text.lstrip().startswith("{") and text.startswith("# Chat with demo\n")
    sections = [(line, i) for i, line in enumerate(text.splitlines()) if line.startswith("## ")]
    assert [line for line, _ in sections] == ["## System prompt", "## User", "## Assistant", "## User", "## Assistant"]
    lines = text.splitlines()
    assert [lines[i + 2] for _, i in sections] == ["be brief", "Q: copy 1 2 A:", "1 2", "Q: copy 3 A:", "3"]

    txt = tmp_path / "chat.txt"
    assert run_command(s, f"/save {txt}") == f"(saved 5 messages to {txt} as plain text)"
    assert txt.read_text().split("\n\n")[1:] == ["system: be brief", "user: Q: copy 1 2 A:", "assistant: 1 2", "user: Q: copy 3 A:", "assistant: 3\n"]

    for name in ("chat.JSON", "chat.log", "chat"):
        path = tmp_path / name
        assert run_command(s, f"/save {path}") == f"(saved 5 messages to {path} as JSON)"
        assert json.loads(path.read_text())["messages"][0] == {"role": "system", "content": "be brief"}


# --- --format auto follows what training did -------------------------------------------------------
def with_record(loaded, templated: int, plain_text: int, default_template: bool = False, template: str | None = None):
    """``loaded`` as if its run had recorded this rendering (a hand-made record; the demo's own says plain text)."""
    import copy

    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = template
    record = {"prompt_rendering": {"templated": templated, "plain_text": plain_text, "default_template": default_template}}
    return dataclasses.replace(loaded, tokenizer=tokenizer, run_config=record)


def test_auto_format_follows_the_runs_record(run, loaded):
    from preftune.chat import resolve_format
    from preftune.data.tokenize import DEFAULT_CHAT_TEMPLATE

    # the demo's own record: its 2000 training and 64 held-out pairs are plain strings
    record = json.loads((run / "run_config.json").read_text())["prompt_rendering"]
    assert record == {"templated": 0, "plain_text": 2064, "default_template": False}
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    # trained on plain text: raw, whether or not the tokenizer has a template (was: chatml / chat)
    for template in (None, own):
        fmt, note = resolve_format("auto", with_record(loaded, 0, 12, template=template), "m")
        assert fmt == "raw" and "run_config.json records that the model was trained on plain text" in note, note
    # trained on conversations: the template they were rendered with
    fmt, note = resolve_format("auto", with_record(loaded, 12, 0, True, DEFAULT_CHAT_TEMPLATE), "m")
    assert fmt == "chat" and "preftune's default ChatML template, saved as the tokenizer's" in note
    fmt, note = resolve_format("auto", with_record(loaded, 12, 0, False, own), "m")
    assert fmt == "chat" and "rendered with the tokenizer's chat template" in note
    fmt, note = resolve_format("auto", with_record(loaded, 12, 0, True, None), "m")  # a run from before the template was saved
    assert fmt == "chatml" and "default ChatML" in note
    # mixed data: the larger part, and the counts said
    fmt, note = resolve_format("auto", with_record(loaded, 3, 9, template=own), "m")
    assert fmt == "raw" and "3 of 12 examples went through a chat template" in note
    # explicit choices win; --chat_template_file means its template
    assert resolve_format("chatml", with_record(loaded, 0, 12), "m") == ("chatml", None)
    assert resolve_format("auto", with_record(loaded, 0, 12, template=own), "m", template_file="t.jinja")[0] == "chat"
    # no record: today's guess (the demo without its record is still raw; anything else without a template is chatml)
    none = dataclasses.replace(with_record(loaded, 0, 0), run_config=None)
    assert resolve_format("auto", none, "m")[0] == "chatml"
    assert resolve_format("auto", dataclasses.replace(none, run_config={"demo": True}), "m")[0] == "raw"
    assert resolve_format("auto", with_record(loaded, 0, 0, template=own), "m")[0] == "chat"


def chat_header(model, monkeypatch, capfd) -> str:
    """What `preftune chat MODEL` prints before its first prompt (stdin: /exit)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(model), "--max_new_tokens", "2"]) == 0
    return capfd.readouterr().out.split(">>>")[0]


def test_runs_record_plain_text_or_conversations_and_chat_follows_them(tmp_path, monkeypatch, capfd):
    """Two tiny runs through `preftune train`: plain strings with a tokenizer that has a chat template
    (was chatted with through that template), and conversations with one that has none (ChatML)."""
    from transformers import AutoTokenizer

    from _faults import train, write_inputs

    model_dir, plain_rows = write_inputs(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with_template = tmp_path / "with_template"
    tok.save_pretrained(str(with_template))
    for name in ("config.json", "model.safetensors"):
        (with_template / name).write_bytes((model_dir / name).read_bytes())

    lora = tmp_path / "lora"
    code, err = train(lora, with_template, plain_rows, "lora", "--max_steps", "2", "--save_steps", "1")
    assert code == 0, err
    assert json.loads((lora / "run_config.json").read_text())["prompt_rendering"] == {"templated": 0, "plain_text": 24, "default_template": False}
    header = chat_header(lora, monkeypatch, capfd)
    assert "; raw format," in header and "run_config.json records that the model was trained on plain text" in header, header
    header = chat_header(lora / "checkpoint-1", monkeypatch, capfd)
    assert "; raw format," in header and "run_config.json of its run records" in header, header
    merged = tmp_path / "merged"
    assert main(["merge", str(lora), "--output_dir", str(merged)]) == 0
    header = chat_header(merged, monkeypatch, capfd)
    assert "; raw format," in header and "preftune_merge.json records" in header, header

    conversations = tmp_path / "conversations.jsonl"
    rows = [json.loads(line) for line in plain_rows.read_text().splitlines()]
    conversations.write_text("".join(json.dumps({
        "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}],
    }) + "\n" for r in rows))
    full = tmp_path / "full"
    code, err = train(full, model_dir, conversations, "full", "--max_steps", "1", "--save_steps", "10")
    assert code == 0, err
    assert json.loads((full / "run_config.json").read_text())["prompt_rendering"] == {"templated": 24, "plain_text": 0, "default_template": True}
    header = chat_header(full, monkeypatch, capfd)
    assert "; chat format," in header and "preftune's default ChatML template, saved as the tokenizer's" in header, header
