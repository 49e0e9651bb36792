"""Length-aware batching by token count (``--max_tokens_per_batch``).

Batches are formed so that the packed tokens of each batch (``prompt + chosen + rejected``
per pair, see :mod:`preftune.layout`) stay within ``max_tokens``, which keeps the memory peak
steady across steps instead of being set by the longest pairs.

Composition, once per run (from ``seed``):

1. shuffle all indices;
2. cut the shuffled list into pools of ``pool_size`` indices, sort each pool by length
   (pairs of similar length share batches, so rows pack tightly), and fill batches greedily up
   to the budget; a pair longer than the budget gets a batch of its own (the run says so at
   start-up, :func:`budget_check`, and refuses a budget below every pair).

Order, per epoch (from ``seed`` and ``epoch``): shuffle the batches, then give process ``rank``
every ``num_replicas``-th batch (all processes get the same number of batches, the last few
dropped if needed).

The composition is fixed (as fairseq's ``batch_by_size``) so that every epoch has the same
number of batches: transformers' Trainer maps a resumed global step to (epoch, batch) with the
first epoch's length, so epochs of varying length would resume at the wrong batch. Epoch 0 is
the order a run always had. Deterministic for a seed and epoch, so resumed runs see the same
batches. :class:`EpochDataLoader` passes the Trainer's ``set_epoch`` on to the sampler.
"""

from __future__ import annotations

import random

from torch.utils.data import DataLoader, Sampler

__all__ = ["TokenBudgetBatchSampler", "EpochDataLoader", "token_budget_batches", "budget_check"]


def token_budget_batches(lengths: list[int], max_tokens: int, order: list[int]) -> list[list[int]]:
    """Greedy batches over ``order``: add pairs while the summed length stays <= ``max_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current and total + lengths[i] > max_tokens:
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


def budget_check(lengths, max_tokens: int, unit: str = "pairs") -> str | None:
    """What ``--max_tokens_per_batch max_tokens`` does to training items of packed ``lengths``: a
    warning line when some are longer than the budget (each of them trains alone, in a batch above
    it), else None; a :class:`~preftune.errors.PreftuneError` when all are (the budget would hold
    nothing: every batch would be one item above it)."""
    from .errors import PreftuneError

    lengths = [int(n) for n in lengths]
    over = sum(1 for n in lengths if n > max_tokens)
    if not over:
        return None
    shortest, longest = min(lengths), max(lengths)
    if over == len(lengths):
        raise PreftuneError(f"--max_tokens_per_batch {max_tokens} is below every one of the {len(lengths)} training {unit} (packed prompt + "
                            f"completions: shortest {shortest}, longest {longest} tokens), so no batch could keep to it; raise it to at "
                            f"least {longest} (every one fits), or lower --max_length")
    return (f"--max_tokens_per_batch {max_tokens}: {over} of {len(lengths)} training {unit} are longer (packed prompt + completions: shortest "
            f"{shortest}, longest {longest} tokens); each of those trains alone, in a batch above the budget. Raise it to at least {longest} "
            "to keep every batch within it, or lower --max_length")


class TokenBudgetBatchSampler(Sampler[list[int]]):
    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, pool_size: int = 1024):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.lengths = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)  # numpy arrays from TokenizedPairs
        self.max_tokens = max_tokens
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pool_size = pool_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-0")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool_size):
            pool = sorted(order[start : start + self.pool_size], key=lambda i: self.lengths[i])
            batches.extend(token_budget_batches(self.lengths, self.max_tokens, pool))
        # epoch 0 continues the composition's generator (the order runs have always had)
        order_rng = rng if self.epoch == 0 else random.Random(f"{self.seed}-{self.epoch}")
        order_rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[:usable]

    def __iter__(self):
        yield from self._all_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self._all_batches()) // self.num_replicas


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`TokenBudgetBatchSampler` whose ``set_epoch`` reaches the sampler.

    transformers' Trainer calls ``set_epoch`` on the loader at the start of every epoch (a plain
    ``DataLoader`` has none, so the sampler stayed at epoch 0); when it resumes mid-epoch it
    wraps the sampler in accelerate's ``SkipBatchSampler`` and reaches the sampler itself.
    """

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
