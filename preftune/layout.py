"""Batch layouts: how a list of tokenized preference pairs becomes model inputs.

Two layouts produce the *same* per-sequence log-probs (tested to 1e-5):

``padded`` (the reference, what TRL does)
    ``2B`` rows ``[prompt, chosen_i]`` and ``[prompt, rejected_i]``, right-padded to the
    longest, with an ordinary causal + padding mask. The prompt runs twice.

``packed`` (the default, prefix-shared)
    Each pair is one segment ``[prompt, chosen, rejected]``. Rejected tokens attend to the
    prompt and to earlier rejected tokens but never to chosen tokens, and their position ids
    continue from the end of the prompt, so every rejected token sees exactly the context it
    has in the padded layout. Segments are packed block-diagonally into rows of at most
    ``row_budget`` tokens (first-fit decreasing), with padding only at the end of a row; by
    default the budget minimises a cost model of padding versus attention (``choose_row_budget``).
    The batch describes its segments as ``segments`` ``(K, 5)``: ``(row, offset, |prompt|,
    |chosen|, |rejected|)`` per pair; segment attention (:mod:`preftune.attention`) runs from that
    alone, and :func:`dense_segment_mask` turns it into the reference ``(R, 1, T, T)`` boolean mask
    (True = may attend) for any other attention kernel.

Both layouts describe the tokens to score the same way, as flat indices into the
``(R * T)`` hidden states::

    score_index[s]   position whose hidden state predicts token s
    score_target[s]  the token id to score
    score_seq[s]     sequence id: pair i chosen -> i, pair i rejected -> B + i
    score_is_completion[s]  True for completion tokens, False for prompt tokens (scored for
                            the chosen NLL only when ``nll_on_prompt``)

so the log-prob code downstream never knows which layout it is reading.

Unpaired examples (KTO) use the same layouts: ``chosen`` holds the example's completion and
``rejected`` its KL completion (a mismatched completion scored after the same prompt; empty when
the loss needs none), so the segment ``[prompt, completion, kl_completion]`` runs the prompt once.
Their labels come back as ``desirable`` ``(B,)`` bool.

With ``tail_weight`` (LD-DPO's α) the batch also holds ``score_weight`` ``(S,)`` float32: 1 for
the first ``min(|y_w|, |y_l|)`` completion tokens of each pair, α for the tokens after that (the
"verbose" tail of the longer completion), 1 for prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "PairTokens", "LAYOUTS", "collate_pairs", "nll_token_count", "pack_segments", "choose_row_budget", "attention_cost_for",
    "dense_segment_mask", "batch_to", "PreferenceCollator",
]

LAYOUTS = ("packed", "padded")


@dataclass
class PairTokens:
    """One tokenized preference pair. ``chosen``/``rejected`` are completions (EOS included).

    An unpaired example (KTO) has a ``label`` (True: desirable); ``chosen`` is its completion and
    ``rejected`` its KL completion, which may be empty.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    example_id: int = -1  # row index in the source data, for error messages and logs
    label: bool | None = None  # unpaired examples only

    def __post_init__(self):
        if len(self.prompt) < 1:
            raise ValueError("a pair needs at least one prompt token (e.g. BOS) to score its first completion token")
        if len(self.chosen) < 1 or (len(self.rejected) < 1 and self.label is None):
            raise ValueError("a pair needs non-empty chosen and rejected completions")

    @property
    def packed_length(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def pack_segments(lengths: list[int], row_budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of segment ``lengths`` into rows of ``row_budget`` tokens.

    Returns a list of rows, each a list of segment indices. Segments longer than the budget get a
    row of their own. Deterministic: ties broken by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_budget - lengths[i])
    return rows


MAX_AUTO_ROW_TOKENS = 8192  # with a dense mask: the (T, T) mask and attention scores stay modest


def choose_row_budget(lengths: list[int], attention_cost: float) -> int:
    """Row budget minimising the modelled cost of a packed batch.

    A batch of ``R`` rows padded to ``T`` tokens costs about ``R * T * (1 + attention_cost * T)``
    (linear layers per token, plus attention per query-key pair of a row relative to them; see
    :func:`attention_cost_for`). With a dense mask, few long rows waste no padding but pay more
    attention, many short rows the reverse. Segment attention does no work across segments
    (``attention_cost == 0``): then every pair goes into one row with no padding at all.
    Otherwise the candidates are the longest pair and the total split evenly into ``k`` rows,
    for every ``k``, up to ``MAX_AUTO_ROW_TOKENS`` per row.
    """
    longest, total = max(lengths), sum(lengths)
    if attention_cost == 0:
        return total
    candidates = {longest} | {max(longest, -(-total // k)) for k in range(1, len(lengths) + 1)}
    best, best_cost = longest, float("inf")
    for budget in sorted(candidates):
        if budget > max(MAX_AUTO_ROW_TOKENS, longest):
            continue
        rows = pack_segments(lengths, budget)
        t = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * t * (1.0 + attention_cost * t)
        if cost < best_cost:
            best, best_cost = budget, cost
    return best


def attention_cost_for(config) -> float | None:
    """Cost of one computed query-key pair of a row relative to one token's linear layers, per layer.

    Linear layers: ``2 (2 H^2 + 2 H H_kv + 3 H I)`` FLOPs per token (q, o, k, v, gated MLP);
    attention with a dense mask: ``4 H`` per query-key pair of the row (scores and weighted
    values). 0 for segment attention, which computes no pair across segments, so sharing a row
    costs nothing. None when the config lacks the sizes (the layout then packs by the longest pair).
    """
    from .attention import uses_segment_attention

    if uses_segment_attention(config):
        return 0.0
    h = getattr(config, "hidden_size", None)
    inter = getattr(config, "intermediate_size", None)
    if not h or not inter:
        return None
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    h_kv = h * kv_heads / heads
    return 4.0 * h / (2.0 * (2 * h * h + 2 * h * h_kv + 3 * h * inter))


def dense_segment_mask(batch: dict) -> torch.Tensor:
    """The packed batch's attention as an explicit ``(R, 1, T, T)`` boolean mask (True = may attend).

    Per segment: causal over ``[prompt, chosen, rejected]``, with the (rejected query, chosen key)
    block cut out. Padding queries attend to themselves only, so no softmax row is empty (an
    empty row gives NaN that leaks into the backward). Memory ``R T^2``: the reference that
    segment attention is tested against, and the input of kernels that need a mask.
    """
    rows, t = batch["input_ids"].shape
    mask = torch.zeros((rows, 1, t, t), dtype=torch.bool)
    used = [0] * rows
    for r, off, n_p, n_c, n_r in batch["segments"].tolist():
        length = n_p + n_c + n_r
        block = torch.ones(length, length, dtype=torch.bool).tril_()
        block[n_p + n_c :, n_p : n_p + n_c] = False  # (rejected queries, chosen keys)
        mask[r, 0, off : off + length, off : off + length] = block
        used[r] = max(used[r], off + length)
    for r in range(rows):
        pad = torch.arange(used[r], t)
        mask[r, 0, pad, pad] = True
    return mask.to(batch["input_ids"].device)


@dataclass
class _ScoreLists:
    index: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    is_completion: list[bool] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)

    def add_run(self, first_predictor: int, tokens: list[int], seq: int, is_completion: bool, weights: list[float] | None = None):
        """Token ``tokens[j]`` is predicted by the hidden state at ``first_predictor + j``."""
        self.index.extend(range(first_predictor, first_predictor + len(tokens)))
        self.target.extend(tokens)
        self.seq.extend([seq] * len(tokens))
        self.is_completion.extend([is_completion] * len(tokens))
        self.weight.extend(weights if weights is not None else [1.0] * len(tokens))

    def tensors(self, with_weights: bool) -> dict[str, torch.Tensor]:
        out = {
            "score_index": torch.tensor(self.index, dtype=torch.long),
            "score_target": torch.tensor(self.target, dtype=torch.long),
            "score_seq": torch.tensor(self.seq, dtype=torch.long),
            "score_is_completion": torch.tensor(self.is_completion, dtype=torch.bool),
        }
        if with_weights:
            out["score_weight"] = torch.tensor(self.weight, dtype=torch.float32)
        return out


def _tail_weights(p: PairTokens, tail_weight: float | None) -> tuple[list[float] | None, list[float] | None]:
    """LD-DPO token weights of the chosen and rejected completions (None: all ones)."""
    if tail_weight is None:
        return None, None
    shared = min(len(p.chosen), len(p.rejected))
    return ([1.0] * shared + [tail_weight] * (len(p.chosen) - shared), [1.0] * shared + [tail_weight] * (len(p.rejected) - shared))


def _collate_padded(pairs: list[PairTokens], pad_id: int, score_prompt: bool, tail_weight: float | None = None) -> dict:
    b = len(pairs)
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    t = max(len(r) for r in rows)
    input_ids = torch.full((2 * b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * b, t), dtype=torch.long)
    scores = _ScoreLists()
    spans = []
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row)
        attention_mask[r, : len(row)] = 1
    for i, p in enumerate(pairs):
        n_p = len(p.prompt)
        chosen_w, rejected_w = _tail_weights(p, tail_weight)
        if score_prompt:
            scores.add_run(i * t, p.prompt[1:], seq=i, is_completion=False)
        scores.add_run(i * t + n_p - 1, p.chosen, seq=i, is_completion=True, weights=chosen_w)
        scores.add_run((b + i) * t + n_p - 1, p.rejected, seq=b + i, is_completion=True, weights=rejected_w)
        spans += [(i, 0, n_p), (b + i, 0, n_p)]
    position_ids = torch.arange(t).expand(2 * b, t).clone()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "token_mask": attention_mask.bool(),
        "prompt_spans": torch.tensor(spans, dtype=torch.long).reshape(-1, 3),
        **scores.tensors(tail_weight is not None),
    }


def _collate_packed(pairs: list[PairTokens], pad_id: int, score_prompt: bool, row_budget: int | None, attention_cost: float | None = None,
                    tail_weight: float | None = None) -> dict:
    b = len(pairs)
    lengths = [p.packed_length for p in pairs]
    if row_budget is None and attention_cost is not None:
        budget = choose_row_budget(lengths, attention_cost)
    else:
        budget = max(max(lengths), row_budget or 0)
    rows = pack_segments(lengths, budget)
    t = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, t), dtype=torch.long)
    token_mask = torch.zeros((n_rows, t), dtype=torch.bool)
    scores = _ScoreLists()
    segments = []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            p = pairs[i]
            n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
            seg = slice(offset, offset + lengths[i])
            input_ids[r, seg] = torch.tensor(p.prompt + p.chosen + p.rejected)
            position_ids[r, seg] = torch.cat(
                [torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)]
            )
            token_mask[r, seg] = True
            base = r * t + offset
            chosen_w, rejected_w = _tail_weights(p, tail_weight)
            if score_prompt:
                scores.add_run(base, p.prompt[1:], seq=i, is_completion=False)
            scores.add_run(base + n_p - 1, p.chosen, seq=i, is_completion=True, weights=chosen_w)
            if n_r:
                # first rejected token is predicted by the last prompt token, the rest by rejected tokens
                scores.add_run(base + n_p - 1, p.rejected[:1], seq=b + i, is_completion=True, weights=rejected_w[:1] if rejected_w else None)
                scores.add_run(base + n_p + n_c, p.rejected[1:], seq=b + i, is_completion=True, weights=rejected_w[1:] if rejected_w else None)
            segments.append((r, offset, n_p, n_c, n_r))
            offset += lengths[i]
    segments_t = torch.tensor(segments, dtype=torch.long).reshape(-1, 5)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "token_mask": token_mask,
        "segments": segments_t,
        "prompt_spans": segments_t[:, :3].clone(),
        **scores.tensors(tail_weight is not None),
    }


def nll_token_count(pair: PairTokens, score_prompt: bool) -> int:
    """Tokens of ``pair`` in the chosen NLL: its completion, plus the scored prompt tokens."""
    return len(pair.chosen) + (len(pair.prompt) - 1 if score_prompt else 0)


def collate_pairs(
    pairs: list[PairTokens],
    pad_id: int,
    layout: str = "packed",
    score_prompt: bool = False,
    row_budget: int | None = None,
    attention_cost: float | None = None,
    tail_weight: float | None = None,
) -> dict:
    """Build model inputs for ``pairs``; see the module docstring for the returned keys.

    ``row_budget`` fixes the packed row length; otherwise, given the model's ``attention_cost``
    (:func:`attention_cost_for`), the budget is chosen by :func:`choose_row_budget`, and without
    it rows are as long as the longest pair.

    Extra keys: ``num_pairs`` (int), ``example_ids`` ``(B,)``, ``num_tokens`` (real tokens fed
    to the model), ``num_nll_tokens`` (tokens in the chosen NLL), ``desirable`` ``(B,)`` bool
    (unpaired examples only); ``score_weight`` with ``tail_weight`` (LD-DPO's α).
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    labels = [p.label for p in pairs]
    if any(label is None for label in labels) and any(label is not None for label in labels):
        raise ValueError("a batch mixes preference pairs and labelled (unpaired) examples")
    if layout == "packed":
        batch = _collate_packed(pairs, pad_id, score_prompt, row_budget, attention_cost, tail_weight)
    elif layout == "padded":
        batch = _collate_padded(pairs, pad_id, score_prompt, tail_weight)
    else:
        raise ValueError(f"unknown batch layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    b = len(pairs)
    batch.update(
        num_pairs=torch.tensor(b),
        example_ids=torch.tensor([p.example_id for p in pairs], dtype=torch.long),
        num_tokens=batch["token_mask"].sum(),
        num_nll_tokens=torch.tensor(sum(nll_token_count(p, score_prompt) for p in pairs)),
    )
    if labels[0] is not None:
        batch["desirable"] = torch.tensor(labels, dtype=torch.bool)
    return batch


def batch_to(batch: dict, device) -> dict:
    """The collated ``batch`` with every tensor moved to ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class PreferenceCollator:
    """Callable collator for ``torch.utils.data.DataLoader`` over a list of :class:`PairTokens`."""

    pad_id: int
    layout: str = "packed"
    score_prompt: bool = False
    row_budget: int | None = None
    attention_cost: float | None = None
    tail_weight: float | None = None

    def __call__(self, pairs: list[PairTokens]) -> dict:
        return collate_pairs(pairs, self.pad_id, self.layout, self.score_prompt, self.row_budget, self.attention_cost, self.tail_weight)
