"""Which training checkpoints a resume can trust, and the step to resume from.

MindSpore writes a checkpoint to `*.tmp` and renames it when it is complete
(mindspore/train/serialization.py), so a kill leaves no half-written `.ckpt`. A disk fault or a partial
copy still can, and `.ckpt` has no checksum: a file cut at a record boundary reads cleanly, with fewer
tensors (no `adam_v`, no `global_step`). MindFormers, left to itself, picks the checkpoint to resume from
by file name or by meta.json (mindformers/tools/resume_ckpt.py), and would load such a file silently: its
missing tensors keep the values loaded before (trainer/utils.py:762-766).

So before a resume every checkpoint of every rank is read to its end. One is complete when it holds every
tensor that any checkpoint of the run holds: the LoRA tensors, their moments and the step counters. An
incomplete one is moved aside (renamed `<name>.incomplete`, never deleted) with a warning that names it.
The resume then starts from the newest global step that is complete on every rank, and that choice is
passed to MindFormers by file name (`resume_training: "<file>"`, which each rank reads from its own
folder with its rank in the name: tools/resume_ckpt.py:53-59).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import InputError, StepError
from lorapipe.formats.checkpoint_file import (
    checkpoint_files,
    checkpoint_index,
    iter_checkpoint,
)

log = logging.getLogger("lorapipe")

INCOMPLETE = ".incomplete"
STEP_COUNTERS = ("global_step", "step_num")


@dataclass
class ResumePoint:
    """The global step to resume from, its checkpoint on each rank, the newest step any rank saved, and the
    file name MindFormers is given."""
    step: int
    checkpoints: dict
    newest: int

    @property
    def file_name(self):
        return self.checkpoints[min(self.checkpoints)].name

    def describe(self):
        lost = self.newest - self.step
        return (f"global step {self.step}, the newest complete on every rank ({self.file_name})"
                + (f"; the newest any rank saved is step {self.newest}: {lost} steps are trained again" if lost else ""))


def _contents(ckpt):
    """{name: shape} of a checkpoint read to its end, or the reason it cannot be read."""
    try:
        return {name: tuple(shape) for name, _, shape in checkpoint_index(ckpt)}
    except InputError as e:
        return str(e)


def global_step(ckpt):
    """The global step a checkpoint was saved at (-1 if it holds no step counter)."""
    for _, value in iter_checkpoint(ckpt, select=STEP_COUNTERS.__contains__):
        return int(value.reshape(-1)[0])
    return -1


def _move_aside(ckpt, why):
    target = ckpt.with_name(ckpt.name + INCOMPLETE)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}{INCOMPLETE}.{n}")
    ckpt.rename(target)
    log.warning("%s is incomplete (%s): moved aside to %s", ckpt, why, target.name)


def resume_point(checkpoint_dir, ranks, restart_if_damaged=False):
    """The ResumePoint of the checkpoints in `checkpoint_dir`/rank_<r>/, or None to train from step 0 (no
    checkpoint yet, or none complete on every rank and `restart_if_damaged`). Incomplete checkpoints are
    moved aside first; with none complete on every rank and no `restart_if_damaged`, a StepError says why
    and what to do."""
    found = {r: checkpoint_files(Path(checkpoint_dir, f"rank_{r}")) for r in ranks}
    if not any(found.values()):
        return None
    contents = {ckpt: _contents(ckpt) for ckpts in found.values() for ckpt in ckpts}
    expected = set().union(*(c for c in contents.values() if isinstance(c, dict)))
    steps = {r: {} for r in ranks}
    for r, ckpts in found.items():
        for ckpt in ckpts:
            held = contents[ckpt]
            missing = sorted(expected - set(held)) if isinstance(held, dict) else None
            if isinstance(held, str) or missing or not set(STEP_COUNTERS) & set(held):
                why = held if isinstance(held, str) else (
                    f"{len(held)} of {len(expected)} tensors; missing {', '.join(missing[:3])}"
                    + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
                _move_aside(ckpt, why)
                continue
            steps[r][global_step(ckpt)] = ckpt
    common = set.intersection(*(set(s) for s in steps.values()))
    if not common:
        have = "; ".join(f"rank {r}: steps {sorted(s) or 'none'}" for r, s in steps.items())
        if restart_if_damaged:
            for ckpt in (c for s in steps.values() for c in s.values()):
                _move_aside(ckpt, "no step is complete on every rank, and training restarts from step 0")
            log.warning("no step has a complete checkpoint on every rank (%s): training from step 0, as "
                        "resume.restart_if_damaged says", have)
            return None
        raise StepError(f"{checkpoint_dir}: no step has a complete checkpoint on every rank ({have}); the "
                        f"incomplete ones are moved aside as *{INCOMPLETE}. To train again from step 0, set "
                        f"resume.restart_if_damaged: true (or delete {Path(checkpoint_dir).parent.parent})")
    newest = max(max(s) for s in steps.values() if s)
    # MindFormers reads rank r's file as rank 0's name with "_rank_<r>" in it (tools/utils.py,
    # replace_rank_id_in_ckpt_name); MindSpore suffixes a prefix it already used ("_rank_0_1-3_12.ckpt" after a
    # resume), so take the newest step whose files are named alike on every rank.
    for step in sorted(common, reverse=True):
        first = steps[ranks[0]][step].name
        if all(steps[r][step].name == first.replace(f"_rank_{ranks[0]}", f"_rank_{r}") for r in ranks):
            return ResumePoint(step, {r: steps[r][step] for r in ranks}, newest)
    raise StepError(f"{checkpoint_dir}: the ranks name their checkpoints of the same steps differently "
                    f"({', '.join(steps[r][max(common)].name for r in ranks)}), so MindFormers cannot be told one "
                    f"file for all; move the odd ones aside, or delete {Path(checkpoint_dir).parent.parent}")
