"""``PreferenceTrainer``: a thin ``transformers.Trainer`` subclass.

It turns a collated batch into per-sequence log-probs (:mod:`preftune.engine`), asks
:mod:`preftune.objective` for the loss, and keeps running metric sums for logging. No
tokenization, no layout logic and no loss maths live here.

Overridden public Trainer methods: ``compute_loss``, ``prediction_step``, ``log``, ``save_model``
(a ReFT model writes only its interventions),
``get_batch_samples`` (to know the totals of each gradient-accumulation window) and
``get_train_dataloader`` (only for ``max_tokens_per_batch``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

from .data.store import as_tokenized_pairs
from .engine import sequence_logps
from .hf_helpers import pad_token_id as pad_id_of, unwrap_model
from .model_hooks import NO_HOOKS, ModelHooks
from .reft import reft_hooks
from .layout import PairTokens, PreferenceCollator, attention_cost_for
from .objective import Window, compute_objective, nll_weight

logger = logging.getLogger(__name__)

__all__ = ["PairDataset", "PreferenceTrainer", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


class PairDataset(Dataset):
    """Tokenized pairs (:class:`preftune.data.store.TokenizedPairs`, or a list of
    :class:`PairTokens`, copied into one) as a torch Dataset; items are built on demand."""

    def __init__(self, pairs):
        self.pairs = as_tokenized_pairs(pairs)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i) -> PairTokens:
        return self.pairs[i]

    def lengths(self) -> np.ndarray:
        """Packed length of every pair, ``(N,)`` (no pair is built)."""
        return self.pairs.lengths()


class _MetricBank:
    """Running sums of metrics between two log calls (one bank for train, one for eval)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = defaultdict(float)
        self.pairs = 0.0
        self.nll_sum = 0.0
        self.nll_tokens = 0.0
        self.pref_sum = 0.0
        self.tokens = 0.0

    def add(self, result, tokens: float):
        for k, v in result.metric_sums.items():
            self.sums[k] += v
        self.pairs += result.pairs
        self.nll_sum += result.nll_sum
        self.nll_tokens += result.nll_tokens
        self.pref_sum += result.pref_sum
        self.tokens += tokens

    def as_tensor(self, keys: list[str], device) -> torch.Tensor:
        vals = [self.sums.get(k, 0.0) for k in keys] + [self.pairs, self.nll_sum, self.nll_tokens, self.pref_sum, self.tokens]
        return torch.tensor(vals, dtype=torch.float64, device=device)


class PreferenceTrainer(Trainer):
    """Trainer for every preference method; ``args`` is a :class:`preftune.config.PreftuneConfig`.

    Args:
        model: a transformers causal LM (optionally PEFT-wrapped).
        args: the run configuration.
        train_pairs / eval_pairs: tokenized pairs: :class:`preftune.data.store.TokenizedPairs` (see
            :func:`preftune.data.splits.prepare_data`) or a list of :class:`PairTokens`.
        processing_class: the tokenizer (saved with the model).
        reference: callable ``(model, batch) -> (chosen_sum, rejected_sum)`` for DPO, else None.
        pad_token_id: the id batches are padded with (default: from ``processing_class``).
        hooks: what the model needs done around it (:class:`preftune.model_hooks.ModelHooks`:
            ReFT's batch context and interventions-only saving); default: derived from ``model``
            from the ReFT interventions it carries, if any (:func:`preftune.reft.reft_hooks`).
    """

    def __init__(self, model, args, train_pairs=None, eval_pairs=None, processing_class=None, reference=None, pad_token_id=None,
                 hooks: ModelHooks | None = None, **kwargs):
        if pad_token_id is None:
            pad_token_id = pad_id_of(processing_class)
        collator = PreferenceCollator(
            pad_id=pad_token_id,
            layout=args.batch_layout,
            score_prompt=args.nll_on_prompt,
            row_budget=args.row_budget,
            attention_cost=attention_cost_for(getattr(unwrap_model(model), "config", None)),
        )
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=PairDataset(train_pairs) if train_pairs is not None else None,
            eval_dataset=PairDataset(eval_pairs) if eval_pairs is not None and len(eval_pairs) else None,
            processing_class=processing_class,
            **kwargs,
        )
        self.reference = reference
        self.hooks = hooks if hooks is not None else (reft_hooks(model) or NO_HOOKS)
        # compute_loss already returns this micro-batch's share of the window loss
        self.loss_is_scaled_for_ga = True
        self._window: Window | None = None
        self._banks = {"train": _MetricBank(), "eval": _MetricBank()}
        self._last_log_time = time.perf_counter()
        self._nonfinite_steps = 0
        self.aux_coef = self._resolve_aux_coef(model, args)

    @staticmethod
    def _resolve_aux_coef(model, args) -> float:
        config = getattr(model, "config", None)
        if not getattr(config, "output_router_logits", False):
            return 0.0
        if args.router_aux_loss_coef is not None:
            return float(args.router_aux_loss_coef)
        return float(getattr(config, "router_aux_loss_coef", 0.001))

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train`` preceded by the memory preflight (see :mod:`preftune.reliability`)."""
        if self.args.memory_preflight and self.train_dataset is not None and len(self.train_dataset):
            from .reliability import memory_preflight

            memory_preflight(self, self.train_dataset.pairs)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # --- data ------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.args.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        from .sampling import EpochDataLoader, TokenBudgetBatchSampler

        sampler = TokenBudgetBatchSampler(
            self.train_dataset.lengths(),
            max_tokens=self.args.max_tokens_per_batch,
            seed=self.args.seed,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
        return EpochDataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = torch.tensor(
            [sum(float(b["num_pairs"]) for b in batch_samples), sum(float(b["num_nll_tokens"]) for b in batch_samples)],
            dtype=torch.float64,
            device=device,
        )
        n_proc = self.accelerator.num_processes
        if n_proc > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        # DDP averages gradients over processes, so each process's share is scaled up by n_proc
        self._window = Window(pairs=float(totals[0]) / n_proc, nll_tokens=max(float(totals[1]) / n_proc, 1.0))
        return batch_samples, num_items

    # --- loss --------------------------------------------------------------------------------
    def _objective(self, model, inputs, window: Window):
        seq = sequence_logps(model, inputs, chunk_size=self.args.logprob_chunk_size, cache_mb=self.args.logprob_cache_mb,
                             batch_context=self.hooks.batch_context)
        ref = self.reference(model, inputs) if self.reference is not None else None
        return compute_objective(self.args, seq, window, ref=ref, aux_coef=self.aux_coef)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        window = self._window if (mode == "train" and self._window is not None) else Window(
            pairs=float(inputs["num_pairs"]), nll_tokens=max(float(inputs["num_nll_tokens"]), 1.0)
        )
        result = self._objective(model, inputs, window)
        loss = result.loss
        if mode == "train" and not torch.isfinite(loss):
            loss = self._skip_nonfinite(loss, inputs)
        else:
            self._banks[mode].add(result, float(inputs["num_tokens"]))
        return (loss, result) if return_outputs else loss

    def _skip_nonfinite(self, loss, inputs):
        self._nonfinite_steps += 1
        ids = inputs["example_ids"].tolist()
        logger.warning("non-finite loss (%s) at step %d; skipping this micro-batch (example ids %s)", loss.item(), self.state.global_step, ids)
        if self._nonfinite_steps > self.args.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._nonfinite_steps} micro-batches had a non-finite loss (last at step {self.state.global_step}, example ids {ids}); "
                "lower --learning_rate, check those examples, or raise --max_nonfinite_steps"
            )
        # zero loss that still touches every trainable parameter (keeps DDP's reducer in step)
        return sum((p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad), torch.zeros((), device=loss.device))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --- saving ------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model; a model that saves only its own small parts (ReFT) does so here.

        Checkpoints (``_internal_call``) keep the full Trainer format so resuming works.
        """
        save_own = self.hooks.save_pretrained
        if save_own is None or _internal_call:
            return super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            save_own(output_dir or self.args.output_dir)

    # --- logging -------------------------------------------------------------------------------
    def _drain(self, mode: str) -> dict[str, float]:
        bank = self._banks[mode]
        keys = sorted(bank.sums)
        values = bank.as_tensor(keys, self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        values = values.tolist()
        sums = dict(zip(keys, values[: len(keys)]))
        pairs, nll_sum, nll_tokens, pref_sum, tokens = values[len(keys):]
        bank.reset()
        if pairs == 0:
            return {}
        out = {k: v / pairs for k, v in sums.items()}
        out["nll_loss"] = nll_sum / max(nll_tokens, 1.0)
        out["_loss"] = pref_sum / pairs + nll_weight(self.args) * out["nll_loss"]
        out["_tokens"] = tokens
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        if is_eval:
            metrics = self._drain("eval")
            if metrics:
                logs["eval_loss"] = metrics.pop("_loss")
                metrics.pop("_tokens")
                logs.update({f"eval_{k}": v for k, v in metrics.items()})
        elif "loss" in logs:
            metrics = self._drain("train")
            if metrics:
                metrics.pop("_loss")
                now = time.perf_counter()
                tokens = metrics.pop("_tokens")
                logs["tokens_per_second"] = tokens / max(now - self._last_log_time, 1e-9)
                self._last_log_time = now
                logs.update(metrics)
        super().log(logs, start_time)

