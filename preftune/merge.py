"""``preftune merge ADAPTER_DIR --output_dir OUT``: fold a LoRA/DoRA adapter into its base model.

The base model is the one named in the adapter's ``adapter_config.json``
(``base_model_name_or_path``), or ``--base_model PATH``; for an adapter trained on the built-in
demo, the demo model is rebuilt from the run's seed. The base is loaded unquantized (an adapter
trained with QLoRA merges into the full-precision base, as the QLoRA authors do), the adapter is
merged with ``merge_and_unload`` (``W + scale * B A``; DoRA also rescales by its magnitude
vector), and the result is written as safetensors plus the tokenizer, loadable by plain
``AutoModelForCausalLM.from_pretrained(OUT)``.

Safety: an existing non-empty ``OUT`` is never replaced without ``--overwrite``; everything is
written to a temporary folder beside ``OUT`` and renamed into place only when complete.
ReFT interventions are not weights and cannot be merged (load them with
:func:`preftune.reft.load_reft`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PreftuneError, describe_exception
from .hf_helpers import TORCH_DTYPES, torch_dtype_of
from .data.tokenize import PromptRendering
from .rundir import ADAPTER_CONFIG_FILE, MERGE_RECORD_FILE, RunFolder, open_run

__all__ = ["merge_adapter"]



def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PreftuneError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise PreftuneError(f"{str(path)!r} is not a JSON object")
    return data


def _check_adapter_dir(adapter_dir: Path) -> tuple[dict, RunFolder]:
    if not adapter_dir.is_dir():
        raise PreftuneError(f"adapter folder {str(adapter_dir)!r} not found")
    run = open_run(adapter_dir)  # verified against its manifest: one line if damaged, unfinished or foreign
    if run.kind != "LoRA adapter":
        if run.kind == "ReFT":
            raise PreftuneError(
                f"{str(adapter_dir)!r} holds ReFT interventions, which act on activations at prompt positions and cannot be "
                "merged into weights; load them with preftune.reft.load_reft"
            )
        raise PreftuneError(f"{str(adapter_dir)!r} already holds a full model (no {ADAPTER_CONFIG_FILE}); there is nothing to merge")
    return _read_json(adapter_dir / ADAPTER_CONFIG_FILE), run


def _check_output(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PreftuneError(f"--output_dir {str(out)!r} is a file; choose a folder")
    resolved, adapter = out.resolve(), adapter_dir.resolve()
    if resolved == adapter or adapter in resolved.parents or resolved in adapter.parents:
        raise PreftuneError(f"--output_dir {str(out)!r} overlaps the adapter folder; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PreftuneError(f"--output_dir {str(out)!r} exists and is not empty; pass --overwrite to replace it, or choose another folder")


def _load_base(name: str, torch_dtype: str, trust_remote_code: bool):
    """The base model, unquantized, in ``torch_dtype`` (auto: the dtype its checkpoint was saved in)."""

    from .training_model import causal_lm_from_pretrained

    dtype = torch_dtype_of(torch_dtype) or "auto"
    return causal_lm_from_pretrained(name, kind="base model", dtype=dtype, trust_remote_code=trust_remote_code)


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base_model: str | None = None, overwrite: bool = False,
                  torch_dtype: str = "auto", trust_remote_code: bool = False, chat_template_file: str | None = None) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base model and save the result to ``output_dir``.

    The run's tokenizer is saved with it (``chat_template_file`` replaces its chat template).
    """
    adapter_dir, out = Path(adapter_dir).expanduser(), Path(output_dir).expanduser()
    if torch_dtype not in TORCH_DTYPES:
        raise PreftuneError(f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, got {torch_dtype!r}")
    adapter_config, run = _check_adapter_dir(adapter_dir)
    _check_output(out, adapter_dir, overwrite)
    base_name = base_model or adapter_config.get("base_model_name_or_path") or None
    from .inference_model import demo_init_model, load_errors_in_one_line, load_run_tokenizer

    with load_errors_in_one_line(adapter_dir, "tokenizer"):
        tokenizer = load_run_tokenizer(adapter_dir, base_name, trust_remote_code, chat_template_file)
    if base_name is not None:
        base = _load_base(base_name, torch_dtype, trust_remote_code)
    else:
        run_config = run.run_config
        base = demo_init_model(tokenizer, run_config) if run_config and run_config.get("demo") else None
        if base is None:
            raise PreftuneError(f"{str(adapter_dir / ADAPTER_CONFIG_FILE)!r} names no base model (base_model_name_or_path); pass --base_model PATH")
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except Exception as e:  # a shape mismatch, or (without a manifest to check first) a damaged adapter file
        raise PreftuneError(f"cannot apply the adapter in {str(adapter_dir)!r} to {base_name or 'the demo model'!r} ({describe_exception(e)})") from e
    merged.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT should look like any folder
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        record = {
            "adapter": str(adapter_dir.resolve()), "base_model_name_or_path": base_name or "built-in demo model",
            "use_dora": bool(adapter_config.get("use_dora")), "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
        }
        rendering = PromptRendering.from_run_config(run.run_config)
        if rendering is not None:  # plain text or a chat template: what `preftune chat --format auto` follows
            record[PromptRendering.RECORD_KEY] = rendering.to_record()
        (tmp / MERGE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # empty, or --overwrite given (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
