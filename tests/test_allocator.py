"""Freed memory is reused between steps (:mod:`preftune.allocator`), in a subprocess so the
malloc setting does not follow the rest of the test session."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from preftune.allocator import reuse_freed_memory

    def faults_of_fresh_tensors(n=4, mb=48):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch.empty(mb * 2**18).fill_(1.0)  # allocated, touched, freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    plain = faults_of_fresh_tensors()
    applied = reuse_freed_memory()
    faults_of_fresh_tensors(), faults_of_fresh_tensors()  # the first rounds after the switch grow the heap
    reused = faults_of_fresh_tensors()
    print(json.dumps({"applied": applied, "again": reuse_freed_memory(), "plain": plain, "reused": reused}))
""")


def test_freed_memory_is_reused_between_steps():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if not got["applied"]:
        pytest.skip("needs Linux with glibc")
    assert got["again"] is True  # idempotent
    # 4 tensors of 48 MB: 4 x 12,288 pages faulted in fresh every time; reused, none or (when a
    # small allocation lands between two big ones) one block's worth
    assert got["plain"] > 40_000
    assert got["reused"] <= got["plain"] / 3


# --- preloading jemalloc / tcmalloc ------------------------------------------------------------
def _finder(available):
    return lambda name: f"lib{name}.so.9" if name in available else None


def test_allocator_choice_rules():
    from preftune.allocator import allocator_to_preload

    linux = "linux"
    assert allocator_to_preload({}, _finder({"jemalloc", "tcmalloc_minimal"}), linux) == ("jemalloc", "libjemalloc.so.9")
    assert allocator_to_preload({}, _finder({"tcmalloc"}), linux) == ("tcmalloc", "libtcmalloc.so.9")
    assert allocator_to_preload({"PREFTUNE_ALLOCATOR": "tcmalloc"}, _finder({"jemalloc", "tcmalloc_minimal"}), linux) == (
        "tcmalloc", "libtcmalloc_minimal.so.9")
    assert allocator_to_preload({}, _finder(set()), linux) is None  # nothing installed: the system allocator
    assert allocator_to_preload({"PREFTUNE_ALLOCATOR": "system"}, _finder({"jemalloc"}), linux) is None
    assert allocator_to_preload({}, _finder({"jemalloc"}), "darwin") is None
    # already running on one: never a second restart
    assert allocator_to_preload({"PREFTUNE_PRELOADED_ALLOCATOR": "jemalloc"}, _finder({"jemalloc"}), linux) is None
    assert allocator_to_preload({"LD_PRELOAD": "/opt/lib/libtcmalloc.so"}, _finder({"jemalloc"}), linux) is None
    with pytest.raises(ValueError, match="PREFTUNE_ALLOCATOR='mimalloc' is not one of"):
        allocator_to_preload({"PREFTUNE_ALLOCATOR": "mimalloc"}, _finder({"jemalloc"}), linux)
    with pytest.raises(ValueError, match="apt install libjemalloc2"):
        allocator_to_preload({"PREFTUNE_ALLOCATOR": "jemalloc"}, _finder(set()), linux)


# sys.argv[0] "preftune" is what the console script sets; a program that merely calls main()
# (argv[0] "-c" here, or a notebook) is never re-executed
RESTART_PROBE = textwrap.dedent("""
    import os, sys
    print("process", os.getpid(), os.environ.get("PREFTUNE_PRELOADED_ALLOCATOR"), os.environ.get("LD_PRELOAD", ""),
          os.environ.get("MALLOC_CONF", "") + os.environ.get("TCMALLOC_RELEASE_RATE", ""), flush=True)
    import preftune.cli
    preftune.cli._command = lambda name: (lambda rest: 0)  # the restart is under test, not eval (whose imports take seconds)
    sys.argv = [os.environ.get("PROBE_ARGV0", "preftune"), "eval", "--help"]
    sys.exit(preftune.cli.main())
""")


def _run_probe(**env):
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PREFTUNE_PRELOADED_ALLOCATOR", "PREFTUNE_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", RESTART_PROBE], capture_output=True, text=True, timeout=120, env={**full, **env})
    assert out.returncode == 0, out.stderr
    return [line.split(" ", 4)[1:] for line in out.stdout.splitlines() if line.startswith("process ")]


def test_command_line_restarts_on_jemalloc_when_installed():
    """A real command-line start re-executes itself (same process id) with the library in
    LD_PRELOAD, once; PREFTUNE_ALLOCATOR=system keeps the system allocator; a bad value is one line."""
    import ctypes.util

    if not (ctypes.util.find_library("jemalloc") or ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")):
        pytest.skip("neither jemalloc nor tcmalloc is installed (apt install libjemalloc2)")
    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD is Linux")
    first, second = _run_probe()
    assert first[1] == "None" and second[0] == first[0]  # same process id, now preloaded
    assert second[1] in ("jemalloc", "tcmalloc") and second[1] in second[2]
    assert second[3] in ("dirty_decay_ms:-1,muzzy_decay_ms:-1", "0")  # freed pages kept for the next step
    assert len(_run_probe(PREFTUNE_ALLOCATOR="system")) == 1
    assert len(_run_probe(PROBE_ARGV0="ipykernel_launcher.py")) == 1  # not the preftune program: no restart
    import os

    bad = subprocess.run([sys.executable, "-c", RESTART_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PREFTUNE_ALLOCATOR": "nope"})
    assert bad.returncode == 2 and bad.stderr.strip().startswith("preftune: error: PREFTUNE_ALLOCATOR='nope'") and "Traceback" not in bad.stderr
