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
(one extra ``(chunk, H) x (H, V)`` matmul per chunk) and uses::

    d logp_n / d l[n, v] = 1[v = y_n] - softmax(l[n])_v

The plain function :func:`reference_token_logps` computes the same thing the obvious way and is
used by the equivalence tests and as the fallback path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogitTransform", "ChunkedLinearLogProbs", "chunked_token_logps", "reference_token_logps"]

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


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Autograd function: ``(h (N,H), W (V,H), b (V,)|None, y (N,)) -> logp (N,)``, chunked.

    Computation is done in float32 for numerical safety when inputs are bf16/fp16 (the logits
    of a 32k-256k vocabulary in bf16 lose the log-prob's third digit); results are cast back.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size):  # noqa: D401
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w = weight.float()
        b = bias.float() if bias is not None else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            _, logits = _chunk_logits(hidden[start:end].float(), w, b, transform)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse
            lse_all[start:end] = lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.transform = transform
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        tf: LogitTransform = ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        w = weight.float()
        b = bias.float() if bias is not None else None
        grad_h = torch.empty_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        g_all = grad_out.float()
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end].float()
            g = g_all[start:end]  # (c,)
            z, logits = _chunk_logits(h, w, b, tf)
            # d logp / d l = onehot(y) - softmax(l), times upstream grad g
            grad_l = torch.exp(logits - lse_all[start:end, None]).mul_(-g[:, None])  # (c, V)
            grad_l.scatter_add_(1, targets[start:end, None], g[:, None])
            # chain through transform: l = softcap(scale * z)
            if tf.softcap is not None:
                t = torch.tanh(z * tf.scale / tf.softcap)
                grad_l = grad_l * (1 - t * t)
            if tf.scale != 1.0:
                grad_l = grad_l * tf.scale
            if need_h:
                grad_h[start:end] = grad_l @ w
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
        )


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-prob of ``targets`` ``(N,)`` under ``transform(hidden @ weight.T + bias)``; returns ``(N,)`` float32.

    With gradients disabled (evaluation, reference models) this runs the forward loop only.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedLinearLogProbs.apply(hidden, weight, bias, targets, transform, chunk_size)


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
