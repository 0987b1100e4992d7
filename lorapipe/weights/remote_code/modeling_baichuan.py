# The tiny base model's remote code (written for lorapipe, not Baichuan's): Baichuan2's forward as its
# public model card and modeling files define it, in eval mode: RMSNorm, W_pack attention with RoPE
# (Baichuan2-7B) or ALiBi (13B), SwiGLU, NormHead (lm_head rows L2-normalised at every forward). No KV
# cache and no padding mask: enough to load an HF directory lorapipe writes and compute its logits.
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_baichuan import BaichuanConfig


def _alibi_slopes(heads):
    # lorapipe.model.architecture.alibi_slopes again: remote code loads with transformers alone, not lorapipe
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][:heads - closest]


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.hidden = config.num_attention_heads, config.hidden_size
        self.W_pack = nn.Linear(self.hidden, 3 * self.hidden, bias=False)
        self.o_proj = nn.Linear(self.hidden, self.hidden, bias=False)

    def forward(self, x, bias, rotary):
        batch, length, _ = x.shape
        d = self.hidden // self.heads
        q, k, v = (t.view(batch, length, self.heads, d).transpose(1, 2) for t in self.W_pack(x).split(self.hidden, -1))
        if rotary is not None:
            cos, sin = rotary
            half = lambda t: torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)  # noqa: E731
            q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        scores = q @ k.transpose(2, 3) / math.sqrt(d) + bias
        out = scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.hidden))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn, self.mlp = Attention(config), MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, bias, rotary):
        x = x + self.self_attn(self.input_layernorm(x), bias, rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        explicit = (config.position_embedding or "").upper()
        self.alibi = explicit == "ALIBI" or (not explicit and config.hidden_size == 5120)
        self.post_init()

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        length, heads = input_ids.shape[1], self.config.num_attention_heads
        bias = torch.triu(torch.full((length, length), float("-inf"), device=x.device), 1)
        rotary = None
        position = torch.arange(length, device=x.device, dtype=torch.float32)
        if self.alibi:  # slope_h * (j - i): the key's distance behind the query
            bias = bias + torch.tensor(_alibi_slopes(heads), device=x.device)[:, None, None] * (position[None] - position[:, None])
        else:
            d = self.config.hidden_size // heads
            inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
            angles = torch.outer(position, inv_freq)
            angles = torch.cat([angles, angles], -1)
            rotary = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias.to(x.dtype), rotary)
        return self.norm(x)


class NormHead(nn.Module):
    def __init__(self, hidden, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, x):
        return x @ nn.functional.normalize(self.weight, dim=-1).T


class BaichuanForCausalLM(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids)).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
