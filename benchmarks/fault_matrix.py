"""The full fault-injection matrix: every file of a checkpoint and of a finished run, damaged four ways,
each case really resumed (or read), for the table in docs/reliability.md.

The suite (tests/test_fault_injection.py) checks every case at the verification level and resumes a
representative subset; this script resumes every one. Cases and checks: tests/_faults.py.

Usage::

    python benchmarks/fault_matrix.py [--kinds full,lora,reft] [--out matrix.md]

Exit code 1 if any case ends otherwise than expected (a traceback, a wrong checkpoint, other weights).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[1] / "tests")]

from _faults import KINDS, MODES, cases_for, run_case, train, write_inputs  # noqa: E402

LEGEND = {
    "resumed from checkpoint-4, final weights identical": "**R4**",
    "chat/eval/merge/export/report: one line naming the file": "**L**",
    "chat/eval/merge/export: one line naming the file; report works": "**Lm**",
    "not read back: every command works as before": "ok",
    "recomputed, resumed from checkpoint-4, final weights identical": "**RC**",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated run kinds out of {', '.join(KINDS)} (default: all)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    logging.disable(logging.WARNING)  # the runs' own warnings ("skipping checkpoint-6: ...") are expected here
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="preftune-fault-matrix-"))
    inputs = write_inputs(root)
    rows, outcomes, failures = {}, Counter(), []
    for kind in kinds:
        undisturbed = root / kind
        code, err = train(undisturbed, *inputs, kind)
        if code != 0:
            print(err[-3000:], file=sys.stderr)
            return 1
        for i, case in enumerate(cases_for(kind, undisturbed)):
            try:
                outcome = run_case(case, undisturbed, root / f"{kind}-case{i}", inputs, resume=True)
                cell = LEGEND[outcome]
            except Exception as e:  # noqa: BLE001 - a failing case is reported, the others still run
                outcome, cell = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "**FAILED**"
                failures.append((case.id, traceback.format_exc()))
            outcomes[outcome] += 1
            rows.setdefault((kind, case.where, case.file), {})[case.mode] = cell
            print(f"{case.id}: {outcome}", flush=True)
    lines = [f"| run | where | file | {' | '.join(MODES)} |", "| --- | --- | --- |" + " --- |" * len(MODES)]
    for (kind, where, file), cells in rows.items():
        where_label = {"checkpoint": "checkpoint-6", "run": "run folder", "cache": "ref_logps/"}[where]
        shown = file if where != "cache" else "<fingerprint>.safetensors"
        lines.append(f"| {kind} | {where_label} | `{shown}` | " + " | ".join(cells.get(m, "") for m in MODES) + " |")
    total = sum(outcomes.values())
    summary = [f"{total} cases in {time.perf_counter() - started:.0f} s:"] + [f"- {n} x {o}" for o, n in outcomes.most_common()]
    table = "\n".join(lines + [""] + summary)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    for case_id, tb in failures:
        print(f"\n{case_id}\n{tb}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
