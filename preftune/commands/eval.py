"""``preftune eval MODEL``: preference metrics on held-out pairs, optionally beside a second model.

Options come from the config dataclasses (:class:`~preftune.config.EvalArguments`, the data and
tokenization options training uses, generation and loading); data and tokenization flags left
out take the run's own values, so a run folder is evaluated exactly as it was trained. The maths
is :mod:`preftune.evaluation`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import PreftuneError
from .options import Positional, build_parser, given_flags, parse_options

__all__ = ["build_eval_parser", "cmd_eval"]


def build_eval_parser():
    from ..config import DataSourceArguments, EvalArguments, GenerationArguments, LoadArguments, TokenizeArguments

    parser = build_parser(
        "preftune eval",
        "Preference metrics of a model on held-out pairs (reward accuracy, margins, log-probs, log odds, NLL), "
        "optionally beside a second model. Writes eval.json (and generations.md/.jsonl with --generate). "
        "Data and tokenization options left out take the run's own values.",
        (EvalArguments, DataSourceArguments, TokenizeArguments, GenerationArguments, LoadArguments),
        (Positional("model", "MODEL", "run folder of `preftune train` (full model, LoRA adapter or ReFT), save_pretrained folder, or hub name"),),
    )
    parser.set_defaults(max_new_tokens=128)  # answers to show beside the metrics, not conversations
    return parser


def cmd_eval(argv: list[str]) -> int:
    options = parse_options(build_eval_parser(), argv, "eval")
    from ..inference_model import quiet_transformers

    with quiet_transformers():
        return _evaluate(*options, given=given_flags(argv))


def _output_dir(eval_args, model_name: str) -> Path:
    if eval_args.output_dir:
        out = Path(eval_args.output_dir).expanduser()
    else:
        out = Path(model_name).expanduser()
        if not out.is_dir():
            raise PreftuneError(f"{model_name!r} is not a local folder, so eval.json has no place to go; pass --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreftuneError(f"cannot create --output_dir {str(out)!r}: {e.strerror or e}") from None
    return out


def _load_compare(other: str, model_name: str, load, model_run, other_run):
    from ..inference_model import load_base, load_pretrained

    if other == "base" and not Path("base").exists():
        return load_base(model_name, load.torch_dtype, load.trust_remote_code, load.chat_template_file, run=model_run)
    return load_pretrained(other, load.torch_dtype, load.trust_remote_code, load.chat_template_file, run=other_run)


def _evaluate(eval_args, source_args, tokenize_args, generation, load, where, given: set[str]) -> int:
    from ..data.splits import tokenize_split
    from ..evaluation import REWARD_DEFINITION, format_table, generate_answers, load_eval_examples, preference_metrics, resolve_settings
    from ..evaluation import write_generations
    from ..hf_helpers import pad_token_id
    from ..inference_model import check_model_arg, load_pretrained
    from ..rundir import EVAL_FILE, GENERATIONS_JSONL, GENERATIONS_MD

    started = time.perf_counter()
    model_name = where.model
    run = check_model_arg(model_name)  # verified against its manifest: one line if damaged or unfinished
    compare_run = check_model_arg(eval_args.compare) if eval_args.compare and eval_args.compare != "base" else None
    run_config = run.run_config if run is not None else None
    settings = resolve_settings(tokenize_args, eval_args, given, run_config)
    examples, data_label = load_eval_examples(source_args, given, run_config, model_name)
    if eval_args.max_samples is not None:
        examples = examples[: eval_args.max_samples]

    models = [load_pretrained(model_name, load.torch_dtype, load.trust_remote_code, load.chat_template_file, run=run)]
    if eval_args.compare:
        models.append(_load_compare(eval_args.compare, model_name, load, run, compare_run))
    out_dir = _output_dir(eval_args, model_name)  # once the models load: no folder is left behind by a name that fails
    results, answers = [], []
    for loaded in models:
        pairs, report = tokenize_split(loaded.tokenizer, examples, settings.tokenize, loaded.label)
        metrics = preference_metrics(loaded.model, pairs, pad_token_id(loaded.tokenizer), settings.beta, settings.batch_size,
                                     settings.nll_on_prompt, loaded.hooks.batch_context)
        results.append({"name": loaded.label, "kind": loaded.kind, "notes": loaded.notes, "pairs": len(pairs),
                        "tokenization": report.summary(), "metrics": metrics})
        if eval_args.generate:
            answers.append((loaded.label, generate_answers(loaded, pairs, eval_args.generate, generation)))

    print(f"preftune eval: {len(examples)} pairs from {data_label}; beta {settings.beta:g}, "
          f"max_length {settings.tokenize.max_length}, max_prompt_length {settings.tokenize.max_prompt_length}\n")
    print(format_table(results))
    record = {
        "dataset": data_label, "examples": len(examples), "settings": settings.as_dict(), "reward_definition": REWARD_DEFINITION,
        "models": results, "seconds": round(time.perf_counter() - started, 2),
    }
    written = [out_dir / EVAL_FILE]
    if eval_args.generate:
        rows = write_generations(out_dir, examples, answers, eval_args.generate)
        record["generations"] = {"count": len(rows), "jsonl": GENERATIONS_JSONL, "markdown": GENERATIONS_MD}
        written += [out_dir / GENERATIONS_MD, out_dir / GENERATIONS_JSONL]
    (out_dir / EVAL_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0
