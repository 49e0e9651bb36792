"""Loading what a run saved, for inference (``preftune chat``, ``eval``, ``merge``, ``report``).
(The model a training run starts from is :mod:`preftune.training_model`.)

A model argument may be:

* a folder with ``config.json``: a full model (``preftune train`` without ``--use_peft``, or
  any ``save_pretrained`` folder);
* a folder with ``adapter_config.json``: a LoRA/DoRA adapter; its base model is loaded and the
  adapter merged into it (the demo's base, built in code, is rebuilt from the run's seed);
* a folder with ``reft_config.json``: ReFT interventions, loaded on their base model through
  :mod:`preftune.reft` when that module is installed;
* a hub name (fails in one line when the hub cannot be reached).

:func:`load_base` loads the model a run *started from* (``--compare base``): the base of an
adapter or ReFT folder, the ``model_name_or_path`` of a full-model run, or, for the built-in
demo, the randomly initialised demo model rebuilt with the run's seed (bit for bit the weights
training started from). The run's own tokenizer is used for the base, so both models see the
same tokens and chat template.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PreftuneError, describe_exception
from .model_hooks import NO_HOOKS, ModelHooks
from .rundir import (ADAPTER_CONFIG_FILE, MERGE_RECORD_FILE, REFT_CONFIG_FILE, RUN_CONFIG_FILE, TOKENIZER_FILES, RunFolder,
                     is_checkpoint_folder, open_run, read_json, read_run_config)

__all__ = ["LoadedModel", "load_pretrained", "load_base", "check_model_arg", "load_errors_in_one_line", "encode_prompt", "quiet_transformers"]



@dataclass
class LoadedModel:
    """A model ready for inference, with what the commands need to describe it."""

    model: object
    tokenizer: object
    label: str  # how tables and files name it (the argument as given, or "base (...)")
    kind: str  # "full model", "LoRA adapter", "ReFT", "built-in demo model"
    folder: Path | None  # local folder it was loaded from (None: hub or built in code)
    run_config: dict | None = None  # run_config.json of the run, when there is one
    hooks: ModelHooks = NO_HOOKS  # ReFT: batch context for scoring, prefill-only generation
    notes: list[str] = field(default_factory=list)

    @property
    def is_demo(self) -> bool:
        return bool(self.run_config and self.run_config.get("demo"))

    def training_record(self):
        """How the examples the model was trained on were rendered
        (:class:`preftune.data.tokenize.PromptRendering`: plain text or a chat template), and the
        file that says so: ``run_config.json`` of the run (or of the run a ``checkpoint-N`` folder
        belongs to), or ``preftune_merge.json`` of a merged adapter. ``(None, "")`` without such a
        record (a run from before the record, a hub model). ``preftune chat --format auto`` and
        ``preftune export --ollama`` prompt the model the way this says it was trained."""
        from .data.tokenize import PromptRendering

        record = PromptRendering.from_run_config(self.run_config)
        if record is not None:
            return record, RUN_CONFIG_FILE
        if self.folder is None:
            return None, ""
        if is_checkpoint_folder(self.folder) and (record := PromptRendering.from_run_config(read_run_config(self.folder.parent))) is not None:
            return record, f"{RUN_CONFIG_FILE} of its run"
        if (record := PromptRendering.from_run_config(read_json(self.folder / MERGE_RECORD_FILE))) is not None:
            return record, MERGE_RECORD_FILE
        return None, ""

    def generate_ids(self, input_ids, **kwargs):
        """``model.generate`` (or the model's own generation hook, e.g. ReFT's) on ``(1, T)`` prompt ids."""
        return (self.hooks.generate or self.model.generate)(input_ids, **kwargs)


@contextlib.contextmanager
def quiet_transformers():
    """No weight-loading progress bars or advisory warnings while an interactive command runs.

    A context manager that restores transformers' verbosity, its progress bars and the warning
    filters afterwards (the commands also run in-process, e.g. from tests).
    """
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        # deprecation notices from transformers/peft internals are for developers, not chat users
        warnings.filterwarnings("ignore", category=FutureWarning)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def _model_args(name: str | None, torch_dtype: str, trust_remote_code: bool):
    from .config import ModelArguments

    return ModelArguments(model_name_or_path=name, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)


def load_run_tokenizer(primary: Path | str, fallback: str | None, trust_remote_code: bool, chat_template_file: str | None = None):
    """The tokenizer saved with the run; else the base model's."""
    from .training_model import load_tokenizer

    if isinstance(primary, Path) and not any((primary / f).exists() for f in TOKENIZER_FILES):
        if fallback is None:
            raise PreftuneError(f"{str(primary)!r} has no tokenizer files and names no base model to take them from")
        primary = fallback
    return load_tokenizer(str(primary), trust_remote_code, chat_template_file)


def demo_init_model(tokenizer, run_config: dict | None):
    """The built-in demo's starting model, rebuilt bit for bit from the run's seed."""
    from .demo import build_demo_model

    seed = int(((run_config or {}).get("training") or {}).get("seed", 42))
    return build_demo_model(len(tokenizer), seed=seed)


def _load_full(name: str, torch_dtype: str, trust_remote_code: bool):
    from .training_model import choose_device, load_model

    choice = choose_device(torch_dtype)
    return load_model(name, _model_args(name, torch_dtype, trust_remote_code), choice)


def _base_name(folder: Path, kind: str, run_config: dict | None) -> str | None:
    """The base model of an adapter/ReFT folder (None for the built-in demo)."""
    if run_config and run_config.get("demo"):
        return None
    if run_config and (run_config.get("model") or {}).get("model_name_or_path"):
        return run_config["model"]["model_name_or_path"]
    cfg = read_json(folder / (ADAPTER_CONFIG_FILE if kind == "LoRA adapter" else REFT_CONFIG_FILE)) or {}
    for key in ("base_model_name_or_path", "base_model", "model_name_or_path"):
        if cfg.get(key):
            return str(cfg[key])
    return None


def _base_model(folder: Path, kind: str, tokenizer, run_config, torch_dtype: str, trust_remote_code: bool):
    base = _base_name(folder, kind, run_config)
    if base is None:
        if run_config and run_config.get("demo"):
            return demo_init_model(tokenizer, run_config), "built-in demo model"
        raise PreftuneError(f"{str(folder)!r}: cannot tell which base model the {kind} belongs to (no base_model_name_or_path in {ADAPTER_CONFIG_FILE if kind == 'LoRA adapter' else REFT_CONFIG_FILE})")
    return _load_full(base, torch_dtype, trust_remote_code), base


def _finish(model):
    from .training_model import choose_device

    model.to(choose_device().device)
    model.eval()
    return model


def check_model_arg(name: str) -> RunFolder | None:
    """Fail early, in one line, on a model argument that cannot be loaded: a local folder is opened
    and verified against its manifest (:func:`preftune.rundir.open_run`); None for a hub name."""
    path = Path(name).expanduser()
    if path.is_file():
        raise PreftuneError(f"{name!r} is a file; pass the folder that holds the model")
    if not path.exists():
        from .hub import looks_like_local_path

        if looks_like_local_path(name):
            raise PreftuneError(f"model folder {name!r} not found")
        return None
    return open_run(path)


@contextlib.contextmanager
def load_errors_in_one_line(folder: Path, what: str):
    """A local folder's files that fail to load (a folder without a manifest, e.g. a plain
    save_pretrained folder, is not verified beforehand) end in one line, not a traceback."""
    try:
        yield
    except PreftuneError:
        raise
    except Exception as e:
        raise PreftuneError(f"cannot load the {what} in {str(folder)!r} ({describe_exception(e)}); "
                            f"check it with `preftune verify {folder}`") from e


def load_pretrained(
    name: str,
    torch_dtype: str = "auto",
    trust_remote_code: bool = False,
    chat_template_file: str | None = None,
    label: str | None = None,
    run: RunFolder | None = None,
) -> LoadedModel:
    """Load ``name`` (run folder, adapter folder, ReFT folder or hub name) for inference.

    ``run``: the folder as already opened by :func:`check_model_arg` (saves hashing it twice).
    """
    run = run or check_model_arg(name)
    if run is None:
        tokenizer = load_run_tokenizer(name, None, trust_remote_code, chat_template_file)
        model = _load_full(name, torch_dtype, trust_remote_code)
        return LoadedModel(_finish(model), tokenizer, label or name, "full model", None)
    with load_errors_in_one_line(run.path, run.kind):
        return _load_local(run, name, torch_dtype, trust_remote_code, chat_template_file, label)


def _load_local(run: RunFolder, name: str, torch_dtype: str, trust_remote_code: bool, chat_template_file: str | None, label: str | None):
    path, kind, run_config = run.path, run.kind, run.run_config
    base = _base_name(path, kind, run_config) if kind != "full model" else None
    tokenizer = load_run_tokenizer(path, base, trust_remote_code, chat_template_file)
    if kind == "full model":
        model = _load_full(str(path), torch_dtype, trust_remote_code)
        return LoadedModel(_finish(model), tokenizer, label or name, kind, path, run_config)
    base_model, base_label = _base_model(path, kind, tokenizer, run_config, torch_dtype, trust_remote_code)
    if kind == "LoRA adapter":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base_model, str(path)).merge_and_unload()
        except (ValueError, RuntimeError, KeyError) as e:
            raise PreftuneError(f"cannot load the LoRA adapter in {name!r} on {base_label!r}: {str(e).strip().splitlines()[0]}") from None
        return LoadedModel(_finish(model), tokenizer, label or name, kind, path, run_config, notes=[f"base model: {base_label}"])
    return _load_reft(path, base_model, base_label, tokenizer, run_config, label or name)


def _load_reft(path: Path, base_model, base_label: str, tokenizer, run_config, label: str) -> LoadedModel:
    from .reft import load_reft, reft_hooks

    _finish(base_model)
    model = _finish(load_reft(str(path), base_model))
    # plain model.generate would skip the interventions: they act on the prompt through the hooks
    return LoadedModel(model, tokenizer, label, "ReFT", path, run_config, hooks=reft_hooks(model), notes=[f"base model: {base_label}"])


def load_base(name: str, torch_dtype: str = "auto", trust_remote_code: bool = False, chat_template_file: str | None = None,
              run: RunFolder | None = None) -> LoadedModel:
    """The model the run in ``name`` started from, with the run's tokenizer (``--compare base``)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise PreftuneError(f"--compare base needs MODEL to be a local run folder; {name!r} is not a folder")
    run = run or open_run(path)
    kind, run_config = run.kind, run.run_config
    if kind == "full model":
        if run_config is None:
            raise PreftuneError(f"--compare base: {name!r} has no {RUN_CONFIG_FILE}, so its base model is unknown; pass --compare BASE_MODEL")
        base = None if run_config.get("demo") else (run_config.get("model") or {}).get("model_name_or_path")
    else:
        base = _base_name(path, kind, run_config)
    with load_errors_in_one_line(path, "tokenizer"):
        tokenizer = load_run_tokenizer(path, base, trust_remote_code, chat_template_file)
    if base is None:
        if not (run_config and run_config.get("demo")):
            raise PreftuneError(f"--compare base: cannot tell the base model of {name!r}; pass --compare BASE_MODEL")
        model = demo_init_model(tokenizer, run_config)
        return LoadedModel(_finish(model), tokenizer, "base (demo init)", "built-in demo model", None, run_config)
    model = _load_full(base, torch_dtype, trust_remote_code)
    return LoadedModel(_finish(model), tokenizer, f"base ({base})", "full model", None, run_config)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS exactly as training adds it.

    Same rule as :func:`preftune.data.tokenize.tokenize_examples`: encode without special
    tokens, then prepend BOS when the tokenizer adds one to plain text and the text does not
    already start with it (chat templates often write BOS themselves).
    """
    from .data.tokenize import prompt_bos_id

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = prompt_bos_id(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids
