"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over flattened tokens.

Module names match Hugging Face's, so HF and GPTQ state dicts load by name:
    model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj,
    model.layers.{i}.{input,post_attention}_layernorm, model.norm, lm_head (tied to embed_tokens or not).

Shapes: T = tokens of all sequences in the step, H = hidden_size, V = vocab_size.
Linear layers are created by a factory so the loader can put QuantLinear where a checkpoint has
packed weights. Attention state lives outside the model: see `server.models.attention`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quant.sums import Sums, as_tensor
from server.models.attention import AttentionBackend
from server.models.config import LlamaConfig
from server.models.fused import rms_norm, rotary_, silu_mul
from server.models.qkv_reader import qkv_rotary
from server.models.rope import RotaryEmbedding

# (in_features, out_features, bias, qualified name) -> module computing x @ W^T + b
LinearFactory = Callable[[int, int, bool, str], nn.Module]


def project(linear: nn.Module, x: torch.Tensor, columns: bool = False) -> torch.Tensor | Sums:
    """linear(x), or its unconverted Sums where the layer can leave them (QuantLinear.forward_sums:
    decode-sized calls on the CUDA kernels); the caller hands the result to a kernel that takes Sums
    (server.models.fused, qkv_reader) or to as_tensor. columns: that kernel reads sums in the
    [column][token slot] layout as they are (the q/k/v and SwiGLU readers; the RMSNorm transposes
    them first, one more kernel), so the layer may prefer a matmul that leaves them so."""
    forward_sums = getattr(linear, "forward_sums", None)
    return linear(x) if forward_sums is None else forward_sums(x, columns=columns)


def dense_linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor | Sums,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, H] -> (normed, residual stream); with `residual`, x is added to it first. x may be
        a matmul's unconverted Sums (converted here)."""
        return rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, linear: LinearFactory, prefix: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, b = config.hidden_size, config.attention_bias
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.q_proj = linear(h, config.q_size, b, f"{prefix}.q_proj")
        self.k_proj = linear(h, config.kv_size, b, f"{prefix}.k_proj")
        self.v_proj = linear(h, config.kv_size, b, f"{prefix}.v_proj")
        self.o_proj = linear(config.q_size, h, config.o_proj_bias, f"{prefix}.o_proj")
        self.qkv_proj: nn.Module | None = None  # set by fuse(): q, k, v in one matmul

    def fuse(self) -> bool:
        from server.models.fusion import concat_linears

        fused = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        return as_tensor(self.out(self.mix(x, cos, sin, attn)))

    def out(self, o: torch.Tensor) -> torch.Tensor | Sums:
        """o_proj; its output may stay unconverted (Sums) for the norm after it."""
        return project(self.o_proj, o)

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            attn: AttentionBackend) -> torch.Tensor:
        """Everything before o_proj: normed x [T, H] -> attention output [T, q_size]."""
        t = x.shape[0]
        if self.qkv_proj is not None:
            # [T, q_size + 2 * kv_size], possibly unconverted: qkv_rotary converts it as it rotates,
            # and may store k and v in the attention's cache in the same kernel
            slots = getattr(attn, "kv_slots", None)
            qkv = project(self.qkv_proj, x, columns=True)
            q, k, v = qkv_rotary(qkv, self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                                 slots(self.layer_idx) if slots else None)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
            q, k = rotary_(q, k, cos, sin)
        o = attn(self.layer_idx, q, k, v)  # [T, n_heads, head_dim]
        return o.reshape(t, self.num_heads * self.head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory, prefix: str) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = linear(h, i, b, f"{prefix}.gate_proj")
        self.up_proj = linear(h, i, b, f"{prefix}.up_proj")
        self.down_proj = linear(i, h, b, f"{prefix}.down_proj")
        self.gate_up_proj: nn.Module | None = None  # set by fuse(): gate and up in one matmul

    def fuse(self) -> bool:
        from server.models.fusion import concat_linears

        fused = concat_linears([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_tensor(self.down(self.act(x)))

    def down(self, h: torch.Tensor) -> torch.Tensor | Sums:
        """down_proj; its output may stay unconverted (Sums) for the norm after it."""
        return project(self.down_proj, h)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before down_proj: normed x [T, H] -> silu(gate(x)) * up(x) [T, I]."""
        if self.gate_up_proj is not None:
            return silu_mul(project(self.gate_up_proj, x, columns=True))
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, linear: LinearFactory) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(config, layer_idx, linear, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, linear, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor | Sums, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, attn: AttentionBackend,
                keep_sums: bool = False) -> tuple[torch.Tensor | Sums, torch.Tensor]:
        """(x [T, H], residual stream [T, H] or None for the first layer) -> (x, residual).

        The residual add is fused into the following norm, so a layer's output is the pair. x may be
        the previous layer's unconverted output (Sums: the norm converts it); with keep_sums this
        layer's x may be too (the caller hands it to the next norm), else it is a tensor."""
        if residual is None:
            residual = as_tensor(x)
            x, _ = self.input_layernorm(residual)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn.out(self.self_attn.mix(x, cos, sin, attn))
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp.down(self.mlp.act(x))
        return (x if keep_sums else as_tensor(x)), residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, linear)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory = dense_linear) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, linear)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_non_persistent(self) -> None:
        """Recompute buffers that are not in checkpoints (after building on the meta device)."""
        self.rotary = RotaryEmbedding(self.config).to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        """input_ids int64 [T], positions int64 [T] -> final-norm hidden states [T, H]."""
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, attn, keep_sums=True)
        return self.model.norm(x, residual)[0]

    def fuse_projections(self) -> int:
        """Merge q/k/v and gate/up into single matmuls where the layers allow; returns how many
        modules were fused. Call after loading weights, before choosing kernels."""
        fused = 0
        for layer in self.model.layers:
            fused += layer.self_attn.fuse() + layer.mlp.fuse()
        return fused

    def absorb_act_order(self) -> int:
        """Move each act-order down_proj's row permutation into its gate/up output columns
        (server.models.act_order), so down_proj needs no gather per call; returns how many layers
        changed. Call after fuse_projections, before choosing kernels."""
        from server.models.act_order import absorb_down_perm

        return sum(absorb_down_perm(layer.mlp) for layer in self.model.layers)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, H] -> float32 logits [B, V], written into `out` ([B, V] float32) if given."""
        logits = self.lm_head(hidden)
        if out is None:
            return logits.float()
        return out.copy_(logits)
