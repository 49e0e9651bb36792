"""``preftune chat MODEL_OR_RUN_DIR``: options, loading, then the chat loop of :mod:`preftune.chat`."""

from __future__ import annotations

import importlib
import sys

from .options import Positional, build_parser, parse_options

__all__ = ["build_chat_parser", "cmd_chat"]


def build_chat_parser():
    from ..config import ChatArguments, GenerationArguments, LoadArguments

    return build_parser(
        "preftune chat",
        "Chat with a model in the terminal: a run folder of `preftune train` (full model, LoRA adapter "
        "or ReFT), any save_pretrained folder, or a hub name. Type /help in the chat for its commands.",
        (ChatArguments, GenerationArguments, LoadArguments),
        (Positional("model", "MODEL_OR_RUN_DIR", "model folder, run folder or hub name"),),
    )


def cmd_chat(argv: list[str]) -> int:
    chat_args, generation, load, where = parse_options(build_chat_parser(), argv, "chat")
    from ..inference_model import quiet_transformers

    with quiet_transformers():
        return _chat(where.model, chat_args, generation, load)


def _chat(model_name: str, chat_args, generation, load) -> int:
    from ..chat import ChatSession, chat_loop, resolve_format
    from ..inference_model import load_pretrained

    if generation.seed is not None:
        from transformers import set_seed

        set_seed(generation.seed)
    loaded = load_pretrained(model_name, load.torch_dtype, load.trust_remote_code, load.chat_template_file)
    fmt, note = resolve_format(chat_args.format, loaded, model_name, load.chat_template_file)
    session = ChatSession(loaded, fmt, generation, system=chat_args.system_prompt)
    if fmt == "chat":
        session.check_template()
    what = loaded.kind + (f", {', '.join(loaded.notes)}" if loaded.notes else "")
    session.note(f"preftune chat: {model_name} ({what}); {fmt} format, {generation.describe()}, up to {generation.max_new_tokens} new tokens")
    if note:
        session.note(note)
    session.note("type a message and press Enter; /help lists commands, /exit or Ctrl-D quits\n")
    if sys.stdin.isatty():
        try:
            importlib.import_module("readline")  # gives input() line editing and history
        except ImportError:
            pass
    return chat_loop(session, model_name)
