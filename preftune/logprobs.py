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

__all__ = ["LogitTransform", "ChunkedLinearLogProbs", "chunked_token_logps", "reference_token_logps", "log_sum_sq_probs"]

DEFAULT_CHUNK_SIZE = 1024


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


def _logits_into(dst: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform) -> torch.Tensor:
    """Write ``transform(h @ weight.T + bias)`` into ``dst`` ``(c, V)`` in place (no new (c, V) tensor)."""
    torch.mm(h, weight.t(), out=dst)
    if bias is not None:
        dst.add_(bias)
    if tf.scale != 1.0:
        dst.mul_(tf.scale)
    if tf.softcap is not None:
        dst.div_(tf.softcap).tanh_().mul_(tf.softcap)
    return dst


def _softmax_inplace(logits: torch.Tensor) -> torch.Tensor:
    """Turn ``logits`` ``(c, V)`` into softmax probabilities in place; return logsumexp ``(c,)``."""
    m = logits.amax(dim=1, keepdim=True)
    logits.sub_(m).exp_()
    total = logits.sum(dim=1, keepdim=True)
    logits.div_(total)
    return total.log_().add_(m).squeeze(1)


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Autograd function: ``(h (N,H), W (V,H), b (V,)|None, y (N,)) -> logp (N,)``, chunked.

    Computation is done in float32 for numerical safety when inputs are bf16/fp16 (the logits
    of a 32k-256k vocabulary in bf16 lose the log-prob's third digit); results are cast back.

    Memory: one reusable ``(chunk, V)`` float32 buffer, softmax computed in place. When
    ``cache_probs`` is set (the caller checked ``N x V`` fits its budget), the forward keeps the
    ``(N, V)`` softmax so the backward skips recomputing the logits (one matmul of three saved).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size, cache_probs=False, with_log_sum_sq=False):  # noqa: D401
        n, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_sum_sq = torch.empty(n if with_log_sum_sq else 0, dtype=torch.float32, device=hidden.device)
        w = weight.float()
        b = bias.float() if bias is not None else None
        probs = torch.empty(n, vocab, dtype=torch.float32, device=hidden.device) if cache_probs else None
        buf = None if cache_probs else torch.empty(min(chunk_size, n), vocab, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            dst = probs[start:end] if cache_probs else buf[: end - start]
            _logits_into(dst, hidden[start:end].float(), w, b, transform)
            target_logit = dst.gather(1, targets[start:end, None]).squeeze(1)
            lse = _softmax_inplace(dst)
            out[start:end] = target_logit - lse
            lse_all[start:end] = lse
            if with_log_sum_sq:  # log Σ p² = 2 log ||p||_2
                log_sum_sq[start:end] = torch.linalg.vector_norm(dst, dim=1).log_().mul_(2.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, probs)
        ctx.transform = transform
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(log_sum_sq)
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_log_sum_sq=None):
        hidden, weight, bias, targets, lse_all, probs = ctx.saved_tensors
        tf: LogitTransform = ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        w = weight.float()
        b = bias.float() if bias is not None else None
        grad_h = torch.empty_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        g_all = grad_out.float()
        n, vocab = hidden.shape[0], weight.shape[0]
        buf = None if probs is not None and tf.is_identity else torch.empty(min(ctx.chunk_size, n), vocab, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end].float()
            g = g_all[start:end]  # (c,)
            y = targets[start:end]
            if probs is not None:
                p = probs[start:end]
            else:  # recompute the softmax of this chunk into the buffer
                p = _logits_into(buf[: end - start], h, w, b, tf).sub_(lse_all[start:end, None]).exp_()
            if tf.is_identity:
                # d logp_n / d l = onehot(y_n) - p_n. Factored so no (c, V) elementwise pass is needed:
                #   grad_h = g * (W[y] - p W),   grad_W = -p^T (g h) + sum_n g_n e_{y_n} h_n^T,   grad_b = -p^T g + scatter(g)
                gh = h * g[:, None]  # (c, H)
                if need_h:
                    out = grad_h[start:end]
                    torch.mm(p, w, out=out)
                    out.neg_().add_(w.index_select(0, y)).mul_(g[:, None])
                if need_w:
                    grad_w.addmm_(p.t(), gh, alpha=-1.0)
                    grad_w.index_add_(0, y, gh)
                if need_b:
                    grad_b.sub_(p.t().mv(g))
                    grad_b.index_add_(0, y, g)
                continue
            # scaled / soft-capped logits: the chain rule is elementwise over the vocabulary
            grad_l = torch.mul(p, -g[:, None], out=p if probs is None else None)  # (c, V)
            grad_l.scatter_add_(1, y[:, None], g[:, None])
            if tf.softcap is not None:  # l = cap * tanh(scale z / cap): d l / d (scale z) = 1 - tanh^2
                z = torch.mm(h, w.t())
                if b is not None:
                    z.add_(b)
                t = z.mul_(tf.scale / tf.softcap).tanh_()
                grad_l.mul_(t.mul_(t).neg_().add_(1.0))
            if tf.scale != 1.0:
                grad_l.mul_(tf.scale)
            if need_h:
                torch.mm(grad_l, w, out=grad_h[start:end])
            if need_w:
                grad_w.addmm_(grad_l.t(), h)
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
):
    """Log-prob of ``targets`` ``(N,)`` under ``transform(hidden @ weight.T + bias)``; returns ``(N,)`` float32.

    With gradients disabled (evaluation, reference models) this runs the forward loop only.
    ``cache_mb``: when gradients are needed and the ``(N, V)`` float32 softmax fits in this many
    MiB, keep it from the forward instead of recomputing the logits in the backward.
    ``with_log_sum_sq``: return ``(logp, log Σ_v p_v²)``, the second ``(N,)`` without gradient.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if with_log_sum_sq else empty
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    cache = needs_grad and hidden.shape[0] * weight.shape[0] * 4 <= cache_mb * 2**20
    logp, log_sum_sq = ChunkedLinearLogProbs.apply(hidden, weight, bias, targets, transform, chunk_size, cache, with_log_sum_sq)
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
