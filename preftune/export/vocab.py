"""A run's tokenizer as GGUF tokenizer metadata (the ``tokenizer.ggml.*`` keys llama.cpp reads).

GGUF can describe two of the vocabularies the supported model families use:

``llama`` (SentencePiece-style BPE: ``▁`` for spaces, byte fallback ``<0x0A>``; Llama-2, Mistral)
    tokens, one score per token and one type per token; no merges. llama.cpp's SentencePiece
    tokenizer merges, at each step, the adjacent pair whose joined text is a token with the
    highest score. A Hugging Face ``tokenizer.json`` stores merge *ranks* instead, so the score of a
    token is minus the rank of the first merge that produces it (``score(t) = -min{r : a_r + b_r =
    t}``): the pair merged first in Hugging Face's BPE has the highest score. Tokens that no merge
    produces (characters, bytes, special tokens) get score 0; llama.cpp never compares them.

``gpt2`` (byte-level BPE: every byte spelled as a printable character, ``Ġ`` for a space; Qwen2,
    Llama-3)
    tokens in their byte-level spelling, merges as ``"left right"`` strings in rank order, and
    ``tokenizer.ggml.pre``: the name under which llama.cpp knows the regular expression that
    splits text into words before the merges (``qwen2``, ``llama-bpe``, ``gpt-2``). The regex is
    read from the tokenizer and must be one of those; llama.cpp would split text differently
    otherwise.

Token types follow llama.cpp's converter: added tokens marked special are CONTROL (matched
whole in text, e.g. ``<|im_start|>``), other added tokens USER_DEFINED, ``<0xXX>`` pieces BYTE,
the unknown token UNKNOWN, everything else NORMAL. When the model's embedding has more rows than
the tokenizer has tokens (vocabularies padded to a multiple of 64), the extra ids get
``[PAD<id>]`` tokens of type UNUSED, so token ids and embedding rows stay one to one.

Special ids: BOS, EOS, UNK, PAD as the tokenizer names them. ``add_bos_token`` says whether
llama.cpp prepends BOS to a prompt; it is set the way training did (preftune prepends BOS
whenever the tokenizer has one, :func:`preftune.data.tokenize.tokenize_examples`), not from the
tokenizer's own post-processor. Word-level, WordPiece and unigram vocabularies (the built-in
demo's is word-level) are refused: llama.cpp would tokenize text differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import PreftuneError

__all__ = ["GgufVocab", "gguf_vocab", "PRE_TOKENIZER_REGEXES"]

# Token types of the GGUF format (gguf.TokenType), by name, for readable code below.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's names for the word-splitting regexes of byte-level BPE vocabularies it implements.
PRE_TOKENIZER_REGEXES = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
GPT2_PRE = "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own regex, built into the pre-tokenizer


@dataclass
class GgufVocab:
    """What goes under ``tokenizer.ggml.*`` (see the module docstring)."""

    model: str  # "llama" or "gpt2"
    pre: str  # llama.cpp pre-tokenizer name ("default" for llama)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # llama only
    merges: list[str] = field(default_factory=list)  # gpt2 only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_space_prefix: bool | None = None  # llama only: "hello" is read as "▁hello"
    notes: list[str] = field(default_factory=list)  # what GGUF cannot carry, said to the user


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PreftuneError(f"the run's tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) tokenizer; "
                            "GGUF export reads the vocabulary from tokenizer.json")
    return json.loads(backend.to_str())


def _components(node: dict | None) -> list[dict]:
    """A pre-tokenizer / normalizer / decoder and, for a Sequence, its parts, flattened."""
    if not node:
        return []
    parts = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    if node.get("type") == "Sequence" and parts is not None:
        return [c for part in parts for c in _components(part)]
    return [node]


def _regex(split: dict) -> str | None:
    pattern = split.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _describe_kind(data: dict) -> str:
    """Which family of vocabulary the tokenizer is ("llama" or "gpt2"), or a one-line refusal."""
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        what = {"WordLevel": "a word-level vocabulary (the built-in demo's tokenizer is one)", "WordPiece": "a WordPiece vocabulary",
                "Unigram": "a unigram vocabulary"}.get(kind, f"a {kind} vocabulary")
        raise PreftuneError(
            f"the run's tokenizer is {what}, which GGUF cannot represent for llama.cpp (it stores SentencePiece-style or byte-level "
            "BPE vocabularies); export a run trained on a Llama, Mistral or Qwen2 model with its own tokenizer"
        )
    pre = _components(data.get("pre_tokenizer"))
    norm = _components(data.get("normalizer"))
    if model.get("byte_fallback") and (any(c.get("type") == "Metaspace" for c in pre)
                                       or any(c.get("type") == "Replace" and "▁" in json.dumps(c) for c in norm)):
        return "llama"
    if any(c.get("type") == "ByteLevel" for c in pre):
        return "gpt2"
    raise PreftuneError("the run's tokenizer is a BPE vocabulary that is neither SentencePiece-style (▁ and byte fallback) nor "
                        "byte-level, so llama.cpp could not reproduce its tokens; GGUF export supports those two")


def _gpt2_pre(data: dict) -> str:
    pre = _components(data.get("pre_tokenizer"))
    splits = [c for c in pre if c.get("type") == "Split"]
    byte_level = [c for c in pre if c.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        return GPT2_PRE
    regexes = [_regex(s) for s in splits]
    for name, known in PRE_TOKENIZER_REGEXES.items():
        if regexes == [known]:
            return name
    raise PreftuneError(
        "the run's byte-level tokenizer splits text with a regex llama.cpp does not know "
        f"({(regexes[0] if regexes else 'none')[:60]!r}); supported: Qwen2's, Llama-3's and GPT-2's"
    )


def _token_table(tokenizer, vocab_size: int) -> tuple[list[str], dict[int, object]]:
    """Token text by id for ids ``0 .. vocab_size-1`` (``None`` where the tokenizer has no token)."""
    by_id: list[str | None] = [None] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            raise PreftuneError(f"the tokenizer has token id {index} ({token!r}) but the model's embedding has only {vocab_size} rows; "
                                "the tokenizer does not belong to this model")
        by_id[index] = token
    return by_id, dict(tokenizer.added_tokens_decoder)


def _merge_scores(merges: list) -> dict[str, float]:
    """``-rank`` of the first merge producing each token (see the module docstring)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def _merge_strings(merges: list) -> list[str]:
    out = []
    for merge in merges:
        left, right = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
        if " " in left or " " in right:
            raise PreftuneError("the run's byte-level tokenizer has a merge containing a space, which GGUF's 'left right' merge list cannot hold")
        out.append(f"{left} {right}")
    return out


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(value, int):
            ids[name] = value
    return ids


def gguf_vocab(tokenizer, vocab_size: int) -> GgufVocab:
    """The GGUF description of ``tokenizer`` for a model whose embedding has ``vocab_size`` rows."""
    data = _backend(tokenizer)
    kind = _describe_kind(data)
    model = data["model"]
    by_id, added = _token_table(tokenizer, vocab_size)
    unk = getattr(tokenizer, "unk_token_id", None)
    scores_by_token = _merge_scores(model.get("merges") or []) if kind == "llama" else {}
    tokens, types, scores = [], [], []
    for index, token in enumerate(by_id):
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
            scores.append(-1e9)
            continue
        if index in added:
            types.append(CONTROL if added[index].special else USER_DEFINED)
        elif kind == "llama" and index == unk:
            types.append(UNKNOWN)
        elif kind == "llama" and _is_byte_piece(token):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        tokens.append(token)
        scores.append(scores_by_token.get(token, 0.0))
    vocab = GgufVocab(model=kind, pre="default", tokens=tokens, types=types, special_ids=_special_ids(tokenizer),
                      add_bos=getattr(tokenizer, "bos_token_id", None) is not None)
    if kind == "llama":
        vocab.scores = scores
        metaspace = [c for c in _components(data.get("pre_tokenizer")) if c.get("type") == "Metaspace"]
        vocab.add_space_prefix = metaspace[0].get("prepend_scheme", "always") != "never" if metaspace else True
    else:
        vocab.pre = _gpt2_pre(data)
        vocab.merges = _merge_strings(model.get("merges") or [])
    if any(c.get("type") in ("NFC", "NFKC", "NFD", "NFKD") for c in _components(data.get("normalizer"))):
        vocab.notes.append("the tokenizer's Unicode normalization is not stored in GGUF: text that is not already normalized may split "
                           "into different tokens in llama.cpp")
    return vocab
