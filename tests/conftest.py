"""Shared fixtures: tiny random models built from configs, and the ../shared data paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests tokenize into their own cache (removed at exit), never the user's ~/.cache/preftune.
_TEST_CACHE = tempfile.mkdtemp(prefix="preftune-test-cache-")
os.environ["PREFTUNE_CACHE_DIR"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, True)

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the repository; a git worktree under <checkout>/../wt/NAME looks one level higher
SHARED = next((p / "shared" for p in (REPO.parent, REPO.parent.parent) if (p / "shared").is_dir()), REPO.parent / "shared")
SHARED_DATA = SHARED / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"


# `--bf16 auto` is the default: bf16 mixed precision on CPUs with AVX512-BF16/AMX (this machine),
# fp32 elsewhere. A test that compares two computations bf16 rounds differently (gradient
# accumulation vs one batch, 2 processes vs 1, a precomputed table vs the live forward, the trainer
# vs a plain fp32 forward) at fp32 tolerances pins fp32 with these, so it keeps testing what it was
# written for on every machine; tests of bf16 itself, and runs that only need to learn or to repeat
# themselves bit for bit, keep the default.
FP32 = {"bf16": "false"}  # PreftuneConfig(**FP32, ...)
FP32_FLAGS = ["--bf16", "false"]  # preftune train ... *FP32_FLAGS


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous), so concurrent test runs
    on one machine do not collide on a fixed port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models, which gain nothing from intra-op threads; on a busy 2-core machine
    OpenMP spin-waiting made some modules 5-50x slower. Subprocess tests set their own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(vocab_size: int = 97, seed: int = 0, attn: str = "sdpa", **overrides):
    """A 2-layer random Llama small enough for per-test training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


@pytest.fixture
def llama2_tokenizer():
    if not LLAMA2_TOKENIZER.is_dir():
        pytest.skip("../shared/data/llama2-tokenizer is absent (needs the shared folder beside the repo)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER))


@pytest.fixture
def hh_rlhf_path():
    if not HH_RLHF.is_file():
        pytest.skip("../shared/data/hh-rlhf-harmless-base is absent (needs the shared folder beside the repo)")
    return HH_RLHF


@pytest.fixture
def demo_tokenizer():
    from preftune.demo import build_demo_tokenizer

    return build_demo_tokenizer()
