"""An Ollama Modelfile for an exported GGUF: the chat template in Go template syntax, stop tokens.

Ollama renders prompts with Go's ``text/template`` from ``.System`` (the system messages, joined)
and ``.Messages`` (``.Role``, ``.Content``); the run's chat template is Jinja. A general Jinja
program has no Go equivalent, but nearly every chat template is *fixed text around each turn*,
which :class:`TurnFormat` captures::

    header | system_header + SYSTEM + system_suffix
    (user_prefix + USER + user_suffix  |  assistant_prefix + ASSISTANT + assistant_suffix)*
    generation_prompt

(``header`` may carry a default system prompt, as Qwen2's template does; Llama-2's template puts the
system prompt inside the first user turn, ``system_in_first_user``). The parts are found by
rendering the Jinja template on marker conversations and cutting at the markers
(:func:`turn_format_of`); the result is then rendered in Python on more conversations and must
equal the Jinja rendering exactly, or ``--ollama`` is refused in one line (write the TEMPLATE by
hand then). The Go template emitted for a conversation ending in a user turn equals the Jinja
rendering with ``add_generation_prompt=True``, except that a leading BOS is left to Ollama, which
adds it itself when the vocabulary says so. An assistant turn that ends the conversation is left
open (no ``assistant_suffix``), Ollama's convention for continuing a reply. Jinja filters applied to
message text (``| trim``) are not reproduced.

Stop tokens: the first special token (else the text) of ``assistant_suffix`` and of
``user_prefix``, and the EOS token, so generation ends where training's answers ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PreftuneError

__all__ = ["TurnFormat", "turn_format_of", "go_template", "stop_tokens", "write_modelfile"]

_S, _U1, _A1, _U2, _A2 = "SYSTEM7d1f", "USER7d1f1", "ASSISTANT7d1f1", "USER7d1f2", "ASSISTANT7d1f2"


@dataclass
class TurnFormat:
    """A chat template as fixed text around each turn (module docstring)."""

    header: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_header: str | None = None  # None: the template has no system role
    system_suffix: str = ""
    system_in_first_user: bool = False

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """What the Jinja template renders for ``messages``, if it is this turn format."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        with_system = bool(system) and self.system_header is not None
        out = self.system_header + system + self.system_suffix if with_system and not self.system_in_first_user else self.header
        pending = system if with_system and self.system_in_first_user else ""
        for message in turns:
            if message["role"] == "user":
                out += self.user_prefix
                if pending:
                    out, pending = out + self.system_header + pending + self.system_suffix, ""
                out += message["content"] + self.user_suffix
            else:
                out += self.assistant_prefix + message["content"] + self.assistant_suffix
        return out + (self.generation_prompt if add_generation_prompt else "")


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template)


def _cut(text: str, markers: list[str]) -> list[str]:
    """``text`` split at each marker in turn: the pieces before, between and after them."""
    pieces, rest = [], text
    for marker in markers:
        head, found, rest = rest.partition(marker)
        if not found:
            raise ValueError(f"marker {marker} not rendered")
        pieces.append(head)
    return pieces + [rest]


def _strip(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(what)
    return text[len(prefix):]


def _derive(tokenizer, template: str) -> TurnFormat:
    user, assistant = {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}
    alone = _render(tokenizer, template, [user], False)
    prompt = _render(tokenizer, template, [user], True)
    generation_prompt = _strip(prompt, alone, "the generation prompt is not appended at the end")
    before_user, user_suffix = _cut(alone, [_U1])
    lead, between, assistant_suffix = _cut(_render(tokenizer, template, [user, assistant], False), [_U1, _A1])
    assistant_prefix = _strip(between, user_suffix, "the user turn ends differently before an answer")
    pieces = _cut(_render(tokenizer, template, [user, assistant, {"role": "user", "content": _U2}], True), [_U1, _A1, _U2])
    user_prefix = _strip(pieces[2], assistant_suffix, "the assistant turn ends differently before the next user turn")
    if not before_user.endswith(user_prefix) or lead != before_user:
        raise ValueError("the first user turn starts differently from later ones")
    fmt = TurnFormat(before_user[: len(before_user) - len(user_prefix)], user_prefix, user_suffix, assistant_prefix, assistant_suffix, generation_prompt)
    try:
        head, middle, _ = _cut(_render(tokenizer, template, [{"role": "system", "content": _S}, user], True), [_S, _U1])
    except Exception:  # the template raises on a system message, or drops it: no system role
        return fmt
    if middle.endswith(user_prefix):
        fmt.system_header, fmt.system_suffix = head, middle[: len(middle) - len(user_prefix)]
    elif head.startswith(fmt.header + user_prefix):
        fmt.system_header, fmt.system_suffix, fmt.system_in_first_user = head[len(fmt.header + user_prefix):], middle, True
    return fmt


def _check_conversations() -> list[tuple[list[dict], bool]]:
    s, u, a = "system", "user", "assistant"
    chats = [[(u, "Hi")], [(u, "Hi"), (a, "Hello!")], [(u, "Hi"), (a, "Hello!"), (u, "Add 2 and 3.")],
             [(s, "Be brief."), (u, "Hi")], [(s, "Be brief."), (u, "Hi"), (a, "Hello!"), (u, "Why?"), (a, "Because.")]]
    as_messages = [[{"role": role, "content": text} for role, text in chat] for chat in chats]
    return [(m, gen) for m in as_messages for gen in (True, False)]


def turn_format_of(tokenizer, template: str | None) -> TurnFormat | None:
    """The turn format of ``template`` (None when there is no template), checked; else a one-line refusal."""
    if not template:
        return None
    try:
        fmt = _derive(tokenizer, template)
    except Exception as e:  # ValueError from the cuts, or the template's own errors on the probes
        raise PreftuneError(f"--ollama: the chat template is not fixed text around each turn ({str(e).strip().splitlines()[0]}), "
                            "so it cannot be translated to Ollama's Go template; export without --ollama and write the TEMPLATE by hand") from None
    for messages, gen in _check_conversations():
        try:
            expected = _render(tokenizer, template, messages, gen)
        except Exception:
            continue  # conversations the template itself refuses (e.g. no system role)
        if fmt.render(messages, gen) != expected:
            raise PreftuneError("--ollama: the chat template renders some conversations differently from a fixed per-turn format "
                                f"({len(messages)} messages), so a Go template would be wrong; export without --ollama and write the TEMPLATE by hand")
    return fmt


def _go(text: str) -> str:
    """Literal text inside a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: TurnFormat | None, bos_token: str | None = None) -> str:
    """The Go template for Ollama (module docstring).

    ``bos_token``: Ollama puts BOS before the prompt itself, so the template must not start with it.
    It is dropped from the header, the system header, or (when nothing comes before the first turn,
    as in templates that open every user turn with BOS) from the first user turn only.
    """
    if fmt is None:
        return "{{ .Prompt }}"  # no chat template: the model was trained on text as typed

    def drop_bos(text: str) -> str:
        return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text

    separate_system = fmt.system_header is not None and not fmt.system_in_first_user
    opening = _go(drop_bos(fmt.header))
    if separate_system:
        opening = f"{{{{ if .System }}}}{_go(drop_bos(fmt.system_header))}{{{{ .System }}}}{_go(fmt.system_suffix)}{{{{ else }}}}{opening}{{{{ end }}}}"
    user_prefix, track_first = _go(fmt.user_prefix), not fmt.header and drop_bos(fmt.user_prefix) != fmt.user_prefix
    if track_first:  # BOS opens every user turn: drop it from the first one only, unless a system block came first
        opening += "{{ $first := not .System }}" if separate_system else "{{ $first := true }}"
        user_prefix = f"{{{{ if $first }}}}{_go(drop_bos(fmt.user_prefix))}{{{{ else }}}}{user_prefix}{{{{ end }}}}{{{{ $first = false }}}}"
    folded = ""
    if fmt.system_in_first_user:  # Llama-2: the system prompt opens the first user turn
        opening += "{{ $system := .System }}"
        folded = f"{{{{ if $system }}}}{_go(fmt.system_header)}{{{{ $system }}}}{_go(fmt.system_suffix)}{{{{ $system = \"\" }}}}{{{{ end }}}}"
    generation = f"{{{{ if $last }}}}{_go(fmt.generation_prompt)}{{{{ end }}}}" if fmt.generation_prompt else ""
    return (
        opening
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + f'{{{{ if eq .Role "user" }}}}{user_prefix}{folded}{{{{ .Content }}}}{_go(fmt.user_suffix)}{generation}'
        + f'{{{{ else if eq .Role "assistant" }}}}{_go(fmt.assistant_prefix)}{{{{ .Content }}}}{{{{ if not $last }}}}{_go(fmt.assistant_suffix)}{{{{ end }}}}'
        + "{{ end }}{{ end }}"
    )


def _first_stop(tokenizer, text: str) -> str | None:
    """The first special token in ``text``, else ``text`` without surrounding whitespace (None if empty)."""
    special = sorted(set(getattr(tokenizer, "all_special_tokens", [])) | {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special},
                     key=len, reverse=True)
    found = [(text.find(tok), tok) for tok in special if tok and tok in text]
    if found:
        return min(found)[1]
    return text.strip() or None


def stop_tokens(fmt: TurnFormat | None, tokenizer) -> list[str]:
    stops = []
    candidates = [_first_stop(tokenizer, fmt.assistant_suffix), _first_stop(tokenizer, fmt.user_prefix)] if fmt else []
    for stop in candidates + [getattr(tokenizer, "eos_token", None)]:
        if stop and stop not in stops:
            stops.append(stop)
    return stops


def write_modelfile(path: Path, gguf_path: Path, fmt: TurnFormat | None, tokenizer) -> Path:
    """``FROM ./OUT.gguf``, ``TEMPLATE`` and ``PARAMETER stop`` lines (module docstring)."""
    bos = getattr(tokenizer, "bos_token", None) if getattr(tokenizer, "bos_token_id", None) is not None else None
    template = go_template(fmt, bos)
    if '"""' in template:
        raise PreftuneError('--ollama: the chat template contains """, which a Modelfile TEMPLATE cannot hold; write the Modelfile by hand')
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stop_tokens(fmt, tokenizer)]
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise PreftuneError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return path


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
