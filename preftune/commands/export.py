"""``preftune export RUN_OR_MODEL --gguf OUT.gguf [--quant q8_0] [--ollama]``: a model as one GGUF
file for llama.cpp, Ollama and LM Studio (:func:`preftune.export.exporter.export_gguf`)."""

from __future__ import annotations

from .options import Positional, build_parser, parse_options

__all__ = ["build_export_parser", "cmd_export"]


def build_export_parser():
    from ..config import ExportArguments, LoadArguments

    return build_parser(
        "preftune export",
        "Write a trained model as one GGUF file for llama.cpp, Ollama and LM Studio: a run folder of `preftune train` "
        "(full model, or LoRA adapter merged on the fly) or any save_pretrained folder of the Llama, Mistral or Qwen2 "
        "families. Weights, tokenizer and chat template go into the file; --ollama also writes a Modelfile.",
        (ExportArguments, LoadArguments),
        (Positional("model", "RUN_OR_MODEL", "run folder of `preftune train`, save_pretrained folder, or hub name"),),
    )


def cmd_export(argv: list[str]) -> int:
    from ..export.exporter import export_gguf

    export, load, where = parse_options(build_export_parser(), argv, "export")
    result = export_gguf(where.model, export.gguf, export.quant, export.ollama, export.overwrite, load.chat_template_file,
                         load.torch_dtype, load.trust_remote_code)
    size = result.gguf.stat().st_size / 2**20
    template = "with its chat template" if result.chat_template else "without a chat template (prompts are sent as typed)"
    print(f"wrote {result.gguf} ({size:.1f} MiB, {result.family}, {result.quant}, {result.tokens} tokens, {template})")
    for note in result.notes:
        print(f"note: {note}")
    if result.modelfile is not None:
        print(f"wrote {result.modelfile}; load it into Ollama with: ollama create NAME -f {result.modelfile}")
    else:
        print(f"run it with: llama-cli -m {result.gguf}   (or import the file into LM Studio)")
    return 0
