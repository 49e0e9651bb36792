"""Hub names on a machine that cannot reach the Hub: one quick probe, then one clear line, with no
retries; local paths are told apart from Hub names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, free_port

# Counts every name lookup / connection to the (closed) endpoint port and every sleep (huggingface_hub's
# backoff sleeps 1, 2, 4, 8, 8 s between its retries; here sleeping is skipped, so a regression is
# counted, not waited for).
LOAD_WITH_THE_HUB_UNREACHABLE = textwrap.dedent("""
    import json, socket, sys, time
    port = int(sys.argv[1])
    attempts, sleeps = [], []
    real_getaddrinfo = socket.getaddrinfo
    def getaddrinfo(host, p, *a, **k):
        if p == port:
            attempts.append(host)
        return real_getaddrinfo(host, p, *a, **k)
    socket.getaddrinfo = getaddrinfo
    time.sleep = lambda s: sleeps.append(s)
    from preftune.errors import PreftuneError
    from preftune.training_model import causal_lm_from_pretrained, load_tokenizer
    out = {}
    for what, load in (("model", causal_lm_from_pretrained), ("tokenizer", load_tokenizer)):
        attempts.clear(); sleeps.clear()
        try:
            load("some-org/some-model")
            message = None
        except PreftuneError as e:
            message = str(e)
        out[what] = {"attempts": len(attempts), "sleeps": sleeps, "message": message}
    print(json.dumps(out))
""")


def test_a_hub_name_fails_at_once_when_the_hub_is_unreachable(tmp_path):
    """No HF_HUB_OFFLINE (users do not set it), the endpoint a closed port: the probe's one connection
    attempt, no retry, no backoff, and the message says the Hub is unreachable and what to do."""
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", LOAD_WITH_THE_HUB_UNREACHABLE, str(port)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the model first: the probe (once per process), and huggingface_hub's own best-effort fetch of its
    # agent registry for the user-agent header (once per process, 3 s timeout, no retry); then nothing:
    # the tokenizer after it makes no attempt at all. Before the fix: 9 attempts, sleeps [1, 2, 4, 8, 8].
    assert out["model"]["attempts"] <= 2 and out["tokenizer"]["attempts"] == 0
    for what in ("model", "tokenizer"):
        assert out[what]["sleeps"] == [], f"{what}: retried with backoff"
        message = out[what]["message"]
        assert "'some-org/some-model' is not a local folder" in message and f"127.0.0.1:{port}" in message and "unreachable" in message
        assert "pass the local folder" in message and "HF_ENDPOINT" in message and "\n" not in message


def test_local_paths_are_recorded_absolute_and_hub_names_as_given(tmp_path, monkeypatch):
    from preftune.hub import local_path_or_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert local_path_or_name("org/model") == str(tmp_path / "org" / "model")  # exists here: local, as transformers reads it
    assert local_path_or_name("org/other") == "org/other" and local_path_or_name("gpt2") == "gpt2"
    assert local_path_or_name("./missing") == str(tmp_path / "missing")  # can only be a path
    assert local_path_or_name("~/x") == str(Path.home() / "x")
    assert local_path_or_name(str(tmp_path / "org")) == str(tmp_path / "org")
