"""How far a newcomer walks to follow one command: a call trace of preftune's own code.

Runs a command in-process under ``sys.setprofile`` and records every call from one preftune source
file into another. Prints:

* files entered: distinct preftune files whose functions ran (module import code not counted);
* visits: how many times control moved into each file from another one (a reader following the
  run jumps there that often);
* climbs back up: calls into a file that is already on the call stack below a *different* file
  (``run.py -> evaluate.py -> run.py``), i.e. a lower layer calling back into a higher one.

Usage (from the repository root):

    python scripts/code_walk.py train     # the built-in demo, 2 steps
    python scripts/code_walk.py eval RUN  # preftune eval on a finished run folder
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

PKG = str(Path(__file__).resolve().parents[1] / "preftune") + os.sep


def trace(fn):
    stack: list[str] = []  # preftune file of each active preftune frame (outermost first)
    entered: collections.Counter = collections.Counter()
    edges: collections.Counter = collections.Counter()
    climbs: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        path = frame.f_code.co_filename
        if not path.startswith(PKG) or frame.f_code.co_name == "<module>":
            return
        rel = path[len(PKG) - len("preftune/"):]
        if event == "call":
            if not stack or stack[-1] != rel:
                entered[rel] += 1  # a visit: control moved into this file
                if stack:
                    edges[(stack[-1], rel)] += 1
                    if rel in stack:
                        climbs[(stack[-1], rel)] += 1
            stack.append(rel)
        elif stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered, edges, climbs


def main(argv):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from preftune.cli import main as cli

    if argv[0] == "train":
        out = tempfile.mkdtemp(prefix="walk-")
        args = ["train", "--output_dir", out, "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--memory_preflight", "false"]
    elif argv[0] == "eval":
        args = ["eval", argv[1], "--output_dir", tempfile.mkdtemp(prefix="walk-eval-")]
    else:
        raise SystemExit(__doc__)
    entered, edges, climbs = trace(lambda: cli(args))
    print(f"\n{argv[0]}: {len(entered)} preftune files entered, {sum(entered.values())} visits, "
          f"{sum(climbs.values())} climbs back up ({len(climbs)} distinct)")
    for (a, b), n in sorted(climbs.items()):
        print(f"  climb  {a} -> {b} ({n}x)")
    print("visits:", ", ".join(f"{f} {n}" for f, n in entered.most_common()))


if __name__ == "__main__":
    main(sys.argv[1:])
