"""Per-token log-probabilities through the LM head, without materialising all logits.

Given hidden states ``h`` of the *scored* positions only, shape ``(N, H)``, the LM head weight
``W`` ``(V, H)`` (and optional bias ``b`` ``(V,)``) and the target token ids ``y`` ``(N,)``::

    z      = h W^T + b                                   (N, V)  raw logits
    l      = transform(z)                                (N, V)  scaled / soft-capped logits
    logp_n = l[n, y_n] - logsumexp_v l[n, v]              (N,)

``transform`` covers the model families that post-process logits:

* ``scale`` (Cohere ``logit_scale``; Granite ``1 / logits_scaling``):  ``l = s * z``
* ``softcap`` (Gemma 2/3 ``final_logit_softcapping``):  ``l = c * tanh(z / c)``

:class:`ChunkedLinearLogProbs` processes ``chunk_size`` rows at a time, so peak extra memory is
``O(chunk_size * V)`` instead of ``O(N * V)``. Its backward recomputes each chunk's logits
(one extra ``(chunk, H) x (H, V)`` matmul per chunk), unless the caller let it keep the forward's
``(N, V)`` softmax (``cache_mb`` of :func:`chunked_token_logps`; ``--logprob_cache_mb``), and uses::

    d logp_n / d l[n, v] = 1[v = y_n] - softmax(l[n])_v

Precision: ``z`` is accumulated into a float32 buffer and the softmax, log-probs and loss stay
float32. The matmuls run in ``compute_dtype``: float32 by default (also for bf16 weights), or
bf16/fp16 under mixed precision (the engine passes autocast's dtype), where, as in any autocast
forward, the logits are rounded to that dtype before the float32 softmax.

The plain function :func:`reference_token_logps` computes the same thing the obvious way (all
``(N, V)`` logits, then ``log_softmax``); only the tests use it, as the reference. The engine's
other paths are its own (:mod:`preftune.engine`): a head that is not a plain ``nn.Linear`` (LoRA,
quantized, DeepSpeed ZeRO-3 partitioned) is called chunk by chunk under activation
checkpointing, and model types off the fast path take their logits from the full model forward.

On request the forward also returns, without gradient, ``log Σ_v p_v²`` per row (``p`` the
softmax of ``l``): WPO's weights need it (:func:`preftune.losses.wpo_weights`), and the softmax
is already in the buffer, so it costs one reduction per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear_kernel import cast_weight, linear, onednn_applies

__all__ = ["LogitTransform", "ChunkedLinearLogProbs", "chunk_rows", "chunked_token_logps", "reference_token_logps", "log_sum_sq_probs"]

DEFAULT_CHUNK_SIZE = 0
"""``chunk_size`` 0 means "choose by the vocabulary" (:func:`chunk_rows`)."""
AUTO_CHUNK_BYTES = 128 * 2**20
AUTO_CHUNK_ROWS = (256, 1024)


def chunk_rows(chunk_size: int, vocab: int) -> int:
    """Rows per LM-head chunk: ``chunk_size`` when positive; for 0, the rows whose float32 logits
    take about :data:`AUTO_CHUNK_BYTES` (128 MiB), kept within 256..1024.

    Why by bytes: the chunk's ``(rows, V)`` buffer is live at the top of the activation stack, so
    it adds to the step's peak. At a 152k vocabulary (Qwen2) 1024 rows are 622 MB and 256 rows
    155 MB, and the head ran as fast at 256 rows as at 1024 on this project's CPU (fp32 and bf16,
    ``(660, 896)`` hidden states); below 256 rows it slowed down. A 32k vocabulary keeps 1024.
    """
    if chunk_size > 0:
        return chunk_size
    lo, hi = AUTO_CHUNK_ROWS
    return max(lo, min(hi, AUTO_CHUNK_BYTES // (4 * max(vocab, 1))))


@dataclass(frozen=True)
class LogitTransform:
    """Post-processing applied to raw logits ``z``: ``l = softcap(scale * z)``.

    ``scale`` 1.0 and ``softcap`` None mean "plain logits".
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform):
    """Return (raw logits z, transformed logits l) for one chunk; z is needed for the softcap grad."""
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z, tf.apply(z)


def _logits_into(dst: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``transform(h @ weight.T + bias)`` into the float32 ``dst`` ``(c, V)`` in place (no new
    (c, V) tensor). ``h`` and ``weight`` are in the compute dtype; below float32 the product goes
    through ``scratch`` (a ``(>= c, V)`` buffer of that dtype: CPU matmuls have no float32 output
    for bf16 inputs)."""
    if h.dtype == dst.dtype:
        torch.mm(h, weight.t(), out=dst)
    else:
        dst.copy_(torch.mm(h, weight.t(), out=scratch[: h.shape[0]]))
    if bias is not None:
        dst.add_(bias)
    return _transform_(dst, tf)


def _transform_(z: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    """``z = transform(z)`` in place (scale, then soft-cap)."""
    if tf.scale != 1.0:
        z.mul_(tf.scale)
    if tf.softcap is not None:
        z.div_(tf.softcap).tanh_().mul_(tf.softcap)
    return z


def _fresh_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> bool:
    """Whether each chunk's float32 logits come new from oneDNN's matmul (:mod:`preftune.linear_kernel`:
    20-40 percent faster than ``mm`` into a buffer at a 152k vocabulary on this project's CPU) instead
    of being written into one reused buffer. The peak is the same: one chunk's logits at a time."""
    return compute_dtype == torch.float32 and onednn_applies(hidden[:1].float(), weight, bias)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform, buf: torch.Tensor | None,
                  scratch: torch.Tensor | None) -> torch.Tensor:
    """float32 ``transform(h W^T + b)`` ``(c, V)`` of one chunk: into ``buf[:c]`` when a buffer is
    given, else a new tensor from oneDNN (see :func:`_fresh_logits`)."""
    if buf is None:
        return _transform_(linear(h, weight, bias), tf)
    return _logits_into(buf[: h.shape[0]], h, weight, bias, tf, scratch)


def _input_directions_into(dst: torch.Tensor, probs: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    """``J = d logp / d h`` ``(c, H)`` float32 of one chunk, from its float32 softmax ``probs``
    ``(c, V)`` (overwritten when the transform is not the identity); ``h``/``weight`` in the
    compute dtype.

    Plain logits: ``J_n = W[y_n] - p_n W``. Transformed logits ``l = T(z)``: ``J_n = ((e_{y_n} - p_n)
    * T'(z_n)) W`` with ``T'(z) = scale (1 - tanh^2(scale z / cap))`` (the soft-cap's ``z`` is
    recomputed: the buffer holds the softmax by now). The recomputing backward's formula without
    the upstream gradient ``g_n``, which multiplies ``J_n`` in the backward."""
    if tf.is_identity:
        if h.dtype == torch.float32:
            torch.mm(probs, weight, out=dst)
        else:
            dst.copy_(torch.mm(probs.to(h.dtype), weight))
        return dst.neg_().add_(weight.index_select(0, targets).float())
    grad_l = probs.neg_()
    grad_l.scatter_add_(1, targets[:, None], torch.ones_like(grad_l[:, :1]))
    _times_transform_derivative(grad_l, h, weight, bias, tf)
    dst.copy_(torch.mm(grad_l.to(h.dtype), weight))
    return dst


def _times_transform_derivative(grad_l: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                tf: LogitTransform) -> torch.Tensor:
    """``grad_l *= d l / d z`` in place for ``l = cap * tanh(scale z / cap)`` (``scale (1 -
    tanh^2)``; the soft-cap's ``z = h W^T + b`` is recomputed) or ``l = scale z``."""
    if tf.softcap is not None:
        z = torch.mm(h, weight.t()).float()
        if bias is not None:
            z.add_(bias)
        t = z.mul_(tf.scale / tf.softcap).tanh_()
        grad_l.mul_(t.mul_(t).neg_().add_(1.0))
    if tf.scale != 1.0:
        grad_l.mul_(tf.scale)
    return grad_l


SOFTMAX_BLOCK_BYTES = 8 * 2**20
"""Rows of a chunk's logits processed together by the elementwise passes (:func:`_softmax_inplace`,
:func:`_probs_from_logits_`): the softmax is five passes (max, subtract, exp, sum, divide), and
over a whole ``(c, V)`` chunk (128 MiB and more) each pass goes out to memory, while over a block
of about 8 MiB the later passes find it in cache. Measured at ``(1264, 32000)`` float32 on this
project's CPU: 40 ms over the whole chunk, 28 ms in blocks of 64 rows (8 MiB), 33 ms in blocks of
4 rows. Each row goes through the same operations either way."""


def _row_blocks(x: torch.Tensor):
    """``x`` ``(c, V)`` in blocks of rows of about :data:`SOFTMAX_BLOCK_BYTES` (views)."""
    return x.split(max(1, SOFTMAX_BLOCK_BYTES // max(1, x.shape[1] * x.element_size())))


def _softmax_inplace(logits: torch.Tensor) -> torch.Tensor:
    """Turn ``logits`` ``(c, V)`` into softmax probabilities in place, block of rows by block of
    rows (:data:`SOFTMAX_BLOCK_BYTES`); return logsumexp ``(c,)``."""
    lse = []
    for block in _row_blocks(logits):
        m = block.amax(dim=1, keepdim=True)
        block.sub_(m).exp_()
        total = block.sum(dim=1, keepdim=True)
        block.div_(total)
        lse.append(total.log_().add_(m).squeeze(1))
    return lse[0] if len(lse) == 1 else torch.cat(lse)


def _probs_from_logits_(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(logits - lse)`` in place, by blocks of rows: the softmax again from recomputed logits
    ``(c, V)`` and the forward's logsumexp ``(c,)``."""
    blocks = _row_blocks(logits)
    for block, block_lse in zip(blocks, lse.split(blocks[0].shape[0])):
        block.sub_(block_lse[:, None]).exp_()
    return logits


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Autograd function: ``(h (N,H), W (V,H), b (V,)|None, y (N,)) -> logp (N,)``, chunked.

    Matmuls in ``compute_dtype`` (float32 unless mixed precision asks for bf16/fp16), logits
    accumulated, soft-maxed and differentiated in float32 (the logits of a 32k-256k vocabulary
    in bf16 lose the log-prob's third digit); gradients are returned in the inputs' dtypes.
    Autocast is switched off inside: every dtype here is explicit.

    Memory: one reusable ``(chunk, V)`` float32 buffer, softmax computed in place. When only
    ``hidden`` needs a gradient (a frozen head: LoRA, ReFT), the forward also computes
    ``J = d logp / d hidden`` ``(N, H)`` from each chunk's softmax while it is in the buffer and
    keeps only that: the backward is ``g * J``, with no logits recomputed and no ``(N, V)`` kept
    (the same FLOPs as the backward's own ``p W``, moved forward). When the head trains and
    ``cache_probs`` is set (the caller checked ``N x V`` fits its budget), the forward keeps the
    ``(N, V)`` softmax, in ``compute_dtype``, so the backward skips recomputing the logits (one
    matmul of three saved).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size, cache_probs=False, with_log_sum_sq=False,
                compute_dtype=torch.float32):  # noqa: D401
        ctx.hidden_dtype = hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            n, vocab = hidden.shape[0], weight.shape[0]
            out = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
            log_sum_sq = torch.empty(n if with_log_sum_sq else 0, dtype=torch.float32, device=hidden.device)
            w = cast_weight(weight, compute_dtype)  # a frozen head's kept cast under --linear_kernel auto
            b = bias.float() if bias is not None else None
            rows = min(chunk_size, n)
            full = compute_dtype == torch.float32
            # Frozen head (LoRA, ReFT, a frozen tied embedding): the backward needs only grad_h, and
            # d logp_n / d h_n does not depend on the upstream gradient g_n, so it is computed here,
            # from the softmax already in the buffer, and the backward is grad_h = g * J; there is
            # then no softmax to keep.
            frozen_head = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] and not (bias is not None and ctx.needs_input_grad[2])
            directions = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if frozen_head else None
            cache_probs = cache_probs and not frozen_head
            probs = torch.empty(n, vocab, dtype=compute_dtype, device=hidden.device) if cache_probs else None
            # a float32 cache is itself the buffer; oneDNN's logits come new per chunk; otherwise
            # soft-max in float32 in one reused buffer (then keep it rounded)
            cache_is_buffer = cache_probs and full
            fresh = not cache_is_buffer and _fresh_logits(hidden, w, b, compute_dtype)
            buf = None if cache_is_buffer or fresh else torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            scratch = None if full else torch.empty(rows, vocab, dtype=compute_dtype, device=hidden.device)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h_c = hidden[start:end].to(compute_dtype)
                if cache_is_buffer:
                    dst = _logits_into(probs[start:end], h_c, w, b, transform)
                else:
                    dst = _chunk_logits(h_c, w, b, transform, buf, scratch)
                target_logit = dst.gather(1, targets[start:end, None]).squeeze(1)
                lse = _softmax_inplace(dst)
                out[start:end] = target_logit - lse
                lse_all[start:end] = lse
                if with_log_sum_sq:  # log Σ p² = 2 log ||p||_2, from the float32 softmax
                    log_sum_sq[start:end] = torch.linalg.vector_norm(dst, dim=1).log_().mul_(2.0)
                if cache_probs and buf is not None:
                    probs[start:end].copy_(dst)
                if directions is not None:
                    _input_directions_into(directions[start:end], dst, h_c, w, b, targets[start:end], transform)
                del dst  # a new chunk's logits are allocated next: never two at once
        if directions is not None:
            ctx.save_for_backward(directions)
            ctx.directions = True
            ctx.mark_non_differentiable(log_sum_sq)
            return out, log_sum_sq
        ctx.directions = False
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, probs)
        ctx.transform = transform
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = compute_dtype
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(log_sum_sq)
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_log_sum_sq=None):
        with torch.autocast(grad_out.device.type, enabled=False):
            return ChunkedLinearLogProbs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.directions:  # frozen head: grad_h_n = g_n * J_n (J from the forward)
            (directions,) = ctx.saved_tensors
            grad_h = (directions * grad_out.float()[:, None]).to(ctx.hidden_dtype)
            return (grad_h,) + (None,) * 8
        hidden, weight, bias, targets, lse_all, probs = ctx.saved_tensors
        tf: LogitTransform = ctx.transform
        cdt = ctx.compute_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        w = cast_weight(weight, cdt)
        b = bias.float() if bias is not None else None
        grad_h = torch.empty_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        g_all = grad_out.float()
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = min(ctx.chunk_size, n)
        fresh = probs is None and _fresh_logits(hidden, w, b, cdt)
        buf = None if (probs is not None and tf.is_identity) or fresh else torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        scratch = None if cdt == torch.float32 or buf is None else torch.empty(rows, vocab, dtype=cdt, device=hidden.device)
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            p = p_c = grad_l = grad_l_c = None  # the last chunk's (c, V) tensors go before this chunk's are made
            h = hidden[start:end].to(cdt)
            g = g_all[start:end]  # (c,)
            y = targets[start:end]
            if probs is not None:
                p = probs[start:end]
            else:  # recompute the softmax of this chunk (into the buffer, or new from oneDNN)
                p = _probs_from_logits_(_chunk_logits(h, w, b, tf, buf, scratch), lse_all[start:end])
            if tf.is_identity:
                # d logp_n / d l = onehot(y_n) - p_n. Factored so no (c, V) elementwise pass is needed:
                #   grad_h = g * (W[y] - p W),   grad_W = -p^T (g h) + sum_n g_n e_{y_n} h_n^T,   grad_b = -p^T g + scatter(g)
                p_c = p.to(cdt)
                gh = h.float() * g[:, None]  # (c, H)
                if need_h:
                    out = grad_h[start:end]
                    if cdt == torch.float32:
                        torch.mm(p_c, w, out=out)
                    else:
                        out.copy_(torch.mm(p_c, w))
                    out.neg_().add_(w.index_select(0, y).float()).mul_(g[:, None])
                if need_w:
                    if cdt == torch.float32:
                        grad_w.addmm_(p_c.t(), gh, alpha=-1.0)
                    else:
                        grad_w.sub_(torch.mm(p_c.t(), gh.to(cdt)))
                    grad_w.index_add_(0, y, gh)
                if need_b:
                    grad_b.sub_(p_c.float().t().mv(g))
                    grad_b.index_add_(0, y, g)
                continue
            # scaled / soft-capped logits: the chain rule is elementwise over the vocabulary (float32)
            p = p.float()
            grad_l = torch.mul(p, -g[:, None], out=p if probs is None else None)  # (c, V)
            grad_l.scatter_add_(1, y[:, None], g[:, None])
            _times_transform_derivative(grad_l, h, w, b, tf)
            grad_l_c = grad_l.to(cdt)
            if need_h:
                grad_h[start:end] = torch.mm(grad_l_c, w)
            if need_w:
                grad_w.add_(torch.mm(grad_l_c.t(), h))
            if need_b:
                grad_b += grad_l.sum(0)
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cache_mb: float = 0.0,
    with_log_sum_sq: bool = False,
    compute_dtype: torch.dtype = torch.float32,
):
    """Log-prob of ``targets`` ``(N,)`` under ``transform(hidden @ weight.T + bias)``; returns ``(N,)`` float32.

    With gradients disabled (evaluation, reference models) this runs the forward loop only.
    ``cache_mb``: when gradients are needed and the ``(N, V)`` softmax (in ``compute_dtype``)
    fits in this many MiB, keep it from the forward instead of recomputing the logits in the
    backward. ``with_log_sum_sq``: return ``(logp, log Σ_v p_v²)``, the second ``(N,)`` without
    gradient. ``compute_dtype``: the matmuls' dtype (see the module docstring).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if with_log_sum_sq else empty
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: auto), got {chunk_size}")
    chunk_size = chunk_rows(chunk_size, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    itemsize = torch.empty(0, dtype=compute_dtype).element_size()
    cache = needs_grad and hidden.shape[0] * weight.shape[0] * itemsize <= cache_mb * 2**20
    logp, log_sum_sq = ChunkedLinearLogProbs.apply(hidden, weight, bias, targets, transform, chunk_size, cache, with_log_sum_sq,
                                                   compute_dtype)
    return (logp, log_sum_sq) if with_log_sum_sq else logp


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log Σ_v softmax(l)_v²`` per row of ``logits`` ``(N, V)``: ``logsumexp(2l) − 2 logsumexp(l)``."""
    logits = logits.float()
    return torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * torch.logsumexp(logits, dim=-1)


def reference_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
) -> torch.Tensor:
    """Plain-path equivalent of :func:`chunked_token_logps`: full ``(N, V)`` logits, then gather."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = transform.apply(logits)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
