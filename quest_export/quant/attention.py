"""Quantized attention through diffusers' official hook, ``set_attn_processor`` (quest.md 2.6).

The processor computes attention explicitly, because fused SDPA cannot expose the softmax
probabilities. Its quantizers are registered submodules of each ``Attention`` module (fixed
names below), so they are in ``state_dict`` and an optimizer sees them:

    input_quantizer     the tensor read by to_q (and by to_k/to_v in self-attention), when siblings share
    context_quantizer   the conditioning read by to_k/to_v in cross-attention, when siblings share
    q_quantizer, k_quantizer, v_quantizer   Q, K, V after the head split: (B*heads, L, d)
    p_quantizer         softmax probabilities P (unsigned, zero-anchored): (B*heads, L_q, L_k)
"""

from __future__ import annotations

import torch

ATTN_QUANTIZERS = ("input_quantizer", "context_quantizer", "q_quantizer", "k_quantizer", "v_quantizer", "p_quantizer")


def _maybe(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    q = getattr(attn, name, None)
    return x if q is None else q(x)


def _active(attn, names: tuple[str, ...]) -> bool:
    """Whether any of these quantizers of ``attn`` exists and is switched on."""
    return any(getattr(getattr(attn, n, None), "enabled", False) for n in names)


class QuantAttnProcessor:
    """Attention with quantizers on its operands; float everywhere a quantizer is absent.

    Q = to_q(x), K = to_k(ctx), V = to_v(ctx)            (B, L, heads * d)
    S = (Q_hat K_hat^T) * d^-1/2 ; P = softmax(S) in FP32  (B * heads, L_q, L_k)
    O = P_hat V_hat ; out = to_out[0](O)
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):  # fmt: skip
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        batch_size, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        hidden_states = _maybe(attn, "input_quantizer", hidden_states)  # shared by to_q (and to_k/to_v)
        query = attn.to_q(hidden_states)  # (B, L_q, heads * d)
        if self_attention:
            context = hidden_states
        else:
            context = (
                attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
            )
            context = _maybe(attn, "context_quantizer", context)
        key = attn.to_k(context)  # (B, L_k, heads * d)
        value = attn.to_v(context)

        query = _maybe(attn, "q_quantizer", attn.head_to_batch_dim(query))  # (B * heads, L_q, d)
        key = _maybe(attn, "k_quantizer", attn.head_to_batch_dim(key))  # (B * heads, L_k, d)
        value = _maybe(attn, "v_quantizer", attn.head_to_batch_dim(value))  # (B * heads, L_k, d)

        if query.is_cuda and attention_mask is None and not _active(attn, ("q_quantizer", "k_quantizer", "v_quantizer",
                                                                         "p_quantizer")):  # fmt: skip
            # float attention on a GPU: fused SDPA never materialises the (B * heads, L_q, L_k) probabilities,
            # 537 MB per row at SD's 4096 latent tokens (issue 15); the explicit form below is the exported one
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        else:
            scores = torch.bmm(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (B * heads, L_q, L_k)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            probs = _maybe(attn, "p_quantizer", probs).to(query.dtype)
            out = torch.bmm(probs, value)  # (B * heads, L_q, d)
        out = attn.batch_to_head_dim(out)  # (B, L_q, heads * d)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
