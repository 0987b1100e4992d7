"""Inside one training rank: MindFormers' own Trainer, made CPU-safe, with a per-step TSV log.

Imported by scripts/finetune_worker.py in every rank that msrun (or the rank-table launcher) starts.
Importing it imports MindSpore and MindFormers and registers, besides the Baichuan2 model:
  * CpuTrainOneStepCell (WRAPPER): MindFormers' MFTrainOneStepCell calls Ascend-only overflow ops
    (NPUGetFloatStatusV2); this is a plain TrainOneStepCell with optional gradient clipping that returns
    the same (loss, overflow, loss_scale, lr, global_norm) tuple, so MindFormers' monitors keep working;
  * TsvLossMonitor (CALLBACK): one `step total epoch loss lr global_norm seconds` row per step.
With `lorapipe_checkpoint_params: trainable` in the YAML (train.checkpoint_params) it also narrows what the
checkpoints hold to what is not frozen, and has a resume load the frozen base under the resumed state
(save_only_trainable, resume_over_base).
"""

import json
import os
import time

import mindformers.core.callback.callback as mf_callback
import mindformers.trainer.utils as mf_trainer_utils
import mindformers.utils.load_checkpoint_utils as mf_load_utils
import mindspore as ms
import mindspore.communication.comm_func as comm_func
from mindformers import MindFormerConfig, Trainer, build_context
from mindformers.core.clip_grad import ClipGradNorm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.tools.utils import get_real_rank
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.train.callback import Callback

import lorapipe.model.network  # noqa: F401  registers Baichuan2ForCausalLM
from lorapipe.formats.checkpoint_file import checkpoint_index, the_checkpoint
from lorapipe.formats.msckpt import PARAMETER_ORDER
from lorapipe.train.losslog import RANK_LOG_HEADER, rank_log_row
from lorapipe.train.mindformers_yaml import CHECKPOINT_PARAMS


def _cpu_barrier(group=None):  # noqa: ARG001 - same signature as mindspore's barrier
    """CPU has no Barrier kernel; an AllReduce of one value blocks until every rank has joined."""
    ops.AllReduce()(Tensor([1.0], mstype.float32)).asnumpy()


def use_cpu_barrier():
    """MindFormers calls barrier() when it loads a checkpoint and when it resumes."""
    for module in (comm_func, mf_trainer_utils, mf_load_utils, mf_callback):
        module.barrier = _cpu_barrier


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class CpuTrainOneStepCell(nn.TrainOneStepCell):
    """TrainOneStepCell + optional global-norm clipping; no loss scaling, so never an overflow."""

    def __init__(self, network, optimizer, use_clip_grad=False, max_grad_norm=1.0, **kwargs):
        super().__init__(network, optimizer, sens=1.0)  # grad_reducer averages over data-parallel ranks
        self.use_clip_grad = use_clip_grad
        self.clip_grad_norm = ClipGradNorm(max_norm=max_grad_norm)
        self.lr_schedule = self.optimizer.learning_rate if self.optimizer.dynamic_lr else None
        self.overflow = Tensor(False, mstype.bool_)
        self.loss_scale = Tensor(1.0, mstype.float32)
        self.zero = Tensor(0.0, mstype.float32)

    def construct(self, *inputs):
        loss = self.network(*inputs)
        sens = ops.fill(loss.dtype, loss.shape, 1.0)
        grads = self.grad_reducer(self.grad(self.network, self.weights)(*inputs, sens))
        global_norm = self.zero
        if self.use_clip_grad:
            grads, global_norm = self.clip_grad_norm(grads)
        lr = self.optimizer.learning_rate
        if self.lr_schedule is not None:  # the lr of this step (the optimizer bumps global_step after)
            lr = self.lr_schedule(self.optimizer.global_step).reshape(())
        loss = ops.depend(loss, self.optimizer(grads))
        return loss, self.overflow, self.loss_scale, lr, global_norm


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class TsvLossMonitor(Callback):
    """Appends `step total epoch loss lr global_norm seconds` per step to `path` ({rank} substituted).

    `step` is the optimizer's global step, so it continues across a resume (rows of re-run steps
    repeat; readers keep the last); `loss` is this rank's loss."""

    def __init__(self, path="train_log_rank_{rank}.tsv"):
        super().__init__()
        self.path = path.format(rank=get_real_rank())
        self.total = None
        self.start = time.time()

    def on_train_begin(self, run_context):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if not os.path.exists(self.path):
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(RANK_LOG_HEADER)
        self.start = time.time()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        out = cb.net_outputs
        if isinstance(out, (tuple, list)):
            loss, lr, norm = (float(out[i].asnumpy()) for i in (0, 3, 4))
        else:
            loss, lr, norm = float(out.asnumpy()), float("nan"), float("nan")
        optimizer = cb.optimizer if cb.optimizer is not None else cb.network.optimizer
        step = int(optimizer.global_step.asnumpy()[0])
        if self.total is None:  # after a resume, cb.epoch_num counts only the epochs left
            self.total = (cb.cur_epoch_num - 1 + cb.epoch_num) * cb.batch_num
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(rank_log_row(step, self.total, cb.cur_epoch_num, loss, lr, norm, time.time() - self.start))


def save_only_trainable(frozen):
    """Every checkpoint MindSpore saves in this rank leaves out the `frozen` parameters (the base model's
    names). MindFormers saves through mindspore.save_checkpoint with a choice_func of its own
    (core/callback/callback.py:2076-2082), which still applies. Beside the first checkpoint of a rank folder
    goes PARAMETER_ORDER: every parameter of the saved network, in its order, with its dtype, which is how
    merged_ckpt puts the base back exactly where a whole-network checkpoint has it."""
    save = ms.save_checkpoint

    def save_checkpoint(save_obj, ckpt_file_name, *args, choice_func=None, **kwargs):
        def choose(name):
            return name not in frozen and (choice_func is None or choice_func(name))

        save(save_obj, ckpt_file_name, *args, choice_func=choose, **kwargs)
        order = os.path.join(os.path.dirname(os.path.abspath(ckpt_file_name)), PARAMETER_ORDER)
        if isinstance(save_obj, ms.nn.Cell) and not os.path.exists(order):
            with open(order + ".tmp", "w", encoding="utf-8") as f:
                json.dump([[p.name, str(p.dtype)] for _, p in save_obj.parameters_and_names()], f)
            os.replace(order + ".tmp", order)

    ms.save_checkpoint = save_checkpoint  # (MindFormers calls it as ms.save_checkpoint: this same attribute)


def resume_over_base(base_ckpt):
    """A resume from trainable-only checkpoints loads the frozen base first and the resumed state over it:
    MindFormers loads a resume checkpoint non-strictly (trainer/utils.py:762-766, and for safetensors
    utils/load_checkpoint_utils.py:476-491), so a parameter the checkpoint lacks would keep whatever it held
    before, not the base. Both loaders are module functions MindFormers looks up when it runs them."""
    load = mf_trainer_utils.get_load_checkpoint_result

    def load_with_base(config):  # .ckpt: the resumed state's dict over the base's
        resumed = load(config)
        merged = ms.load_checkpoint(base_ckpt)
        merged.update(resumed)
        return merged

    load_safetensors = mf_load_utils.load_safetensors_checkpoint

    def load_safetensors_with_base(config, files, *args):  # safetensors: the base's file first, then the resumed
        return load_safetensors(config, [base_ckpt, *files], *args)

    mf_trainer_utils.get_load_checkpoint_result = load_with_base
    mf_load_utils.load_safetensors_checkpoint = load_safetensors_with_base


def finetune(config_path, output_dir, tsv_path, resume_from=None, resume_checkpoint=None, only_save_strategy=False,
             load_checkpoint=None):
    """Run MindFormers' finetune for the rendered YAML in this rank.

    `output_dir` receives checkpoint/rank_<r>/ (and strategy/); `resume_from` is an earlier run's
    checkpoint folder (with rank_*/) to continue from, at `resume_checkpoint` (rank 0's file name, which
    MindFormers maps to each rank's: tools/resume_ckpt.py:53-59; None: MindFormers' own choice by meta.json).
    With `only_save_strategy`, MindFormers compiles
    the parallel graph, writes the strategy files and exits (trainer/utils.py:498-500)."""
    cfg = MindFormerConfig(os.path.abspath(config_path))
    cfg.output_dir = os.path.abspath(output_dir)
    cfg.only_save_strategy = only_save_strategy
    for callback in cfg.callbacks:
        if callback["type"] == "TsvLossMonitor":
            callback["path"] = os.path.abspath(tsv_path)
    if cfg.get(CHECKPOINT_PARAMS, "all") == "trainable":
        # the base, in the YAML's load_ckpt_format, in the folder its load_checkpoint names (<R>/ckpt/rank_0)
        base = str(the_checkpoint(cfg.load_checkpoint, (f".{cfg.load_ckpt_format}",)))
        save_only_trainable({name for name, _, _ in checkpoint_index(base)})
        if resume_from:
            resume_over_base(base)
    if load_checkpoint:  # the base in a folder per rank (safetensors: lorapipe.train.finetune)
        cfg.load_checkpoint = os.path.abspath(load_checkpoint)
    if resume_from:
        cfg.load_checkpoint, cfg.resume_training = os.path.abspath(resume_from), resume_checkpoint or True
    if cfg.context.device_target == "CPU":
        use_cpu_barrier()
    build_context(cfg)
    # finetune() drops cfg.load_checkpoint unless it is passed explicitly.
    Trainer(args=cfg).finetune(resume_from_checkpoint=cfg.load_checkpoint or None,
                               resume_training=bool(cfg.resume_training))
