"""``preftune report RUN_DIR``: one self-contained HTML page describing a run.

The page (``RUN_DIR/report.html``) needs no server and no network: the training curves are
re-rendered from ``metrics.jsonl`` (:func:`preftune.outputs.plot_training_curves`) and embedded
as a base64 PNG, and the CSS is inline; there is no script. It shows what the run folder holds:

* ``run_config.json``: method, base model, data and hyper-parameters (and the full config);
* ``run_complete.json``: the final metrics (a run without it is marked unfinished and shows
  its last logged metrics instead);
* ``samples.jsonl`` from ``--eval_generate``: each prompt's greedy answer step by step, beside the curves;
* ``eval.json`` and ``generations.jsonl`` from ``preftune eval``, when present.

Every piece of text from those files goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path

from .errors import PreftuneError
from .rundir import EVAL_FILE, GENERATIONS_JSONL, METRICS_FILE, REPORT_FILE, RUN_COMPLETE_FILE, RUN_CONFIG_FILE, open_run

__all__ = ["write_report", "render_report"]

# Hyper-parameters shown in the summary table, by run_config.json section (others: "full configuration").
# The method's own hyper-parameters come from its declaration (preftune.methods), after "method".
_SHOWN = {
    "training": ["method", "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                 "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay", "optim", "seed",
                 "batch_layout", "nll_on_prompt"],
    "model": ["use_peft", "lora_r", "lora_alpha", "use_dora", "load_in_4bit", "reft_layers", "reft_rank", "reft_positions", "torch_dtype"],
    "data": ["max_length", "max_prompt_length", "truncation_mode", "chat_template", "eval_split", "eval_fraction", "max_train_samples"],
}
# Shown only when they differ from these defaults (the rest always shown when set).
_QUIET_DEFAULTS = {"use_peft": False, "use_dora": False, "load_in_4bit": False, "reft_rank": 4, "reft_positions": "f1+l1", "nll_on_prompt": False}
_PEFT_ONLY = {"lora_r", "lora_alpha", "use_dora"}
_REFT_ONLY = {"reft_rank", "reft_positions"}
# Which way is better, for the colour of the eval difference column (metrics absent: no colour).
_BETTER = {"rewards/accuracies": 1, "rewards/margins": 1, "log_odds_chosen": 1, "log_odds_ratio": 1, "logps/chosen": 1,
           "logps_sum/chosen": 1, "nll_loss": -1, "loss": -1}
# Headline numbers: per card, (metric, its title) tried in order, the first present wins. Each title
# says what the number is: held-out ("eval"), the training batches of the last logging step (a run
# with no eval split shows these), the average over training, or wall-clock time.
_LAST_LOG = "training, last log"
_CARDS = [
    [("eval_rewards/accuracies", "eval reward accuracy"), ("rewards/accuracies", f"reward accuracy ({_LAST_LOG})")],
    [("eval_rewards/margins", "eval reward margin"), ("rewards/margins", f"reward margin ({_LAST_LOG})")],
    [("loss", f"loss ({_LAST_LOG})"), ("train_loss", "loss (training average)")],
    [("eval_nll_loss", "eval chosen NLL"), ("nll_loss", f"chosen NLL ({_LAST_LOG})")],
    [("eval_log_odds_chosen", "eval log odds (chosen)"), ("log_odds_chosen", f"log odds (chosen) ({_LAST_LOG})")],
    [("total_train_runtime", "training time, all segments (resumed run)"), ("train_runtime", "training time")],
]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:1.6rem;word-break:break-all}h2{font-size:1.2rem;margin:0 0 12px}
.sub{color:#5a6275;margin:0}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:16px 20px;margin:16px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #e1e4ea;border-radius:6px;padding:8px 14px;min-width:140px}
.card .v{font-size:1.35rem;font-weight:600}.card .k{color:#5a6275;font-size:.85rem}
table{border-collapse:collapse;font-size:.9rem}th,td{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
th{background:#f2f4f7}
.pos{color:#17803d}.neg{color:#b42318}
img.curves{max-width:100%;height:auto;border:1px solid #eceef2}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f7f9;border-radius:4px;padding:6px 8px;margin:4px 0;font-size:.85rem}
.gen{border-top:1px solid #eceef2;padding:10px 0}.gen h3{font-size:.95rem;margin:0 0 6px}
.label{font-size:.8rem;color:#5a6275;margin-top:6px}
table.samples{width:100%}table.samples pre{margin:0}tr.same pre{color:#8a91a1}
.warn{background:#fff4e5;border-color:#f5c27a}
footer{color:#8a91a1;font-size:.8rem;text-align:center;padding:12px}
"""


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreftuneError(f"{str(path)!r} is not valid JSON ({e}); delete it or re-create it") from None


def _read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if len(rows) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _metric_doc(key: str) -> str:
    from .objective import METRIC_DOCS

    return METRIC_DOCS.get(key.removeprefix("eval_"), "")


def _cell(key: str, v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return '<td class="num"></td>'
    return f'<td class="num" data-metric="{_e(key)}">{_e(_num(v))}</td>'


def _final_section(final: dict, title: str) -> str:
    """Preference metrics as rows of (training, eval) values; everything else in a second table."""
    from .objective import METRIC_DOCS

    numeric = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names: list[str] = []
    for k in numeric:
        base = k.removeprefix("eval_")
        if base in METRIC_DOCS and base not in ("learning_rate", "grad_norm", "tokens_per_second") and base not in names:
            names.append(base)
    used = {n for n in names} | {f"eval_{n}" for n in names}
    has_eval = any(f"eval_{n}" in numeric for n in names)  # a run with no eval split: no eval column
    rows = []
    for n in names:
        doc = METRIC_DOCS.get(n, "")
        title_attr = f' title="{_e(doc)}"' if doc else ""
        evals = _cell("eval_" + n, numeric.get("eval_" + n)) if has_eval else ""
        rows.append(f"<tr><td{title_attr}>{_e(n)}</td>{_cell(n, numeric.get(n))}{evals}</tr>")
    other = [f"<tr><td>{_e(k)}</td>{_cell(k, v)}</tr>" for k, v in numeric.items() if k not in used]
    parts = [f'<section id="final-metrics"><h2>{_e(title)}</h2><div class="cards">']
    if rows:
        head = f"<th>metric</th><th>{_e(_LAST_LOG)}</th>" + ("<th>eval</th>" if has_eval else "")
        parts.append(f'<table id="final-metrics-table"><tr>{head}</tr>' + "".join(rows) + "</table>")
    if other:
        parts.append('<table id="run-metrics-table"><tr><th>run</th><th>value</th></tr>' + "".join(other) + "</table>")
    return "".join(parts) + "</div></section>"


def _curves_section(run_dir: Path, rerender: bool) -> str:
    from .outputs import CURVES_FILE, plot_training_curves

    png = None
    if rerender:
        png = plot_training_curves(run_dir)
    if png is None and (run_dir / CURVES_FILE).is_file():
        png = run_dir / CURVES_FILE
    if png is None:
        return '<section id="curves"><h2>Training curves</h2><p>No metrics were logged (metrics.jsonl is empty or missing).</p></section>'
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (
        '<section id="curves"><h2>Training curves</h2>'
        f'<img class="curves" id="training-curves" alt="training curves: loss, NLL, reward margin and accuracy, log odds, log-probs" '
        f'src="data:image/png;base64,{data}"></section>'
    )


def _config_section(config: dict | None) -> str:
    if not config:
        return '<section id="config"><h2>Configuration</h2><p>No run_config.json in this folder.</p></section>'
    rows = []
    model = config.get("model") or {}
    shown = dict(_SHOWN)
    shown["training"] = ["method", *_method_hyperparameters((config.get("training") or {}).get("method")), *_SHOWN["training"][1:]]
    for section, keys in shown.items():
        values = config.get(section) or {}
        for k in keys:
            if k not in values or values[k] is None:
                continue
            v = values[k]
            if k in _QUIET_DEFAULTS and v == _QUIET_DEFAULTS[k]:
                continue
            if k in _PEFT_ONLY and not model.get("use_peft"):
                continue
            if k in _REFT_ONLY and not model.get("reft_layers"):
                continue
            rows.append(f"<tr><td>{_e(k)}</td><td class=\"num\">{_e(_num(v))}</td></tr>")
    full = json.dumps(config, indent=2, ensure_ascii=False)
    return (
        '<section id="config"><h2>Configuration</h2>'
        f'<table id="hyperparameters"><tr><th>setting</th><th>value</th></tr>{"".join(rows)}</table>'
        f"<details><summary>full configuration (run_config.json)</summary><pre>{_e(full)}</pre></details></section>"
    )


def _method_hyperparameters(name) -> tuple[str, ...]:
    """The hyper-parameters ``name``'s declaration lists (none for an unknown or missing method)."""
    from .methods import find_method

    spec = find_method(name)
    return spec.hyperparameters if spec is not None else ()


def _eval_section(ev: dict | None) -> str:
    if not ev or not isinstance(ev.get("models"), list) or not ev["models"]:
        return ""
    models = [m for m in ev["models"] if isinstance(m, dict)]
    keys: list[str] = []
    for m in models:
        for k in (m.get("metrics") or {}):
            if k not in keys:
                keys.append(k)
    head = "".join(f"<th>{_e(m.get('name', '?'))}</th>" for m in models) + ("<th>difference</th>" if len(models) == 2 else "")
    rows = []
    for k in keys:
        vals = [(m.get("metrics") or {}).get(k) for m in models]
        cells = "".join(f'<td class="num">{_e(_num(v)) if v is not None else ""}</td>' for v in vals)
        if len(models) == 2:
            if all(isinstance(v, (int, float)) for v in vals):
                d = vals[0] - vals[1]
                better = d * _BETTER.get(k, 0)
                cls = "pos" if better > 0 else "neg" if better < 0 else ""
                cells += f'<td class="num {cls}">{_e(f"{d:+.4g}")}</td>'
            else:
                cells += "<td></td>"
        doc = _metric_doc(k)
        title = f' title="{_e(doc)}"' if doc else ""
        rows.append(f'<tr data-metric="{_e(k)}"><td{title}>{_e(k)}</td>{cells}</tr>')
    pairs = "".join(f'<td class="num">{_e(m.get("pairs", ""))}</td>' for m in models) + ("<td></td>" if len(models) == 2 else "")
    rows.append(f"<tr><td>pairs</td>{pairs}</tr>")
    settings = ev.get("settings") or {}
    about = ", ".join(f"{k} {_num(v)}" for k, v in settings.items() if k in ("beta", "max_length", "max_prompt_length"))
    return (
        '<section id="eval"><h2>Evaluation</h2>'
        f'<p class="sub">{_e(ev.get("examples", "?"))} pairs from {_e(ev.get("dataset", "?"))}; {_e(about)}. '
        f'{_e(ev.get("reward_definition", ""))}.</p>'
        f'<table id="eval-metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table></section>'
    )


def _generations_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    parts = []
    for i, row in enumerate(rows, start=1):
        answers = row.get("answers") or []
        body = [f'<div class="gen"><h3>{i}. {_e(row.get("where", ""))}</h3>', '<div class="label">prompt</div>', f"<pre>{_e(row.get('prompt', ''))}</pre>"]
        for a in answers:
            if isinstance(a, dict):
                body += [f'<div class="label">{_e(a.get("model", "model"))}</div>', f'<pre class="answer">{_e(a.get("answer", ""))}</pre>']
        if "chosen" in row:
            body += ['<div class="label">chosen (reference)</div>', f"<pre>{_e(row['chosen'])}</pre>"]
        if "rejected" in row:
            body += ['<div class="label">rejected</div>', f"<pre>{_e(row['rejected'])}</pre>"]
        parts.append("".join(body) + "</div>")
    return f'<section id="generations"><h2>Sample generations</h2><p class="sub">Greedy answers written by <code>preftune eval --generate</code>.</p>{"".join(parts)}</section>'


def _spread(steps: list[int], limit: int) -> list[int]:
    """At most ``limit`` of ``steps``: the first, the last and evenly spaced ones between."""
    if len(steps) <= limit:
        return steps
    picks = {round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)}
    return [steps[i] for i in sorted(picks)]


def _samples_section(run_dir: Path, max_steps: int = 12) -> str:
    """Each ``--eval_generate`` prompt with its answer at each recorded step; repeats are greyed."""
    from .samples import read_samples

    records = read_samples(run_dir)
    if not records:
        return ""
    steps = _spread([r["step"] for r in records], max_steps)
    by_step = {r["step"]: {s.get("example_id"): s for s in r["samples"] if isinstance(s, dict)} for r in records if r["step"] in steps}
    prompts = {}
    for record in records:
        for sample in record["samples"]:
            if isinstance(sample, dict):
                prompts.setdefault(sample.get("example_id"), sample.get("prompt", ""))
    parts = []
    for number, (example_id, prompt) in enumerate(prompts.items(), start=1):
        rows, previous = [], None
        for step in steps:
            answer = (by_step[step].get(example_id) or {}).get("answer")
            if answer is None:
                continue
            kind = "same" if answer == previous else "changed"
            rows.append(f'<tr class="{kind}" data-step="{step}"><td class="num">{step}</td><td><pre class="answer">{_e(answer)}</pre></td></tr>')
            previous = answer
        parts.append(f'<div class="gen"><h3>{number}.</h3><pre>{_e(prompt)}</pre>'
                     f'<table class="samples"><tr><th>step</th><th>greedy answer</th></tr>{"".join(rows)}</table></div>')
    shown = f"{len(steps)} of {len(records)} recorded steps" if len(steps) < len(records) else f"steps {', '.join(map(str, steps))}"
    return ('<section id="samples"><h2>Sample answers during training</h2>'
            f'<p class="sub">Greedy answers to the same {len(prompts)} held-out prompts at {_e(shown)} (<code>--eval_generate</code>, '
            f'samples.jsonl); an answer unchanged since the previous step is grey.</p>{"".join(parts)}</section>')


def _last_logged(run_dir: Path) -> dict:
    from .outputs import read_metrics

    last: dict = {}
    for rec in read_metrics(run_dir):
        last.update({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("epoch",)})
    return last


def render_report(run_dir: str | Path, max_generations: int = 20, rerender_curves: bool = True) -> str:
    """The page as a string (see the module docstring)."""
    from . import __version__

    run_dir = Path(run_dir)
    config = _read_json(run_dir / RUN_CONFIG_FILE)
    complete = _read_json(run_dir / RUN_COMPLETE_FILE)
    ev = _read_json(run_dir / EVAL_FILE)
    gens = _read_jsonl(run_dir / GENERATIONS_JSONL, max_generations)
    if isinstance(ev, dict) and "generations" not in ev:
        gens = []  # left over from an earlier `preftune eval --generate`; the latest eval wrote none
    config = config if isinstance(config, dict) else None
    complete = complete if isinstance(complete, dict) else None
    ev = ev if isinstance(ev, dict) else None

    final = (complete or {}).get("final_metrics") or {}
    unfinished = complete is None
    if unfinished:
        final = _last_logged(run_dir)
    training = (config or {}).get("training") or {}
    method = str(training.get("method", "?")).upper()
    facts = [f"<b>{_e(method)}</b>"]
    if config:
        facts.append(f"base model {_e(config.get('base_model', '?'))}")
        from .methods import data_unit_of

        unit = data_unit_of(training.get("method"))
        facts.append(f"data {_e(config.get('dataset', '?'))} ({_e(config.get('train_pairs', '?'))} training {unit}, {_e(config.get('eval_pairs', 0))} eval {unit})")
        if config.get("precision"):  # runs before issue 13 did not record it
            facts.append(_e(config["precision"]))
    if complete and isinstance(complete.get("seconds"), (int, float)):
        total = final.get("total_train_runtime")
        resumed = f" after a resume ({total:.0f} s of training over all its segments)" if isinstance(total, (int, float)) else ""
        facts.append(f"finished in {complete['seconds']:.0f} s{resumed}")
    cards = []
    for choices in _CARDS:
        for k, title in choices:
            v = final.get(k)
            if isinstance(v, (int, float)):
                shown = f"{v:.1f} s" if k.endswith("train_runtime") else (f"{v:.1%}" if "accuracies" in k else _num(v))
                cards.append(f'<div class="card" data-metric="{_e(k)}"><div class="v">{_e(shown)}</div><div class="k">{_e(title)} <code>{_e(k)}</code></div></div>')
                break
    banner = ('<section class="warn" id="unfinished"><b>This run did not finish</b> (no run_complete.json): the metrics below are the '
              "last values logged to metrics.jsonl.</section>") if unfinished else ""
    final_title = "Final metrics" if not unfinished else "Last logged metrics"
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>preftune report: {_e(run_dir.resolve().name)}</title><style>{CSS}</style></head><body><main>",
        f'<header><h1>{_e(run_dir.resolve().name)}</h1><p class="sub">{" · ".join(facts)}</p></header>',
        banner,
        f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>' if cards else "",
        _curves_section(run_dir, rerender_curves),
        _samples_section(run_dir),
        _final_section(final, final_title) if final else "",
        _eval_section(ev),
        _generations_section(gens),
        _config_section(config),
        f"<footer>preftune {_e(__version__)} · {_e(now)} · {_e(run_dir.resolve())}</footer>",
        "</main></body></html>",
        "",
    ])


def write_report(run_dir: str | Path, output: str | Path | None = None, max_generations: int = 20) -> Path:
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise PreftuneError(f"run folder {str(run_dir)!r} not found" if not run_dir.exists() else f"{str(run_dir)!r} is a file; pass the run folder")
    known = (RUN_CONFIG_FILE, RUN_COMPLETE_FILE, METRICS_FILE, EVAL_FILE)
    if not any((run_dir / f).is_file() for f in known):
        raise PreftuneError(f"{str(run_dir)!r} is not a run folder of `preftune train` (it has none of {', '.join(known)})")
    open_run(run_dir, need_model=False)  # its records verified against the manifest: one line if damaged
    page = render_report(run_dir, max_generations)
    out = Path(output).expanduser() if output else run_dir / REPORT_FILE
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise PreftuneError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return out
