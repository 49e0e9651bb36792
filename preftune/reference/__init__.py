"""Reference log-probs for DPO: three ways to get ``log ref(y|x)`` without building gradients.

:func:`build_reference` returns a callable ``reference(policy, batch) -> (chosen_sum, rejected_sum)``
(two ``(B,)`` float32 tensors of **summed** completion log-probs on the batch's device) that
:class:`preftune.trainer.PreferenceTrainer` calls after the policy forward. Which one it builds:

1. **A separate frozen model** (:class:`ModelReference`). ``--ref_model_name_or_path`` is loaded
   with :func:`preftune.training_model.load_model` (same dtype and quantization as the policy); without
   it, a full fine-tune uses a deep copy of the *starting* policy. Eval mode,
   ``requires_grad=False``, run under ``torch.no_grad()``. Costs one more copy of the weights.
2. **The PEFT base with adapters disabled** (:class:`ModelReference` with ``adapters_off``). When
   the policy is a ``peft.PeftModel`` (LoRA, DoRA, QLoRA) and no ``--ref_model_name_or_path`` is
   given, the reference is the policy itself inside ``with model.disable_adapter():``, in eval
   mode. No second copy in memory; one extra forward per step.
3. **Precomputed** (:class:`PrecomputedReference`, ``--precompute_ref_log_probs``). Before
   training, one forward-only pass of the reference chosen by 1/2 over the train and eval pairs
   (the same forward-only scorer as evaluation, :func:`preftune.engine.score_pairs`,
   ``per_device_eval_batch_size`` pairs per batch) fills a table keyed by ``example_id``. The pass
   runs under the run's mixed precision (``--bf16``, as the trainer's forward does), so at step 0
   the table equals the policy's log-probs and DPO's rewards start at 0. Training then costs no
   reference forward and no reference weights (a separate reference model is released after the
   pass).

The precomputed table is cached at ``output_dir/ref_logps/<fingerprint>.safetensors``. The
fingerprint is a sha256 over (see :func:`reference_fingerprint`):

* the reference model's identity: its name/path and config, plus a sample of every weight tensor
  (an in-memory policy: 256 evenly spaced values of each frozen parameter) or of every weight
  file (a ``--ref_model_name_or_path`` folder: size and three 1 MiB slices of each file, so the
  cache is checked without loading the model);
* the tokenized pairs (:meth:`preftune.data.store.TokenizedPairs.digest`: the content keys of
  their stores, i.e. tokenized-cache fingerprints over data, tokenizer and chat template, plus
  every example id and truncated length; order-independent), which captures
  every tokenization setting (``max_length``, truncation, chat template, tokenizer);
* the engine settings that change the numbers: dtype, attention kernel, quantization, layout,
  and bf16/fp16 mixed precision when it is on.

A later run with the same fingerprint (including ``--resume_from_checkpoint``, which rebuilds the
starting model before loading the checkpoint) reads the file instead of running the model. Any
change gives another file name, so a stale table is never read; a file whose stored fingerprint
or example ids do not match, or whose values differ from the xxh3-128 digest written with them in
its metadata (a flipped byte: :func:`check_cache_file`), is recomputed and replaced. Files are
written to a temporary name and ``os.replace``-d into place, so a reader never sees half a file.

Multi-process runs (DDP): every process loads the cache or, on a miss, computes the whole table
itself (no collective calls, so no barrier can time out during a long pass); only process 0
writes the file.

The package: :mod:`.models` (the on-the-fly callables), :mod:`.cache` (the precomputed table, its
fingerprint and cache file) and :mod:`.build` (which reference a run gets).
"""

from .build import build_reference
from .cache import PrecomputedReference, check_cache_file, compute_reference_table, model_digest, pairs_digest, reference_fingerprint
from .models import ModelReference, ReferenceFn

__all__ = [
    "build_reference", "ModelReference", "ReferenceFn", "PrecomputedReference", "compute_reference_table",
    "reference_fingerprint", "pairs_digest", "model_digest", "check_cache_file",
]
