"""Incremental decoding on the host CPU: the Baichuan2 network's inference forward with a KV cache.

MindFormers 1.9 decodes incrementally only through its paged-attention path (use_past:
models/llama/llama_transformer.py:316-333), whose kernels (ApplyRotaryPosEmb, ReshapeAndCache,
PagedAttention) have no CPU implementation in MindSpore 2.9; on Ascend, lorapipe.infer.generate uses it.
On the host, this module runs the same network in numpy float32 from the same parameters, so that a
new token costs one position's forward. It follows MindFormers' CPU forward op for op, which the tests
check against the MindSpore model (logits, and greedy tokens against the full-recompute loop):
  * RMSNorm: x * rsqrt(mean(x^2) + eps) * w          (models/llama/llama_layer.py, _self_norm)
  * rotary: rotate-half, theta from the config        (modules/layers.py FreqsMgr, use_rope_slice)
  * attention: softmax(q k^T / sqrt(d) + mask) v, fp32 (llama_transformer.py _attn)
  * the additive mask is -10000 * (1 - keep_k * [k <= q]) with keep_k = (token_k != pad id): keys whose
    token is the pad id are masked even when the model generated them
    (modules/transformer/transformer.py:866-912, LowerTriangularMaskWithDynamic)
  * SwiGLU feed-forward w2(silu(w1 x) * w3 x); NormHead: logits = x @ norm_head(lm_head).T
  * ALiBi (Baichuan2-13B, lorapipe.model.network.Baichuan13BV2ForCausalLM): no rotary; the scores get
    slope_h * (k - q) for keys k <= q on top of the same mask, pad keys included, as the network's
    mask cell adds it (slopes from lorapipe.model.architecture.alibi_slopes, float32 as the network's)
Measured in benchmarks/predict.py. The weights are held as fp32 (28 GB for a 7B model): a host decode is
for small models and checks; the 7B recipe predicts on Ascend.
"""

import math

import numpy as np

from lorapipe.model.architecture import alibi_slopes, is_alibi
from lorapipe.model.baichuan2 import (
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    layer_weights,
    norm_head,
)

MASKED = np.float32(-10000.0)


class KVCacheDecoder:
    """The network's forward for new positions after the cached ones. `weights` holds the parameters
    by MindSpore name (lorapipe.infer.generate.load_weights); `model_config` a rendered YAML's model_config."""

    def __init__(self, weights, model_config):
        c = model_config
        self.layers_n, self.heads = c["num_layers"], c["num_heads"]
        self.hidden = c["hidden_size"]
        self.head_dim = self.hidden // self.heads
        self.eps = np.float32(c["rms_norm_eps"])
        self.pad_id = c.get("pad_token_id", 0)
        self.max_positions = c["seq_length"]

        def f32(name):
            return np.asarray(weights[name], np.float32)

        self.embed = f32(EMBEDDING)
        self.head_t = np.ascontiguousarray(norm_head(f32(LM_HEAD)).T)
        self.norm_out = f32(FINAL_NORM)
        self.layers = []
        for i in range(self.layers_n):
            w = {role: np.asarray(x, np.float32) for role, x in layer_weights(weights, i).items()}
            self.layers.append({  # fused and transposed once: x @ wqkv is q, k and v in one matmul
                "wqkv": np.ascontiguousarray(np.concatenate([w["wq"], w["wk"], w["wv"]]).T),
                "wo": np.ascontiguousarray(w["wo"].T),
                "w13": np.ascontiguousarray(np.concatenate([w["w1"], w["w3"]]).T),
                "w2": np.ascontiguousarray(w["w2"].T),
                "attention_norm": w["attention_norm"], "ffn_norm": w["ffn_norm"]})
        self.alibi = is_alibi(c)
        self.slopes = np.array(alibi_slopes(self.heads), np.float32)[:, None, None] if self.alibi else None
        inv_freq = 1.0 / (np.float32(c.get("theta", 10000.0)) ** (
            np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)))
        angles = np.outer(np.arange(self.max_positions, dtype=np.float32), inv_freq)
        angles = np.concatenate([angles, angles], -1)
        self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        shape = (self.layers_n, self.heads, self.max_positions, self.head_dim)
        self.keys, self.values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.is_pad = np.zeros(self.max_positions, bool)
        self.length = 0

    def reset(self):
        self.length = 0

    def _rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + self.eps) * weight

    def _rotate(self, x, positions):
        if self.alibi:
            return x
        half = self.head_dim // 2
        return x * self.cos[positions] + np.concatenate([-x[..., half:], x[..., :half]], -1) * self.sin[positions]

    def _mask(self, ids, start):
        """What the scores of the new positions get added: the mask, plus ALiBi's bias; None for nothing."""
        end = start + len(ids)
        self.is_pad[start:end] = np.asarray(ids) == self.pad_id
        causal = np.tril(np.ones((len(ids), end), bool), k=start)
        keep = causal & ~self.is_pad[:end]
        mask = None if keep.all() else np.where(keep, np.float32(0), MASKED)
        if not self.alibi:
            return mask
        distance = np.minimum(np.arange(end)[None, :] - np.arange(start, end)[:, None], 0).astype(np.float32)
        bias = self.slopes * distance  # [heads, new, end]
        return bias if mask is None else mask + bias

    def forward(self, ids):
        """Logits [vocab] of the last of the new tokens `ids`, whose keys and values join the cache."""
        start, count = self.length, len(ids)
        end = start + count
        if end > self.max_positions:
            raise ValueError(f"{end} tokens exceed the model's seq_length {self.max_positions}")
        positions = slice(start, end)
        mask = self._mask(ids, start)
        h = self.embed[np.asarray(ids)]
        for i, layer in enumerate(self.layers):
            qkv = self._rms_norm(h, layer["attention_norm"]) @ layer["wqkv"]
            q, k, v = (part.reshape(count, self.heads, self.head_dim).transpose(1, 0, 2)
                       for part in np.split(qkv, 3, -1))
            self.keys[i, :, positions] = self._rotate(k, positions)
            self.values[i, :, positions] = v
            scores = self._rotate(q, positions) @ self.keys[i, :, :end].transpose(0, 2, 1)
            scores *= np.float32(1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                scores += mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            h = h + (scores @ self.values[i, :, :end]).transpose(1, 0, 2).reshape(count, self.hidden) @ layer["wo"]
            gate, up = np.split(self._rms_norm(h, layer["ffn_norm"]) @ layer["w13"], 2, -1)
            h = h + (gate / (1.0 + np.exp(-gate)) * up) @ layer["w2"]
        self.length = end
        return self._rms_norm(h[-1], self.norm_out) @ self.head_t

    def hidden_rows(self, rows, start=0, keep=False):
        """The final-norm hidden states [batch, length, hidden] of token rows that each continue the
        first `start` cached positions (0: rows that stand alone), for scoring. The cache is left as it is,
        or with `keep` (one row) holds the row's keys and values after the `start` positions.
        Rows of different lengths are right-padded: a causal model's positions never see what follows
        them. Every key is attended, as a transformers model without an attention mask does."""
        batch, length = len(rows), max(map(len, rows))
        ids = np.zeros((batch, length), np.int64)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
        if start + length > self.max_positions:
            raise ValueError(f"{start + length} tokens exceed the model's {self.max_positions} positions")
        if keep:
            self.cached_keys_t = {}
        positions = np.arange(start, start + length)
        own = np.where(np.tril(np.ones((length, length), bool)), np.float32(0), MASKED)  # [new, new]
        before = None
        if self.alibi:  # slope_h * (k - q) for the keys k <= q
            own = own + self.slopes * np.minimum(np.arange(length)[None, :] - np.arange(length)[:, None], 0)
            before = self.slopes * (np.arange(start)[None, :] - positions[:, None]).astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(self.head_dim))
        h = self.embed[ids].reshape(batch * length, self.hidden)
        for i, layer in enumerate(self.layers):
            # [batch, heads, new, head_dim], contiguous: BLAS multiplies contiguous stacks several times faster
            q, k, v = (np.ascontiguousarray(part.reshape(batch, length, self.heads, self.head_dim).transpose(0, 2, 1, 3))
                       for part in np.split(self._rms_norm(h, layer["attention_norm"]) @ layer["wqkv"], 3, -1))
            q, k = self._rotate(q, positions), self._rotate(k, positions)
            if keep:
                self.keys[i, :, start:start + length], self.values[i, :, start:start + length] = k[0], v[0]
            scores = np.empty((batch, self.heads, length, start + length), np.float32)  # keys: cached, then own
            np.matmul(q, np.ascontiguousarray(k.transpose(0, 1, 3, 2)), out=scores[..., start:])
            scores[..., start:] += own / scale
            if start:
                np.matmul(q, self._keys_t(i, start), out=scores[..., :start])
                if before is not None:
                    scores[..., :start] += before / scale
            scores *= scale
            scores -= scores.max(-1, keepdims=True)  # the softmax in place: these are the largest arrays here
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            out = scores[..., start:] @ v
            if start:
                out += scores[..., :start] @ self.values[i, :, :start]
            h = h + out.transpose(0, 2, 1, 3).reshape(batch * length, self.hidden) @ layer["wo"]
            gate, up = np.split(self._rms_norm(h, layer["ffn_norm"]) @ layer["w13"], 2, -1)
            h = h + (gate / (1.0 + np.exp(-gate)) * up) @ layer["w2"]
        return self._rms_norm(h, self.norm_out).reshape(batch, length, self.hidden)

    def _keys_t(self, layer, start):
        """The cached keys of the first `start` positions of a layer, transposed and contiguous (once per prefix)."""
        cache = getattr(self, "cached_keys_t", {})
        if (layer, start) not in cache:
            cache[layer, start] = np.ascontiguousarray(self.keys[layer, :, :start].transpose(0, 2, 1))
            self.cached_keys_t = cache
        return cache[layer, start]

    def logits_of(self, hidden):
        """Logits [..., vocab] of final-norm hidden states (hidden_rows)."""
        return hidden @ self.head_t
