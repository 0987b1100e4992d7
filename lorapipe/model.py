"""The Baichuan2-7B model on MindFormers: LLaMA with a NormHead, registered with MindFormers.

Baichuan2 is MindFormers' `LlamaForCausalLM` except for the output head: NormHead L2-normalizes the
rows of `lm_head.weight` at every forward. The stored parameter stays un-normalized (HF and MindFormers
checkpoints both keep it raw), so only the forward differs. Registering the class lets a rendered
MindFormers YAML name it as `model.arch.type: Baichuan2ForCausalLM`.

Import this module only where MindSpore is wanted: it imports mindformers (seconds, and MindFormers
writes its log folder under ./output unless LOCAL_DEFAULT_PATH says otherwise).
"""

import contextlib
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import Parameter, nn, ops  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402
from mindspore.common.initializer import Normal, initializer  # noqa: E402
from mindspore.context import ParallelMode  # noqa: E402
from mindspore.parallel._utils import _get_parallel_mode  # noqa: E402
# MindFormers' logger writes to stdout, which scripts/run_baichuan2.py keeps for the answers.
with contextlib.redirect_stdout(sys.stderr):
    from mindformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister  # noqa: E402

from lorapipe.spec import MODEL_CLASS  # noqa: E402,F401


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


def build_model(model_config, train=False):
    """Instantiate the registered Baichuan2 model from a llama_config() dict, for lorapipe's own
    forward passes on the host (predict, evaluate, tests); training builds through MindFormers."""
    # lorapipe's forward passes feed inputs of any length in PyNative mode; with ENFORCE_EAGER,
    # MindFormers slices its causal mask to the input's length (read when the cells are built:
    # mindformers/tools/utils.py:608, modules/transformer/transformer.py:886). The training ranks never
    # set it: under semi-auto parallel that slice is an op without a shard strategy.
    os.environ["ENFORCE_EAGER"] = "true"
    cfg = {k: v for k, v in model_config.items() if k != "type"}
    net = Baichuan2ForCausalLM(LlamaConfig(**cfg))
    net.set_train(train)
    return net


def logits(net, input_ids):
    """Raw logits [batch, seq, vocab] (float32 numpy) of a model in eval mode."""
    out = net(ms.Tensor(input_ids, mstype.int32))
    return (out[0] if isinstance(out, tuple) else out).asnumpy()
