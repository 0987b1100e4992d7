"""The Baichuan2 models on MindFormers: LLaMA with a NormHead (7B), and with ALiBi instead of RoPE (13B),
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

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
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

from lorapipe.errors import InputError  # noqa: E402
from lorapipe.spec import ALIBI_MODEL_CLASS, MODEL_CLASS, alibi_slopes, is_alibi  # noqa: E402,F401


class NormHead(nn.Cell):
    """logits = x @ normalize_rows(W).T, with W [vocab, hidden] stored un-normalized as `weight`."""

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
        # The parent loaded checkpoint_name_or_path into the head it had; load again into this one.
        if config.checkpoint_name_or_path:
            self.load_checkpoint(config)


class CausalMaskWithAlibi(nn.Cell):
    """MindFormers' causal mask, -10000 where a key is in the future or is the pad id and 0 elsewhere
    ([batch, 1, seq, seq], LowerTriangularMaskWithDynamic), plus Baichuan2-13B's ALiBi bias
    slope_h * (k - q) for keys k <= q (0 above the diagonal, where the mask already rules):
    [batch, heads, seq, seq]. Per row that is HF's slope_h * k up to a constant, which the softmax
    ignores; k - q keeps the values near the diagonal small, so an fp16 mask keeps their precision
    (r1.0's build_alibi_tensor_v2 used k - q for the same reason). Pad keys get the bias on top of
    -10000, as they would in any additive-mask implementation: lorapipe.decode does the same."""

    def __init__(self, seq_length, num_heads, compute_dtype=mstype.float32, pad_token_id=0):
        super().__init__()
        self.causal = LowerTriangularMaskWithDynamic(seq_length=seq_length, compute_type=compute_dtype,
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
        # Incremental decoding (use_past) runs MindFormers' InferAttention and paged attention, whose
        # LLaMA path is RoPE-only (llama_transformer.py:317-333, 494-496); flash attention takes ALiBi as a
        # separate input, not the additive mask this network builds. lorapipe decodes the 13B on the host
        # (lorapipe.decode) and trains it without flash attention, as r1.0's recipe does.
        for flag in ("use_past", "use_flash_attention"):
            if getattr(config, flag, False):
                raise InputError(f"{ALIBI_MODEL_CLASS}: {flag} is not supported with ALiBi in lorapipe (model_config."
                                 f"{flag}: False; predict decodes on the host)")
        super().__init__(config=config)
        model = self.model
        model.casual_mask = CausalMaskWithAlibi(config.seq_length, config.num_heads, config.compute_dtype,
                                                config.pad_token_id)
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
    llama_config() dict, for lorapipe's own forward passes on the host (predict, evaluate, tests);
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


def logits(net, input_ids):
    """Raw logits [batch, seq, vocab] (float32 numpy) of a model in eval mode."""
    out = net(ms.Tensor(input_ids, mstype.int32))
    return (out[0] if isinstance(out, tuple) else out).asnumpy()
