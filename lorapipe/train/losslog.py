"""The loss logs of a finetune: each rank's per-step TSV and the run's loss.tsv.

Each rank's TSV is written by lorapipe.train.trainer's TsvLossMonitor inside the rank, the run's
loss.tsv by lorapipe.train.finetune when it collects the outputs.

rank log:  step  total  epoch  loss  lr  global_norm  seconds   (one row per step; a resume repeats rows)
loss.tsv:  step  loss  lr  tokens_per_s                         (rank 0's rows, the last of each step)
"""

from pathlib import Path

from lorapipe.errors import InputError

RANK_LOG_HEADER = "step\ttotal\tepoch\tloss\tlr\tglobal_norm\tseconds\n"


def rank_log_row(step, total, epoch, loss, lr, global_norm, seconds):
    return f"{step}\t{total}\t{epoch}\t{loss:.6f}\t{lr:.6g}\t{global_norm:.6f}\t{seconds:.3f}\n"


def read_rank_log(path):
    """Rows of a rank's TsvLossMonitor file as dicts, the last row of each step (re-run steps repeat)."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text().splitlines()
    rows = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) == 7:
            step, total, epoch, loss, lr, norm, seconds = fields
            rows[int(step)] = {"step": int(step), "total": int(total), "epoch": int(epoch), "loss": float(loss),
                               "lr": float(lr), "global_norm": float(norm), "seconds": float(seconds)}
    return [rows[s] for s in sorted(rows)]


LOSS_TSV_COLUMNS = ("step", "loss", "lr", "tokens_per_s")


def read_loss_tsv(path):
    """The rows of a finetune's loss.tsv: {"step": int, "loss": float, "lr": float, "tokens_per_s": float
    or None}."""
    lines = Path(path).read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != LOSS_TSV_COLUMNS:
        raise InputError(f"{path}: not a loss.tsv (expected the header {' '.join(LOSS_TSV_COLUMNS)})")
    rows = []
    for line in lines[1:]:
        step, loss, lr, speed = line.split("\t")
        rows.append({"step": int(step), "loss": float(loss), "lr": float(lr),
                     "tokens_per_s": float(speed) if speed else None})
    return rows


def write_loss_tsv(path, rows, tokens_per_step):
    """loss.tsv from rank 0's rows: step, loss, lr and the tokens per second since the row before."""
    lines = ["\t".join(LOSS_TSV_COLUMNS)]
    for prev, row in zip([None, *rows], rows):
        # In sink mode (Ascend) a row closes sink_size steps: its step is the optimizer's global step
        # and its loss and lr are the last step's; the rate covers all the steps since the last row.
        dt = row["seconds"] - prev["seconds"] if prev and row["seconds"] > prev["seconds"] else None
        steps = row["step"] - prev["step"] if prev else row["step"]
        speed = f"{tokens_per_step * steps / dt:.0f}" if dt and tokens_per_step else ""
        lines.append(f"{row['step']}\t{row['loss']:.6f}\t{row['lr']:.6g}\t{speed}")
    Path(path).write_text("\n".join(lines) + "\n")
