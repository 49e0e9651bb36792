"""``preftune chat MODEL_OR_RUN_DIR``: a multi-turn chat in the terminal.

Prompt formats (``--format``):

``chat``    the tokenizer's own chat template (or ``--chat_template_file``); an error if it has none.
``chatml``  preftune's default ChatML template, the one ``preftune train`` applies to
            conversational data when the tokenizer has no template.
``raw``     the text is sent as typed (after the system prompt and a blank line, as training
            renders string rows with a system column), one message at a time: a model trained on
            plain strings (the built-in demo: ``Q: copy 1 2 3 A:``) has no notion of turns.
``auto``    what training did, when the model carries preftune's record of it (``run_config.json``
            of the run, of the run a ``checkpoint-N`` belongs to, or ``preftune_merge.json`` of a
            merged adapter; :class:`preftune.data.tokenize.PromptRendering`): ``raw`` when the
            examples were plain text, ``chat`` when they went through a chat template (a default
            ChatML one is saved as the tokenizer's own), ``chatml`` if that template is missing.
            Without a record: ``chat`` when the tokenizer has a template, ``raw`` for runs of the
            built-in demo, otherwise ``chatml``. The choice and its reason are said once.

Answers stream token by token (a ``transformers.TextStreamer`` subclass). Ctrl-C while the
model answers stops that answer (what was written is kept in the history); Ctrl-C at the
prompt discards the line; Ctrl-D or ``/exit`` quits. When the conversation outgrows the
model's context, the oldest turns are dropped from the prompt (said once).

``/save FILE`` writes the conversation as JSON, Markdown (``.md``) or plain text (``.txt``), through
a temporary file and a rename (a failed write leaves no half file). It refuses a file that exists
(``/save! FILE`` replaces it) and, always, a path inside a run or checkpoint folder of
``preftune train`` or inside the model folder being chatted with: their files are records that
``preftune verify`` and the other commands check.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import GenerationArguments
from .data.tokenize import PromptRendering
from .errors import PreftuneError
from .hf_helpers import has_chat_template
from .rundir import is_checkpoint_folder, is_run_folder, write_text_atomic

__all__ = ["ChatSession", "chat_loop", "resolve_format", "SAVE_FORMATS"]

HELP = """commands:
  /clear          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (/system alone shows it)
  /save FILE      write the conversation to FILE: .md Markdown, .txt plain text, else JSON;
                  refuses a file that exists, and any path inside a run or model folder
  /save! FILE     the same, replacing FILE if it exists
  /exit           quit (also Ctrl-D)
Ctrl-C stops an answer while it is being written."""

# /save FILE: the format by the file's suffix (anything else: JSON)
SAVE_FORMATS = {".json": "JSON", ".md": "Markdown", ".txt": "plain text"}


def resolve_format(fmt: str, loaded, name: str, template_file: str | None = None) -> tuple[str, str | None]:
    """(format, note to show once or None): ``--format`` as asked, or for ``auto`` the format the
    model was trained in (module docstring). ``template_file``: ``--chat_template_file`` was given."""
    tokenizer = loaded.tokenizer
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise PreftuneError(
            f"the tokenizer of {name!r} has no chat template; pass --chat_template_file FILE, "
            "--format chatml (preftune's default template) or --format raw (text as typed)"
        )
    if fmt != "auto":
        return fmt, None
    if template_file:
        return "chat", f"chat format: the template of --chat_template_file {template_file}"
    record, source = loaded.training_record()
    if record is not None and record.templated + record.plain_text > 0:
        return _format_from_record(record, source, has_chat_template(tokenizer), loaded.is_demo)
    if has_chat_template(tokenizer):
        return "chat", "chat format: the tokenizer has a chat template (no preftune record says how the model was trained)"
    if loaded.is_demo:
        return "raw", "the built-in demo was trained on plain text, so messages are sent as typed (try: Q: add one to 1 2 3 A:)"
    return "chatml", ("the tokenizer has no chat template; using preftune's default ChatML template (what `preftune train` "
                      "uses for conversational data). If the model was trained on plain text, restart with --format raw")


def _format_from_record(record: PromptRendering, source: str, has_template: bool, is_demo: bool) -> tuple[str, str]:
    total = record.templated + record.plain_text
    mixed = f" ({record.templated} of {total} examples went through a chat template)" if record.templated and record.plain_text else ""
    if record.plain_text > record.templated:
        hint = " (try: Q: add one to 1 2 3 A:)" if is_demo else ""
        return "raw", (f"raw format: {source} records that the model was trained on plain text, not conversations{mixed}, so "
                       f"messages are sent as typed, one at a time{hint}; --format chat or chatml prompts it as a conversation")
    if has_template:
        which = "preftune's default ChatML template, saved as the tokenizer's" if record.default_template else "the tokenizer's chat template"
        return "chat", f"chat format: {source} records that the model was trained on conversations rendered with {which}{mixed}"
    if record.default_template:
        return "chatml", (f"chatml format: {source} records that the model was trained on conversations rendered with preftune's "
                          f"default ChatML template{mixed}")
    return "chatml", (f"chatml format: {source} records that the model was trained on conversations rendered with a chat template{mixed}, "
                      "but its tokenizer has none now; using preftune's default ChatML template. Pass --chat_template_file with the "
                      "template it was trained with")


def _make_streamer(tokenizer, out):
    """A ``TextStreamer`` that writes each piece of text as it is decoded and keeps it."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                self.pieces.append(text)
                out.write(text)
                out.flush()

        def flush_partial(self):
            """After an interruption: write what was decoded but held back (TextStreamer waits for word ends)."""
            if self.token_cache:
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                self.on_finalized_text(text[self.print_len:])
                self.token_cache, self.print_len = [], 0

        @property
        def text(self) -> str:
            return "".join(self.pieces)

    return Streamer()


@dataclass
class ChatSession:
    """The conversation and how it becomes a prompt; generation streams to ``out``."""

    loaded: object  # preftune.inference_model.LoadedModel
    fmt: str
    settings: GenerationArguments
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    out: object = field(default_factory=lambda: sys.stdout)  # the stdout of when the session starts
    prompt_turns: list[dict] = field(default_factory=list)
    _trim_said: bool = False

    # -- prompt ------------------------------------------------------------------------------
    def _render(self, turns: list[dict]) -> str:
        tok = self.loaded.tokenizer
        if self.fmt == "raw":
            text = turns[-1]["content"]
            return f"{self.system}\n\n{text}" if self.system else text
        from .data.tokenize import DEFAULT_CHAT_TEMPLATE

        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + turns
        template = DEFAULT_CHAT_TEMPLATE if self.fmt == "chatml" else None
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
        except Exception as e:  # jinja raises its own errors (e.g. "system role not supported")
            raise PreftuneError(f"the chat template failed: {str(e).strip().splitlines()[0]}") from None

    def check_template(self) -> None:
        """Render a one-message conversation, so a broken chat template fails now, in one line."""
        self._render([{"role": "user", "content": "hi"}])

    def _context_limit(self) -> int | None:
        config = getattr(self.loaded.model, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def prompt_ids(self, user_text: str) -> tuple[list[int], int]:
        """Prompt ids for the history plus ``user_text``, and how many new tokens still fit."""
        from .inference_model import encode_prompt

        turns = ([] if self.fmt == "raw" else self.messages) + [{"role": "user", "content": user_text}]
        limit = self._context_limit()
        budget = self.settings.max_new_tokens
        dropped = 0
        while True:
            ids = encode_prompt(self.loaded.tokenizer, self._render(turns))
            if limit is None or len(ids) + min(budget, 16) <= limit or len(turns) <= 1:
                break
            turns = turns[2:]  # the oldest user message and its answer
            dropped += 1
        self.prompt_turns = turns  # what the last prompt held
        if dropped and not self._trim_said:
            self._trim_said = True
            self.note(f"(the conversation outgrew the model's {limit}-token context: the oldest turns are left out of the prompt)")
        if limit is not None and len(ids) >= limit:
            ids = ids[-(limit - 1):]
            self.note(f"(message cut to its last {limit - 1} tokens to fit the model's context)")
        room = budget if limit is None else max(1, min(budget, limit - len(ids)))
        return ids, room

    def note(self, text: str):
        self.out.write(text + "\n")
        self.out.flush()

    # -- one turn ----------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        tok = self.loaded.tokenizer
        ids: list[int] = []
        gen_eos = getattr(getattr(self.loaded.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, tok.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, (list, tuple)):
                ids.extend(int(v) for v in value)
        if self.fmt == "chatml":
            end = tok.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != tok.unk_token_id:
                ids.append(end)
        return sorted(set(ids))

    def reply(self, user_text: str) -> tuple[str, bool]:
        """Stream the model's answer to ``user_text``; returns (answer, interrupted)."""
        import torch

        ids, room = self.prompt_ids(user_text)
        device = next(self.loaded.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        streamer = _make_streamer(self.loaded.tokenizer, self.out)
        tok = self.loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self._eos_ids() or [0])[0]
        interrupted = False
        try:
            with torch.no_grad():
                self.loaded.generate_ids(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=room,
                    eos_token_id=self._eos_ids() or None, pad_token_id=pad, streamer=streamer, **self.settings.generate_kwargs(),
                )
        except KeyboardInterrupt:
            interrupted = True
            streamer.flush_partial()
        answer = streamer.text.strip()
        self.out.write(" [stopped]\n" if interrupted else "\n")
        self.out.flush()
        if not answer and not interrupted:
            self.note("(no answer: the model ended the text at once)")
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer, interrupted

    def save(self, path: str, model_name: str, overwrite: bool = False) -> tuple[Path, int, str]:
        """Write the conversation to ``path`` in the format its suffix names (:data:`SAVE_FORMATS`);
        returns (path, number of messages written, format). ``overwrite``: ``/save!``."""
        try:
            target = self._save_target(path, overwrite)
        except OSError as e:  # a name the file system refuses (too long, ...)
            raise PreftuneError(f"/save {path}: {e.strerror or e}; choose another name") from None
        fmt = SAVE_FORMATS.get(target.suffix.lower(), "JSON")
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        if fmt == "Markdown":
            text = self._markdown(model_name)
        elif fmt == "plain text":
            text = self._plain_text(model_name)
        else:
            text = json.dumps({
                "model": model_name,
                "format": self.fmt,
                "system_prompt": self.system,
                "generation": self._generation(),
                "messages": messages,
            }, indent=2, ensure_ascii=False) + "\n"
        try:
            write_text_atomic(target, text)
        except OSError as e:
            raise PreftuneError(f"/save {path}: {e.strerror or e}; nothing was written") from None
        return target, len(messages), fmt

    def _generation(self) -> dict:
        return self.settings.generate_kwargs() | {"max_new_tokens": self.settings.max_new_tokens}

    def _save_target(self, path: str, overwrite: bool) -> Path:
        """``path`` checked: not a folder, not in a run or model folder, not an existing file unless ``overwrite``."""
        command = "/save!" if overwrite else "/save"
        if "\0" in path:
            raise PreftuneError(f"{command} {path!r}: the name contains a NUL character; choose another name")
        target = Path(path).expanduser()
        if target.is_dir():
            raise PreftuneError(f"{command} {path}: is a folder; give a file name, e.g. {path.rstrip('/')}/chat.json")
        protected = self._protected_folder(target)
        if protected is not None:
            folder, what = protected
            raise PreftuneError(f"{command} {path}: {str(folder)!r} is {what}, whose files preftune must not change "
                                f"(not even with /save!); save it elsewhere, e.g. {command} {folder.parent / target.name}")
        if not target.parent.is_dir():
            raise PreftuneError(f"{command} {path}: no folder {str(target.parent)!r}; create it first, or choose another place")
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise PreftuneError(f"/save {path}: exists; use /save! {path} to replace it, or choose another name")
        return target

    def _protected_folder(self, target: Path) -> tuple[Path, str] | None:
        """The outermost run, checkpoint or model folder that holds ``target`` (with links resolved, then
        as written), and what it is; None when there is none."""
        model = self.loaded.folder.resolve() if self.loaded.folder is not None else None
        found = None
        for start in (target.resolve().parent, Path(os.path.abspath(target)).parent):
            for folder in (start, *start.parents):
                if folder.resolve() == model:
                    found = (folder, "the model folder being chatted with")
                elif is_run_folder(folder):
                    found = (folder, "a run folder of `preftune train`")
                elif is_checkpoint_folder(folder):
                    found = (folder, "a checkpoint of `preftune train`")
            if found is not None:
                return found
        return None

    def _markdown(self, model_name: str) -> str:
        settings = f"{self.settings.describe()}, up to {self.settings.max_new_tokens} new tokens"
        lines = [f"# Chat with {model_name}", "", f"Prompt format: {self.fmt}; {settings}.", ""]
        if self.system:
            lines += ["## System prompt", "", self.system, ""]
        for message in self.messages:
            lines += [f"## {message['role'].capitalize()}", "", message["content"] or "*(no answer)*", ""]
        return "\n".join(lines)

    def _plain_text(self, model_name: str) -> str:
        blocks = [f"chat with {model_name} ({self.fmt} format)"]
        if self.system:
            blocks.append(f"system: {self.system}")
        blocks += [f"{m['role']}: {m['content']}" for m in self.messages]
        return "\n\n".join(blocks) + "\n"


def _handle_command(line: str, session: ChatSession, model_name: str) -> bool:
    """Run a /command; returns False when the chat should end."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd == "/help":
        session.note(HELP)
    elif cmd == "/clear":
        session.messages.clear()
        session._trim_said = False
        session.note("(conversation cleared)")
    elif cmd == "/system":
        if arg:
            session.system = arg
            session.note("(system prompt set)")
        else:
            session.note(f"(system prompt: {session.system!r})" if session.system else "(no system prompt; /system TEXT sets one)")
    elif cmd in ("/save", "/save!"):
        if not arg:
            session.note("usage: /save FILE (.md: Markdown, .txt: plain text, else JSON); /save! FILE replaces an existing FILE")
        else:
            try:
                path, count, fmt = session.save(arg, model_name, overwrite=cmd == "/save!")
                session.note(f"(saved {count} messages to {path} as {fmt})")
            except PreftuneError as e:
                session.note(f"error: {e}")
    else:
        session.note(f"unknown command {cmd}; /help lists the commands")
    return True


def _read_line(prompt: str) -> str:
    return input(prompt)


def chat_loop(session: ChatSession, model_name: str, read=_read_line) -> int:
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            session.note("")
            return 0
        except KeyboardInterrupt:
            session.note("^C (/exit or Ctrl-D quits)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _handle_command(line, session, model_name):
                return 0
            continue
        session.reply(line)
        session.note("")
