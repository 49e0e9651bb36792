"""What ``preftune export RUN_OR_MODEL --gguf OUT.gguf [--quant q8_0] [--ollama]`` does.

Loads what the run saved the way ``preftune chat`` does (:func:`preftune.inference_model.load_pretrained`:
a full model as is, a LoRA/DoRA adapter merged into its base on the fly), checks that llama.cpp can
run it (family: :mod:`.architectures`, tokenizer: :mod:`.vocab`) and writes one GGUF file
(:mod:`.gguf_file`). ``--ollama`` also writes ``OUT.Modelfile`` (:mod:`.ollama`). ReFT runs are
refused: their interventions act on activations at chosen prompt positions and are not weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PreftuneError
from ..hf_helpers import TORCH_DTYPES
from .gguf_file import QUANT_TYPES

__all__ = ["export_gguf", "ExportResult", "modelfile_path"]


@dataclass
class ExportResult:
    gguf: Path
    family: str
    quant: str
    tokens: int
    chat_template: bool
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")


def _check_output(out: Path, ollama: bool, overwrite: bool) -> None:
    if out.suffix.lower() != ".gguf":
        raise PreftuneError(f"--gguf {str(out)!r} should end in .gguf (llama.cpp, Ollama and LM Studio look for that name)")
    if out.is_dir():
        raise PreftuneError(f"--gguf {str(out)!r} is a folder; give a file name such as {str(out / 'model.gguf')!r}")
    targets = [out] + ([modelfile_path(out)] if ollama else [])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise PreftuneError(f"{existing[0]!r} exists; pass --overwrite to replace it, or choose another --gguf name")


def _check_kind(name: str):
    """Refuse what cannot become weights before anything heavy is loaded; the local folder, opened and
    verified against its manifest (:func:`preftune.rundir.open_run`: one line if damaged or
    unfinished), or None for a hub name."""
    from ..inference_model import check_model_arg

    run = check_model_arg(name)
    if run is None:
        return None
    path = run.path
    if run.kind == "ReFT":
        raise PreftuneError(f"{name!r} holds ReFT interventions, which act on activations at chosen prompt positions and are not weights, "
                            "so no GGUF file can carry them; train with --use_peft (or a full fine-tune) to export")
    if run.kind == "full model":
        from transformers import AutoConfig

        from .architectures import family_for

        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise PreftuneError(f"cannot read {str(path / 'config.json')!r}: {str(e).strip().splitlines()[0]}") from None
        family_for(config)  # an unsupported family fails before the weights are read
    return run


def export_gguf(model: str, out: str | Path, quant: str = "q8_0", ollama: bool = False, overwrite: bool = False,
                chat_template_file: str | None = None, torch_dtype: str = "auto", trust_remote_code: bool = False) -> ExportResult:
    """Write ``model`` (run folder, model folder or hub name) to the GGUF file ``out``; see the module docstring."""
    from ..inference_model import load_pretrained, quiet_transformers
    from .architectures import family_for
    from .gguf_file import write_gguf
    from .vocab import gguf_vocab

    out = Path(out).expanduser()
    if importlib.util.find_spec("gguf") is None:
        raise PreftuneError("GGUF export needs the gguf package (llama.cpp's format library): pip install 'preftune[gguf]'")
    if quant not in QUANT_TYPES:
        raise PreftuneError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if torch_dtype not in TORCH_DTYPES:
        raise PreftuneError(f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {torch_dtype!r}")
    _check_output(out, ollama, overwrite)
    run = _check_kind(model)
    with quiet_transformers():
        loaded = load_pretrained(model, torch_dtype, trust_remote_code, chat_template_file, run=run)
    family = family_for(loaded.model.config)
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(loaded.tokenizer, rows)
    template = getattr(loaded.tokenizer, "chat_template", None) or None
    turn_format, notes = None, []
    if ollama:
        from .ollama import turn_format_of

        if template and not chat_template_file and _trained_on_plain_text(loaded):
            # chat prompts such a model as typed (preftune chat --format auto); so does the Modelfile
            notes.append("the run records that the model was trained on plain text, not conversations, so the Modelfile sends prompts "
                         "as typed (TEMPLATE {{ .Prompt }}); the GGUF keeps the tokenizer's chat template. Pass --chat_template_file "
                         "to prompt it as a conversation")
        else:
            turn_format = turn_format_of(loaded.tokenizer, template)  # fails before the big file is written
    name = Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model
    notes += list(vocab.notes) + _family_notes(loaded.model.config)
    notes += write_gguf(out, loaded.model, family, vocab, quant, name, template)
    result = ExportResult(out, family.name, quant, len(vocab.tokens), bool(template), notes=notes)
    if ollama:
        from .ollama import write_modelfile

        result.modelfile = write_modelfile(modelfile_path(out), out, turn_format, loaded.tokenizer)
    return result


def _trained_on_plain_text(loaded) -> bool:
    """The run's record says most examples were plain text, not chat-templated (``LoadedModel.training_record``)."""
    record, _ = loaded.training_record()
    return record is not None and record.plain_text > record.templated


def _family_notes(config) -> list[str]:
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if window and uses_window and window < getattr(config, "max_position_embeddings", 0):
        return [f"the model attends within a sliding window of {window} tokens; llama.cpp attends to the whole context "
                "(identical for prompts shorter than the window)"]
    return []
