"""The Baichuan2 networks on MindFormers: 7B (RoPE, NormHead), 13B (ALiBi), packed rows.

The Baichuan2 models on MindFormers: LLaMA with a NormHead (7B), and with ALiBi instead of RoPE (13B),
registered with MindFormers.

Baichuan2-7B is MindFormers' `LlamaForCausalLM` except for the output head: NormHead L2-normalizes the
rows of `lm_head.weight` at every forward. The stored parameter stays un-normalized (HF and MindFormers
checkpoints both keep it raw), so only the forward differs. Registering the class lets a rendered
MindFormers YAML name it as `model.arch.type: Baichuan2ForCausalLM`.

Baichuan2-13B is the 7B network with ALiBi position bias and no rotary embedding (same names, W_pack
layout, NormHead and RMSNorm). MindFormers 1.9's LLamaAttention rotates q and k
(models/llama/llama_transformer.py:500), then computes softmax(mask + q k^T / sqrt(d)) with the
additive causal mask of the model's `casual_mask` cell (llama_transformer.py:705-724, llama.py:381).
So the 13B network swaps two parameterless cells: the mask cell returns the causal mask plus each
head's ALiBi bias, [batch, heads, seq, seq], and the rotary embedding is the identity. The parameters,
LoRA targets and every op that touches a parameter are the 7B's. It is registered as
`Baichuan13BV2ForCausalLM`, the name r1.0's recipe YAML gives it.

Import this module only where MindSpore is wanted: it imports mindformers (seconds, and MindFormers
writes its log folder under ./output unless LOCAL_DEFAULT_PATH says otherwise).
"""

import contextlib
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402
from mindspore.common.initializer import Normal, initializer  # noqa: E402
from mindspore.context import ParallelMode  # noqa: E402
from mindspore.parallel._utils import _get_parallel_mode  # noqa: E402

# MindFormers' logger writes to stdout, which scripts/run_baichuan2.py keeps for the answers.
with contextlib.redirect_stdout(sys.stderr):
    from mindformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
    from mindformers.modules.transformer import LowerTriangularMaskWithDynamic  # noqa: E402
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister  # noqa: E402
    from mindformers.tools.utils import is_pynative  # noqa: E402

from lorapipe.errors import InputError  # noqa: E402
from lorapipe.model.architecture import (  # noqa: E402
    ALIBI,
    ALIBI_MODEL_CLASS,
    MODEL_CLASS,
    ROPE,
    alibi_slopes,
    is_alibi,
    unsupported_attention,
)


class NormHead(nn.Cell):
    """logits = x @ norm_head(W).T, with W [vocab, hidden] stored un-normalized as `weight`."""

    def __init__(self, hidden_size, vocab_size, compute_dtype=mstype.float32,
                 param_init_type=mstype.float32, init_std=0.01):
        super().__init__()
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer(Normal(sigma=init_std), [vocab_size, hidden_size],
                                            param_init_type), name="weight")
        self.weight_to_fp32 = ops.Cast()
        self.l2_normalize = ops.L2Normalize(axis=-1, epsilon=1e-12)
        self.weight_to_compute = ops.Cast()
        self.x_to_compute = ops.Cast()
        self.matmul = ops.MatMul(transpose_b=True)

    def shard(self, strategy_matmul):
        """Semi-auto parallel: every op on the weight gets the weight's layout from the MatMul strategy
        (rows split by `vocab_split`, or replicated). Without a strategy, MindSpore gives L2Normalize
        the batch-parallel default, which splits the weight's rows over all devices (see README,
        "The real recipe")."""
        (batch, _), (vocab_split, _) = strategy_matmul
        self.weight_to_fp32.shard(((vocab_split, 1),))
        self.l2_normalize.shard(((vocab_split, 1),))
        self.weight_to_compute.shard(((vocab_split, 1),))
        self.x_to_compute.shard(((batch, 1),))
        self.matmul.shard(strategy_matmul)

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.vocab_size,)
        # Normalize in fp32 even when computing in fp16: a 4096-wide row norm overflows fp16 easily.
        weight = self.l2_normalize(self.weight_to_fp32(self.weight, mstype.float32))
        weight = self.weight_to_compute(weight, self.compute_dtype)
        x = self.x_to_compute(x.reshape(-1, self.hidden_size), self.compute_dtype)
        return self.matmul(x, weight).reshape(out_shape)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan2ForCausalLM(LlamaForCausalLM):
    """MindFormers LlamaForCausalLM with Baichuan2's NormHead (`logits = self.lm_head(output)` is the
    only place the head is used, so replacing the Cell is the whole difference)."""

    def __init__(self, config: LlamaConfig = None):
        # config by keyword: MindFormers reads disable_lazy_inline from keyword arguments only, and a
        # lazily inlined cell fails to compile in graph mode under data parallel.
        super().__init__(config=config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, config.compute_dtype,
                                config.param_init_type, config.init_method_std)
        par = config.parallel_config
        if _get_parallel_mode() in (ParallelMode.AUTO_PARALLEL, ParallelMode.SEMI_AUTO_PARALLEL):
            vocab_split = 1 if par.vocab_emb_dp or config.vocab_size % par.model_parallel else par.model_parallel
            self.lm_head.shard(((par.data_parallel * par.context_parallel, 1), (vocab_split, 1)))
        if par.pipeline_stage > 1:
            self.lm_head.pipeline_stage = par.pipeline_stage - 1
        # Packed rows (data.packing): segment ids keep the conversations of a row apart (construct).
        self.packing = bool(getattr(config, "packing", False))
        why = unsupported_attention(ROPE, self.packing, getattr(config, "use_flash_attention", False),
                                    getattr(config, "use_past", False))
        if why:
            raise InputError(f"{MODEL_CLASS}: model_config.packing needs use_flash_attention and use_past False ({why})")
        if self.packing:
            self.model.casual_mask = SegmentCausalMask(config.seq_length, config.compute_dtype)
            if _get_parallel_mode() in (ParallelMode.AUTO_PARALLEL, ParallelMode.SEMI_AUTO_PARALLEL):
                self.model.casual_mask.shard(par)
        # The parent loaded checkpoint_name_or_path into the head it had; load again into this one.
        if config.checkpoint_name_or_path:
            self.load_checkpoint(config)

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None, zactivate_len=None,
                  block_tables=None, slot_mapping=None, prefix_keys_values=None, llm_boost_inputs=None,
                  q_seq_lens=None, loss_mask=None, gather_index=None, seq_range=None, actual_seq_len=None,
                  segment_ids=None):
        """LlamaForCausalLM's forward; with packing (training and evaluation, no incremental decoding) the
        segment ids [batch, seq + 1] of each token (1, 2, ... per conversation of the row, 0 for padding)
        decide what attends to what. Rows without them (held-out rows) are one segment, their pad tokens
        the padding."""
        if not self.packing:
            # super() with its class: MindSpore's graph compiler reads a bare super() as super(type(self)),
            # which for Baichuan13BV2ForCausalLM calls this method again, without end.
            return super(Baichuan2ForCausalLM, self).construct(
                input_ids, labels, input_position, position_ids, attention_mask, input_embeds, init_reset,
                batch_valid_length, batch_index, zactivate_len, block_tables, slot_mapping, prefix_keys_values,
                llm_boost_inputs, q_seq_lens, loss_mask, gather_index, seq_range, actual_seq_len)
        bsz, seqlen = self.shape(input_ids)
        tokens, segments = input_ids, segment_ids
        if self.training:  # position t predicts labels[t + 1]: drop the last position, as the parent does
            tokens = self.slice(input_ids, (0, 0), (bsz, seqlen - 1), (1, 1))
            if segments is not None:
                segments = self.slice(segments, (0, 0), (bsz, seqlen - 1), (1, 1))
        if segments is None:
            segments = self.cast(self.not_equal(tokens, self.pad_token_id), mstype.int32)
        # LlamaModel reads its first input only for the shape and for casual_mask (llama.py:321, 381) when
        # it is given the embeddings (llama.py:388-389): the segments go to SegmentCausalMask that way.
        output = self.model(segments, self.model.tok_embeddings(tokens))
        logits = self.lm_head(output)
        input_mask = self.cast(self.not_equal(tokens, self.pad_token_id), mstype.float32)
        if labels is None:
            labels = self.slice(input_ids, (0, 1), (bsz, seqlen), (1, 1))
        else:
            if self.training:
                labels = self.slice(labels, (0, 1), (bsz, seqlen), (1, 1))
            input_mask = self.mul(input_mask, self.cast(self.not_equal(labels, self.ignore_token_id), mstype.float32))
        if not self.training:
            return self.cast(logits, mstype.float32), tokens, input_mask
        logits = self.cast(self.reshape(logits, (-1, self.vocab_size)), mstype.float32)
        return self.loss(logits, self.reshape(labels, (-1,)), self.reshape(input_mask, (-1,)))


class SegmentCausalMask(nn.Cell):
    """The causal mask of packed rows: a query attends to the keys at or before it that belong to the same
    conversation (segment id), never to padding (segment 0). Additive, as MindFormers' causal mask: 0 where
    allowed, -10000 elsewhere, [batch, 1, seq, seq]. For a row of one conversation (segment 1 up to the
    padding) it is LowerTriangularMaskWithDynamic's mask for every query that is not padding. Its input
    is the segment ids where MindFormers' mask takes the tokens."""

    def __init__(self, seq_length, compute_dtype=mstype.float32):
        super().__init__()
        self.lower = Tensor(np.tril(np.ones((seq_length, seq_length), np.float32))[None])
        self.compute_dtype = compute_dtype
        self.is_pynative = is_pynative()  # MindFormers' own test (tools/utils.py:608), as its mask cell
        self.shape = ops.Shape()
        self.slice = ops.StridedSlice()
        self.expand_query = ops.ExpandDims()
        self.expand_key = ops.ExpandDims()
        self.same = ops.Equal()
        self.real_key = ops.NotEqual()
        self.cast = ops.Cast()
        self.allowed = ops.Mul()
        self.causal = ops.Mul()
        self.flip = ops.Sub()
        self.scale = ops.Mul()
        self.expand_heads = ops.ExpandDims()

    def shard(self, parallel_config):
        """The batch split as the data's; one mask for all heads, as MindFormers' (llama_transformer.py:393)."""
        dp = parallel_config.data_parallel
        self.slice.shard(((1, 1, 1),))
        self.expand_query.shard(((dp, 1),))
        self.expand_key.shard(((dp, 1),))
        self.same.shard(((dp, 1, 1), (dp, 1, 1)))
        self.real_key.shard(((dp, 1, 1), ()))
        self.cast.shard(((dp, 1, 1),))
        self.allowed.shard(((dp, 1, 1), (dp, 1, 1)))
        self.causal.shard(((dp, 1, 1), (1, 1, 1)))
        self.flip.shard(((), (dp, 1, 1)))
        self.scale.shard(((dp, 1, 1), ()))
        self.expand_heads.shard(((dp, 1, 1),))

    def construct(self, segments=None, masks=None, seq_chunk=None):  # LowerTriangularMaskWithDynamic's signature
        lower = self.lower
        if self.is_pynative:  # any input length, as MindFormers' mask slices itself (transformer.py:886-887)
            seq_len = self.shape(segments)[1]
            lower = self.slice(lower, (0, 0, 0), (1, seq_len, seq_len), (1, 1, 1))
        keys = self.expand_key(segments, 1)                                      # [batch, 1, seq]
        same = self.cast(self.same(self.expand_query(segments, 2), keys), mstype.float32)
        real = self.cast(self.real_key(keys, 0), mstype.float32)
        allowed = self.causal(self.allowed(same, real), lower)                    # [batch, seq, seq]
        mask = self.scale(self.flip(1.0, allowed), -10000.0)
        return self.cast(self.expand_heads(mask, 1), self.compute_dtype)


class CausalMaskWithAlibi(nn.Cell):
    """MindFormers' causal mask, -10000 where a key is in the future or is the pad id and 0 elsewhere
    ([batch, 1, seq, seq], LowerTriangularMaskWithDynamic), plus Baichuan2-13B's ALiBi bias
    slope_h * (k - q) for keys k <= q (0 above the diagonal, where the mask already rules):
    [batch, heads, seq, seq]. Per row that is HF's slope_h * k up to a constant, which the softmax
    ignores; k - q keeps the values near the diagonal small, so an fp16 mask keeps their precision
    (r1.0's build_alibi_tensor_v2 used k - q for the same reason). Pad keys get the bias on top of
    -10000, as they would in any additive-mask implementation: lorapipe.model.decode does the same."""

    def __init__(self, seq_length, num_heads, compute_dtype=mstype.float32, pad_token_id=0, causal=None):
        super().__init__()
        # (packed rows: SegmentCausalMask, whose input is the segment ids)
        self.causal = causal or LowerTriangularMaskWithDynamic(seq_length=seq_length, compute_type=compute_dtype,
                                                               pad_token_id=pad_token_id)
        positions = np.arange(seq_length)
        # The bias in fp32, cast once: slope x distance rounded once to the compute dtype.
        self.slopes = Tensor(np.array(alibi_slopes(num_heads), np.float32).reshape(1, num_heads, 1, 1))
        self.distance = Tensor(np.tril(positions[None, :] - positions[:, None]).astype(np.float32)[None, None])
        self.compute_dtype = compute_dtype
        self.is_pynative = self.causal.is_pynative
        self.shape = ops.Shape()
        self.slice = ops.StridedSlice()
        self.mul_slopes = ops.Mul()
        self.cast = ops.Cast()
        self.add_bias = ops.Add()

    def shard(self, parallel_config):
        """Heads split as the attention scores' (dp, mp, 1, 1); the mask's batch as MindFormers'."""
        dp, mp = parallel_config.data_parallel, parallel_config.model_parallel
        self.causal.shard(parallel_config)
        self.slice.shard(((1, 1, 1, 1),))
        self.mul_slopes.shard(((1, mp, 1, 1), (1, 1, 1, 1)))
        self.cast.shard(((1, mp, 1, 1),))
        self.add_bias.shard(((dp, 1, 1, 1), (1, mp, 1, 1)))

    def construct(self, tokens=None, masks=None, seq_chunk=None):
        mask = self.causal(tokens, masks, seq_chunk)
        distance = self.distance
        if self.is_pynative:  # any input length, as the causal mask slices itself (transformer.py:886-887)
            seq_len = self.shape(mask)[-1]
            distance = self.slice(distance, (0, 0, 0, 0), (1, 1, seq_len, seq_len), (1, 1, 1, 1))
        bias = self.cast(self.mul_slopes(self.slopes, distance), self.compute_dtype)
        return self.add_bias(mask, bias)


class NoRotary(nn.Cell):
    """Baichuan2-13B's queries and keys go into the scores as they are: ALiBi replaces RoPE."""

    def construct(self, xq, xk, freqs_cis):  # RotaryEmbedding's signature
        return xq, xk


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan13BV2ForCausalLM(Baichuan2ForCausalLM):
    """Baichuan2-13B: Baichuan2ForCausalLM (LLaMA + NormHead) with ALiBi instead of RoPE. Only two
    parameterless cells differ (see the module docstring), so checkpoints, LoRA and the shard strategies
    of every op on a parameter are the 7B's; the ALiBi ops get strategies consistent with
    parallel_config (heads split by model_parallel, batch by data_parallel)."""

    def __init__(self, config: LlamaConfig = None):
        why = unsupported_attention(ALIBI, use_flash_attention=getattr(config, "use_flash_attention", False),
                                    use_past=getattr(config, "use_past", False))
        if why:
            raise InputError(f"{ALIBI_MODEL_CLASS}: model_config.use_flash_attention and use_past must be False ({why})")
        super().__init__(config=config)
        model = self.model
        model.casual_mask = CausalMaskWithAlibi(config.seq_length, config.num_heads, config.compute_dtype,
                                                config.pad_token_id, causal=model.casual_mask if self.packing else None)
        for layer in model.layers:
            layer.attention.apply_rotary_emb = NoRotary()
        if _get_parallel_mode() in (ParallelMode.AUTO_PARALLEL, ParallelMode.SEMI_AUTO_PARALLEL):
            par = config.parallel_config
            dp, mp = par.data_parallel, par.model_parallel
            model.casual_mask.shard(par)
            for layer in model.layers:
                # The mask now has a head axis: split it as the scores' (llama_transformer.py:393 gives the
                # RoPE mask (dp, 1, 1, 1), one mask for all heads).
                layer.attention.add.shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))


def build_model(model_config, train=False):
    """Instantiate the registered Baichuan2 model (7B, or 13B for an ALiBi model_config) from a
    mindformers_model_config() dict, for lorapipe's own forward passes on the host (predict, evaluate, tests);
    training builds through MindFormers."""
    # lorapipe's forward passes feed inputs of any length in PyNative mode; with ENFORCE_EAGER,
    # MindFormers slices its causal mask to the input's length (read when the cells are built:
    # mindformers/tools/utils.py:608, modules/transformer/transformer.py:886). The training ranks never
    # set it: under semi-auto parallel that slice is an op without a shard strategy.
    os.environ["ENFORCE_EAGER"] = "true"
    cfg = {k: v for k, v in model_config.items() if k != "type"}
    model_class = Baichuan13BV2ForCausalLM if is_alibi(model_config) else Baichuan2ForCausalLM
    net = model_class(LlamaConfig(**cfg))
    net.set_train(train)
    return net


def logits(net, input_ids, segment_ids=None):
    """Raw logits [batch, seq, vocab] (float32 numpy) of a model in eval mode; `segment_ids` for packed
    rows (a model built with packing)."""
    segments = None if segment_ids is None else ms.Tensor(segment_ids, mstype.int32)
    out = net(ms.Tensor(input_ids, mstype.int32)) if segments is None else \
        net(ms.Tensor(input_ids, mstype.int32), segment_ids=segments)
    return (out[0] if isinstance(out, tuple) else out).asnumpy()
