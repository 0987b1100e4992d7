"""Multiple-choice benchmarks (C-Eval, CMMLU, MMLU) read from their official releases, as lm-eval prompts them.

The prompts are lm-evaluation-harness 0.4.x's for its tasks `ceval-valid`, `cmmlu` and `mmlu` (default):
the per-subject description, then each few-shot example (the first n rows of `dev`) as its question text,
" " and its answer letter, joined by "\n\n", then the question text: `question.strip()`, the `A. ...` lines
and `答案：` (Chinese) or `Answer:` (MMLU). The subjects' names and lm-eval's groups are in
task_subjects.json (lm-eval's task YAMLs; tests/lmeval checks them). lm-eval groups C-Eval and CMMLU as one
group each, and MMLU in four (stem, other, social_sciences, humanities); where the MMLU release's own
mapping disagrees (anatomy: "Other" there, stem in lm-eval), lm-eval's grouping is the one used.

A release is the zip as distributed or its unpacked folder (with or without one top folder). Every cell is
read as a string with Python's csv module: pandas' defaults would turn MMLU cells such as "None" into NaN.
"""

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lorapipe.errors import ConfigError, InputError

LETTERS = ("A", "B", "C", "D")
MAX_SHOTS = 5
SUBJECTS = json.loads((Path(__file__).with_name("task_subjects.json")).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    group: str  # lm-eval's group of the whole benchmark
    splits: tuple  # the splits with answers that can be scored; the first is the default
    header: tuple | None  # the CSVs' header row (None: headerless)
    answer_prompt: str
    description: str  # formatted with the subject's name

    def file(self, split, subject):
        """The subject's CSV in a split, relative to the release's root."""
        return {"ceval": f"{split}/{subject}_{split}.csv", "cmmlu": f"{split}/{subject}.csv",
                "mmlu": f"data/{split}/{subject}_{split}.csv"}[self.name]

    def subject_name(self, subject):
        return SUBJECTS[self.name][subject].get("name", subject.replace("_", " "))

    def subject_group(self, subject):
        return SUBJECTS[self.name][subject].get("group", self.group)


BENCHMARKS = {b.name: b for b in (
    Benchmark("ceval", "C-Eval", "ceval-valid", ("val",), ("id", "question", "A", "B", "C", "D", "answer"),
              "答案：", "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n"),
    Benchmark("cmmlu", "CMMLU", "cmmlu", ("test",), ("", "Question", "A", "B", "C", "D", "Answer"),
              "答案：", "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"),
    Benchmark("mmlu", "MMLU", "mmlu", ("test", "val"), None,
              "Answer:", "The following are multiple choice questions (with answers) about {}.\n\n"),
)}


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # 0-based data row in the subject's split file
    question: str
    choices: tuple
    answer: str  # A-D

    @property
    def gold(self):
        return LETTERS.index(self.answer)


class Release:
    """A benchmark's official release: a zip, or a folder."""

    def __init__(self, benchmark, path):
        self.benchmark, self.path = BENCHMARKS[benchmark], Path(path).expanduser()
        if not self.path.exists():
            raise InputError(f"{self.path}: no such {self.benchmark.title} release (zip or folder)")
        self.zip = zipfile.ZipFile(self.path) if zipfile.is_zipfile(self.path) else None
        if self.zip is None and not self.path.is_dir():
            raise InputError(f"{self.path}: neither a zip nor a folder; expected the {self.benchmark.title} release")
        self.root = self._root()

    @cached_property
    def _files(self):
        """The release's file names, relative to the zip or folder."""
        if self.zip:
            return {n for n in self.zip.namelist() if not n.endswith("/")}
        return {str(p.relative_to(self.path)) for p in self.path.rglob("*.csv")}

    def _root(self):
        """'' or the one top folder the release's files are under: where a subject's dev CSV is."""
        probes = [self.benchmark.file("dev", subject) for subject in SUBJECTS[self.benchmark.name]]
        for name in sorted(self._files):
            for probe in probes:
                if name == probe or name.endswith("/" + probe) and name.count("/") == probe.count("/") + 1:
                    return name[:-len(probe)]
        raise InputError(f"{self.path}: not the {self.benchmark.title} release: it has no {probes[0]} or any other "
                         f"subject's dev CSV (the official release has one CSV per subject and split, as "
                         f"{self.benchmark.file('<split>', '<subject>')})")

    def read(self, split, subject):
        """The rows of a subject's split file, each a list of strings (header removed and checked)."""
        name = self.root + self.benchmark.file(split, subject)
        where = f"{self.path}: {name}"
        if name not in self._files:
            raise InputError(f"{where}: missing; the {self.benchmark.title} release has this file for every subject")
        raw = self.zip.read(name) if self.zip else (self.path / name).read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 ({e})") from None
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if self.benchmark.header:
            if not rows or tuple(rows[0][:len(self.benchmark.header)]) != self.benchmark.header:
                raise InputError(f"{where}: header {rows[0] if rows else None} is not the release's "
                                 f"{list(self.benchmark.header)}")
            rows = rows[1:]
        return where, rows


def questions(release, split, subject, skip_malformed=False, skipped=None):
    """The subject's questions in a split. A row with a missing choice or an answer outside A-D is an
    error naming the file and row, or with `skip_malformed` is left out and added to `skipped`."""
    where, rows = release.read(split, subject)
    first = 1 if release.benchmark.header else 0  # question, A-D, answer columns from here
    out = []
    for index, row in enumerate(rows):
        fields = row[first:first + 6]
        problem = None
        if len(fields) < 6:
            problem = f"has {len(fields)} of the 6 fields question, A, B, C, D, answer"
        elif "" in fields[1:5]:
            problem = f"choice {LETTERS[fields[1:5].index('')]} is empty"
        elif fields[5] not in LETTERS:
            problem = f"answer {fields[5]!r} is not one of A, B, C, D"
        if problem:
            if not skip_malformed:
                raise InputError(f"{where} (subject {subject}) row {index}: {problem}; fix the file, or set "
                                 f"skip_malformed: true on the task to leave such rows out (they are counted)")
            if skipped is not None:
                skipped.append({"subject": subject, "split": split, "index": index, "problem": problem})
            continue
        out.append(Question(subject, index, fields[0], tuple(fields[1:5]), fields[5]))
    return out


def question_text(benchmark, q):
    """lm-eval's doc_to_text."""
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\n" + BENCHMARKS[benchmark].answer_prompt


def subject_prefix(benchmark, subject, examples):
    """What opens every prompt of a subject: the description and the few-shot examples."""
    head = BENCHMARKS[benchmark].description.format(BENCHMARKS[benchmark].subject_name(subject))
    return head + "".join(f"{question_text(benchmark, q)} {q.answer}\n\n" for q in examples)


@dataclass
class Task:
    """One entry of the config's evaluate.tasks, resolved: the questions to score, subject by subject."""
    name: str
    split: str
    shots: int
    subjects: dict  # subject -> (prefix, [Question])
    skipped: list


def check_task_settings(entry, where):
    """The config-level checks of one evaluate.tasks entry (the release itself is read when it runs).
    Returns the entry with defaults filled in."""
    name = entry["name"]
    benchmark = BENCHMARKS[name]
    split = entry.get("split") or benchmark.splits[0]
    if split not in benchmark.splits:
        raise ConfigError(f"{where}: split {split!r}: {benchmark.title} scores {' or '.join(benchmark.splits)}"
                          + (" (its test split has no answers)" if name == "ceval" else ""))
    unknown = [s for s in entry.get("subjects") or [] if s not in SUBJECTS[name]]
    if unknown:
        raise ConfigError(f"{where}: unknown {benchmark.title} subject(s) {', '.join(unknown)}; its subjects are "
                          f"{', '.join(sorted(SUBJECTS[name]))}")
    return {"split": split, "shots": 0, "subjects": sorted(SUBJECTS[name]), "limit": None,
            "skip_malformed": False} | {k: v for k, v in entry.items() if v is not None}


def check_tasks(tasks):
    """The config's evaluate.tasks, checked before any job runs: {name: entry with defaults}."""
    names = [t["name"] for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"evaluate.tasks: {', '.join(twice)} listed more than once; one entry per benchmark")
    checked = {}
    for i, entry in enumerate(tasks):
        where = f"evaluate.tasks[{i}] ({entry['name']})"
        if not Path(entry["path"]).exists():
            raise ConfigError(f"{where}: path {entry['path']}: no such file or folder; expected the official "
                              f"{BENCHMARKS[entry['name']].title} release, a zip or its unpacked folder")
        checked[entry["name"]] = check_task_settings(entry, where)
    return checked


def load_task(entry, where="evaluate.tasks"):
    """Read one task's questions and few-shot examples from its release."""
    entry = check_task_settings(entry, where)
    release = Release(entry["name"], entry["path"])
    skipped, subjects = [], {}
    for subject in entry["subjects"]:
        examples = questions(release, "dev", subject, entry["skip_malformed"], skipped)
        if entry["shots"] > len(examples):
            raise InputError(f"{release.path}: {release.root}{release.benchmark.file('dev', subject)} (subject "
                             f"{subject}): shots {entry['shots']} but dev holds {len(examples)} usable examples")
        qs = questions(release, entry["split"], subject, entry["skip_malformed"], skipped)[:entry["limit"]]
        subjects[subject] = (subject_prefix(entry["name"], subject, examples[:entry["shots"]]), qs)
    return Task(entry["name"], entry["split"], entry["shots"], subjects, skipped)
