"""Trains the pocket VLM's shipped SpecVLM draft: self-distilled data, online-logit distillation, provenance.

The recipe, end to end on a CPU:

1. `specvlm pocket build-corpus` ([`~specvlm_hf.pocket.corpus.make_corpus`]): >10,000 varied prompts disjoint from
   the benchmark, answered greedily by the pocket VLM itself in large left-padded batches (resumable, keyed to its
   input), so the draft learns the distribution it will have to predict (ViSpec §4.3). The answers are committed
   (`assets/pocket/draft_data/answers.jsonl.gz`); images are recreated from their names.
2. `specvlm pocket train-draft` ([`train_pocket_draft`]): `SpecVLMDraftModel.from_target(target)` with a reduced
   EAGLE-3 vocabulary built from the training answers, trained by [`OnlineDistillationTrainer`] against the live
   target (optionally with EAGLE-3's training-time test, `ttt_steps`), its real acceptance measured on the committed
   benchmark prompts (fp32, T=0 and T=1) before training and several times per epoch, saved in bf16 with a
   provenance record and a card into `assets/pocket/draft/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import UserValueError
from .build import cache_root, package_versions
from .draft import DRAFT_DIR

logger = logging.getLogger(__name__)

DRAFT_PROVENANCE_FILE = "draft_provenance.json"
COMMANDS_FILE = "commands.jsonl"  # every call that trained the checkpoints of a work dir (see `_record_command`)
EPOCH_SECONDS_FILE = "epoch_seconds.json"  # wall seconds of every finished epoch, across resumed calls
POCKET_TARGET_NAME = "specvlm-hf pocket VLM (local build: specvlm pocket build)"


@dataclass
class PocketDraftRecipe:
    """Every knob of the shipped draft's recipe (saved in its provenance record).

    The corpus ([`~specvlm_hf.pocket.corpus.CorpusRecipe`], `specvlm pocket build-corpus`) is made first; this
    recipe trains on its first `train_records` answers (all but the last `eval_records` when `None`).
    """

    seed: int = 1
    train_records: int | None = None
    eval_records: int = 64
    draft_vocab_size: int = 8192
    epochs: float = 1.0
    learning_rate: float = 5e-4
    batch_size: int = 8
    warmup_ratio: float = 0.02
    feature_noise: float = 0.1
    lambda_logit: float = 0.1  # OnlineDistillationConfig's loss weights (EAGLE-1's balance by default)
    lambda_feat: float = 1.0
    ttt_steps: int = 2
    ttt_decay: float = 0.8
    target_layer_ids: list[int] | None = None
    teacher_dtype: str = "auto"  # the demo's policy: bf16 where the CPU has native bf16 units, else fp32
    bf16_autocast: bool = False  # draft under bf16 autocast: measured slower on a 2-core AVX512-BF16 CPU (99 s vs 64 s)
    evaluations_per_epoch: int = 2
    bench_max_new_tokens: int = 128
    bench_temperatures: tuple[float, ...] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)


def default_work_dir() -> Path:
    """Cache folder of the draft recipe's data and checkpoints (`~/.cache/specvlm_hf/pocket-draft`)."""
    return cache_root() / "pocket-draft"


def corpus_training_file(work_dir: str | Path, corpus_dir: str | Path | None = None) -> Path:
    """
    `work_dir/train.jsonl`: the corpus answers (the local `specvlm pocket build-corpus` output when it exists,
    else the committed copy) with image paths relative to `work_dir`, every corpus image drawn.

    Raises:
        [`~specvlm_hf.errors.UserFileNotFoundError`] when there is neither a local corpus nor a committed one.
    """
    from ..errors import UserFileNotFoundError
    from .corpus import COMMITTED_ANSWERS, default_corpus_dir, materialize_images, read_answers

    work_dir = Path(work_dir)
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    local = corpus_dir / "answers.jsonl"
    rows = read_answers(local) if local.is_file() else read_answers(COMMITTED_ANSWERS)
    if not rows:
        raise UserFileNotFoundError(
            f"no corpus answers in {local} nor {COMMITTED_ANSWERS}: run `specvlm pocket build-corpus` first"
        )
    materialize_images(rows, corpus_dir / "images")
    relative = os.path.relpath(corpus_dir, work_dir)
    out = work_dir / "train.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".tmp"), "w", encoding="utf-8") as handle:
        for row in rows:
            images = [f"{relative}/{path}" for path in row.get("images", [])]
            handle.write(json.dumps({**row, "images": images}, ensure_ascii=False) + "\n")
    out.with_suffix(".tmp").replace(out)
    return out


def split_records(path: str | Path, eval_records: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Loads the self-distilled JSONL (image paths made absolute) and splits off the last `eval_records` records."""
    from ..training.data import load_llava_records

    records = load_llava_records(path)
    if len(records) <= eval_records:
        raise ValueError(f"{path} has {len(records)} records; need more than eval_records={eval_records}")
    return records[:-eval_records], records[-eval_records:]


def epoch_acceptance(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-evaluation rows of a Trainer `log_history`: epoch, mean acceptance length, eval loss terms."""
    rows = []
    for entry in log_history:
        if "eval_mean_accept_len" in entry:
            rows.append({key: value for key, value in entry.items() if key.startswith("eval_") or key == "epoch"})
    return rows


def plot_acceptance_curve(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Plots mean acceptance length (bonus token included) against training epochs and saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row.get("epoch", 0.0) for row in rows]
    accept = [row["eval_mean_accept_len"] for row in rows]
    figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    axis.plot(epochs, accept, marker="o")
    for x, y in zip(epochs, accept, strict=True):
        axis.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axis.set_xlabel("training epoch")
    axis.set_ylabel("mean acceptance length (incl. bonus)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


class _EpochTimer(TrainerCallback):
    """
    Records the wall time of every training epoch, evaluation excluded, in `path` (JSON) as well, so that a resumed
    run reports the epochs of its earlier calls too (`resume=True` keeps the file, a fresh run starts it over). An
    epoch split across two calls counts only its part after the resume.
    """

    def __init__(self, path: Path | None = None, resume: bool = False) -> None:
        self.path = path
        self.seconds: list[float] = []
        if path is not None and resume and path.is_file():
            self.seconds = [float(value) for value in json.loads(path.read_text())]
        elif path is not None:
            path.unlink(missing_ok=True)
        self._start = 0.0
        self._paused = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start, self._paused = time.perf_counter(), 0.0

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start - self._paused)
        if self.path is not None:
            self.path.write_text(json.dumps(self.seconds) + "\n")


@torch.no_grad()
def bench_acceptance(
    target: torch.nn.Module,
    processor: Any,
    draft: torch.nn.Module,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    prompts_path: str | Path | None = None,
) -> dict[str, Any]:
    """
    The draft's real acceptance on the committed benchmark prompts: `target.generate(**prompt,
    assistant_model=draft)` one prompt at a time (batch 1, the draft's default adaptive tree), greedy at
    `temperature=0`, sampling (seeded per prompt) otherwise.

    Returns:
        `dict`: `temperature`, `prompts`, `mean_accept_len` (bonus token included), `mean_accepted_draft_tokens`,
        `acceptance_per_depth` (share of cycles whose accepted path reaches each depth), `exact_match` (greedy
        only: the share of prompts whose tokens equal plain `generate`'s, which the loop guarantees), `seconds`.
    """
    from ..bench.prompts import DEFAULT_PROMPTS_PATH, load_prompts, render_batch
    from ..generation.stats import SpeculationStats

    parameter = next(target.parameters())
    was_training = draft.training
    draft.eval()
    total = SpeculationStats()
    exact = 0
    started = time.perf_counter()
    prompts = load_prompts(prompts_path or DEFAULT_PROMPTS_PATH)
    try:
        for index, prompt in enumerate(prompts):
            inputs = render_batch(processor, [prompt], parameter.device, parameter.dtype)
            sampling = {"do_sample": temperature > 0}
            if temperature > 0:
                sampling.update(temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed + index)
            out = target.generate(
                **inputs, assistant_model=draft, max_new_tokens=min(prompt.max_new_tokens, max_new_tokens),
                return_dict_in_generate=True, **sampling,
            )
            total = total.merge(out.speculation)
            if temperature == 0:
                plain = target.generate(
                    **inputs, max_new_tokens=min(prompt.max_new_tokens, max_new_tokens), do_sample=False
                )
                exact += int(torch.equal(plain, out.sequences))
    finally:
        draft.train(was_training)
    row = {
        "temperature": temperature,
        "prompts": len(prompts),
        "mean_accept_len": total.mean_accept_len,
        "mean_accepted_draft_tokens": total.mean_accepted_draft_tokens,
        "acceptance_per_depth": total.acceptance_per_depth,
        "seconds": time.perf_counter() - started,
    }
    if temperature == 0:
        row["exact_match"] = exact / len(prompts)
    return row


class _BenchAcceptance(TrainerCallback):
    """Measures [`bench_acceptance`] (fp32 target, every recipe temperature) at each evaluation point."""

    def __init__(self, target, processor, recipe: PocketDraftRecipe, every: int, log_path: Path, timer: _EpochTimer):
        self.target, self.processor, self.recipe, self.every = target, processor, recipe, every
        self.log_path, self.timer = log_path, timer
        self.rows: list[dict[str, Any]] = []

    def measure(self, draft: torch.nn.Module, epoch: float, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        row: dict[str, Any] = {"epoch": round(epoch, 3), "step": step}
        for temperature in self.recipe.bench_temperatures:
            result = bench_acceptance(
                self.target, self.processor, draft, temperature=temperature,
                max_new_tokens=self.recipe.bench_max_new_tokens, seed=self.recipe.seed,
            )
            row[f"T{temperature:g}"] = result
        self.rows.append(row)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        logger.info("bench acceptance at epoch %.2f: %s", epoch, {k: v for k, v in row.items()})
        self.timer.pause(time.perf_counter() - started)
        return row

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.epoch or 0.0, state.global_step)


def train_pocket_draft(
    recipe: PocketDraftRecipe | None = None,
    work_dir: str | Path | None = None,
    output_dir: str | Path = DRAFT_DIR,
    command: str | None = None,
    num_threads: int | None = None,
    resume: bool = False,
    corpus_dir: str | Path | None = None,
    measure_untrained: bool = True,
    overwrite_output: bool = False,
) -> Path:
    """
    Trains the shipped draft on the corpus and writes it (bf16 safetensors, config, model card),
    `draft_provenance.json` and `acceptance_by_epoch.png` into `output_dir`.

    The teacher runs in the fastest exact dtype of the machine (`recipe.teacher_dtype="auto"`); the draft keeps fp32
    master weights. `recipe.evaluations_per_epoch` times per epoch (and before training) the draft's real acceptance
    is measured on the committed benchmark prompts with an fp32 target (exact), at each of
    `recipe.bench_temperatures` ([`bench_acceptance`]); rows are appended to `work_dir/bench_acceptance.jsonl` as
    they come. Trainer checkpoints are written at every evaluation point into `work_dir/trainer`; `resume=True`
    continues from the latest one. `corpus_dir` is the `specvlm pocket build-corpus` folder (default: the cache's;
    without a local corpus the committed one is used). `measure_untrained=False` skips the measurement before training
    (2-4 min on a 2-core CPU; it depends only on the seed, the draft shape and the draft vocabulary). A trained draft
    already in `output_dir` is refused before anything runs unless `overwrite_output=True` or `resume=True` (a resumed
    run continues the one that wrote it).

    Returns:
        `Path`: `output_dir`.
    """
    from ..demo import choose_dtype
    from ..models import SpecVLMDraftModel
    from ..training import OnlineDistillationConfig, OnlineDistillationTrainer, build_draft_vocab
    from ..training.data import DistillationDataset
    from .build import load_pocket_vlm

    recipe = recipe or PocketDraftRecipe()
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    output_dir = Path(output_dir)
    if num_threads:
        torch.set_num_threads(num_threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    trainer_dir = work_dir / "trainer"
    if not resume and any(trainer_dir.glob("checkpoint-*")):
        raise UserValueError(
            f"{trainer_dir} holds checkpoints of an earlier run: pass --resume to continue it, or delete the folder"
        )
    if not resume and not overwrite_output and (output_dir / "model.safetensors").is_file():
        raise UserValueError(
            f"{output_dir} already holds a trained draft: pass --overwrite-output to replace it, or choose another "
            "--output-dir"
        )
    commands = _record_command(work_dir, command or "specvlm pocket train-draft", resume)
    teacher_dtype = choose_dtype(recipe.teacher_dtype)
    target, processor = load_pocket_vlm(dtype=teacher_dtype.dtype)
    exact_target, _ = load_pocket_vlm(dtype=torch.float32)  # the per-epoch acceptance is measured in fp32

    started = time.perf_counter()
    rows = split_records(corpus_training_file(work_dir, corpus_dir), recipe.eval_records)
    train_rows, eval_rows = rows
    if recipe.train_records is not None:
        train_rows = train_rows[: recipe.train_records]
    data_seconds = time.perf_counter() - started

    torch.manual_seed(recipe.seed)
    overrides: dict[str, Any] = {}
    if recipe.target_layer_ids is not None:
        overrides["target_layer_ids"] = list(recipe.target_layer_ids)
    draft = SpecVLMDraftModel.from_target(target, **overrides).float()  # fp32 master weights
    autocast = recipe.bf16_autocast
    steps_per_epoch = math.ceil(len(train_rows) / recipe.batch_size)
    every = max(1, steps_per_epoch // max(1, recipe.evaluations_per_epoch))
    extra_args: dict[str, Any] = {}
    if recipe.ttt_steps != 1:
        extra_args.update(ttt_steps=recipe.ttt_steps, ttt_decay=recipe.ttt_decay)
    args = OnlineDistillationConfig(
        output_dir=str(trainer_dir),
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="cosine",
        feature_noise=recipe.feature_noise,
        lambda_logit=recipe.lambda_logit,
        lambda_feat=recipe.lambda_feat,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        logging_steps=20,
        eval_acceptance_prompts=0,
        report_to=[],
        seed=recipe.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=autocast,
        **extra_args,
    )
    train_set = DistillationDataset(train_rows, processor, max_length=args.max_length)
    eval_set = DistillationDataset(eval_rows, processor, max_length=args.max_length)
    vocab = build_draft_vocab(draft, target, train_set, recipe.draft_vocab_size)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=processor,
    )
    timer = _EpochTimer(work_dir / EPOCH_SECONDS_FILE, resume=resume)
    bench = _BenchAcceptance(exact_target, processor, recipe, every, work_dir / "bench_acceptance.jsonl", timer)
    if not resume:
        (work_dir / "bench_acceptance.jsonl").unlink(missing_ok=True)
        if measure_untrained:
            bench.measure(draft, 0.0, 0)  # the untrained draft
    trainer.add_callback(timer)
    trainer.add_callback(bench)
    trained = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = time.perf_counter() - trained
    final_eval = trainer.evaluate()
    bench_rows = [json.loads(line) for line in (work_dir / "bench_acceptance.jsonl").read_text().splitlines()]

    output_dir.mkdir(parents=True, exist_ok=True)
    draft = trainer.accelerator.unwrap_model(trainer.model).to(torch.bfloat16)
    draft.config.target_model_name_or_path = POCKET_TARGET_NAME  # not this machine's cache path
    draft.save_pretrained(output_dir)
    for code in output_dir.glob("*.py"):  # remote-code copies: the package itself provides the classes
        code.unlink()
    evaluations = [
        {"epoch": row["epoch"], "eval_mean_accept_len": row["T0"]["mean_accept_len"],
         **({"eval_mean_accept_len_T1": row["T1"]["mean_accept_len"]} if "T1" in row else {})}
        for row in bench_rows
    ]
    plot_acceptance_curve(
        evaluations, output_dir / "acceptance_by_epoch.png",
        f"pocket VLM draft, {len(train_rows)} self-distilled records, bench prompts, fp32, T=0",
    )
    from .corpus import COMMITTED_ANSWERS

    corpus_meta = COMMITTED_ANSWERS.parent / "corpus_meta.json"
    provenance = {
        "command": command or "specvlm pocket train-draft",
        "commands": commands,
        "recipe": asdict(recipe),
        "teacher_dtype": str(teacher_dtype.dtype).removeprefix("torch."),
        "teacher_dtype_reason": teacher_dtype.reason,
        "data": {
            "train_records": len(train_rows),
            "train_answer_tokens": sum(int(row.get("answer_tokens", 0)) for row in train_rows),
            "eval_records": len(eval_rows),
            "sources": "the pocket corpus (`specvlm pocket build-corpus`): one-image prompts over CaptionMixture "
            "images with colour jitter, two- and three-image prompts, text-only instructions of many kinds, 15% "
            "asking for long answers; disjoint from the benchmark (checked); answers generated greedily by the pocket "
            "VLM itself",
            "corpus": json.loads(corpus_meta.read_text()) if corpus_meta.is_file() else None,
            "data_seconds": data_seconds,
        },
        "acceptance_setup": (
            f"the {bench_rows[0]['T0']['prompts']} committed benchmark prompts (never trained on), fp32 target, "
            f"greedy, max_new_tokens={recipe.bench_max_new_tokens}, the draft's default adaptive tree"
        ),
        "draft_vocab_size": int(vocab.numel()),
        "train_seconds": train_seconds,
        "epoch_seconds": timer.seconds,
        "evaluations": evaluations,
        "bench_acceptance": bench_rows,
        "final_eval": final_eval,
        "torch_threads": torch.get_num_threads(),
        "package_versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (output_dir / DRAFT_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    write_draft_card(draft, output_dir, provenance)
    return output_dir


# flags that say where files go and how many threads run, not what is trained: left out of the card's command
_MACHINE_FLAGS = ("--work-dir", "--output-dir", "--corpus-dir", "--draft-dir", "--num-threads")


def _record_command(work_dir: Path, command: str, resume: bool) -> list[str]:
    """
    Appends `command` to `work_dir/commands.jsonl` and returns every command that shaped the run in that folder, in
    order: a fresh run starts the list over, a `--resume` continues it (so a draft trained in several calls records
    all of them).
    """
    path = work_dir / COMMANDS_FILE
    previous = []
    if resume and path.is_file():
        previous = [json.loads(line)["command"] for line in path.read_text().splitlines() if line.strip()]
    lines = [*previous, command]
    path.write_text("".join(json.dumps({"command": line}) + "\n" for line in lines))
    return lines


def portable_command(command: str) -> str:
    """`command` without the flags that only say where files go or how many threads run ([`_MACHINE_FLAGS`])."""
    words, kept, skip = shlex.split(command), [], False
    for word in words:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in _MACHINE_FLAGS:
            skip = "=" not in word
            continue
        kept.append(word)
    return shlex.join(kept)


def write_draft_card(
    draft: Any,
    output_dir: str | Path,
    provenance: dict[str, Any],
    speedup: float | None = None,
    speedup_setup: str | None = None,
) -> str:
    """Writes (or updates) the shipped draft's model card, `README.md`, from its provenance record.

    The card is the common draft card (`hub_cards/draft.md`, rendered by `specvlm_hf.hub.create_model_card`) with the
    pocket quick start, the acceptance length after every epoch, the recipe and the command that reproduces it; the last
    measured acceptance length and the speedup are also published as `model-index` results.

    Args:
        draft ([`SpecVLMDraftModel`]): the trained draft.
        output_dir (`str` or `Path`): the draft's folder (`README.md` is written there; text outside the generated
            block of an existing card is kept).
        provenance (`dict`): the draft's provenance record (`draft_provenance.json`).
        speedup (`float`, *optional*): measured end-to-end speedup over plain decoding (`specvlm bench`).
        speedup_setup (`str`, *optional*): how the speedup was measured (command, date, hardware, dtype, prompts).

    Returns:
        `str`: the card text.
    """
    from ..hub import create_model_card

    recipe, data = provenance["recipe"], provenance["data"]
    measured = [row for row in provenance["evaluations"] if row.get("eval_mean_accept_len") is not None]
    last = measured[-1] if measured else None
    acceptance_setup = None
    if last is not None and provenance.get("acceptance_setup"):
        acceptance_setup = f"{provenance['acceptance_setup']}, after epoch {last['epoch']:g}"
    elif last is not None:
        prompts = last.get("eval_acceptance_prompts", recipe.get("eval_acceptance_prompts"))
        max_new_tokens = last.get("eval_acceptance_max_new_tokens", recipe.get("eval_acceptance_max_new_tokens"))
        acceptance_setup = (
            f"greedy, {int(prompts)} held-out prompts, max_new_tokens={int(max_new_tokens)}, after epoch "
            f"{last['epoch']:g} ({recipe.get('teacher_dtype', 'float32')} target)"
        )
    mean_accept_len = last["eval_mean_accept_len"] if last else None
    pruning = provenance.get("vocabulary_pruning")
    if pruning:  # the head was pruned after training: the card states the pruned draft's own acceptance
        after = (pruning.get("acceptance_after") or {}).get("T0")
        mean_accept_len = after["mean_accept_len"] if after else None
        acceptance_setup = (
            f"{provenance.get('acceptance_setup') or 'greedy'}, after the head was pruned from {pruning['from_size']:,} "
            f"to {pruning['size']:,} ids (`specvlm pocket prune-draft-vocab`, {pruning['date']})"
            if after else None
        )
    training = {key: value for key, value in recipe.items() if value not in (None, {}, [])}
    if pruning:
        training["draft_vocab_size"] = f"{pruning['from_size']} while training, then pruned to {pruning['size']}"
    if provenance.get("epoch_seconds"):
        training["seconds per epoch"] = ", ".join(f"{seconds:.0f}" for seconds in provenance["epoch_seconds"])
    if provenance.get("torch_threads"):
        training["torch threads"] = provenance["torch_threads"]
    return create_model_card(
        draft,
        output_dir,
        model_name="pocket VLM SpecVLM draft",
        dataset_name="Self-distilled pocket VLM answers",
        data_summary=(
            f"{data['train_records']:,} training records, {data['eval_records']:,} held out; "
            f"{data.get('sources', 'answers generated by the pocket VLM itself')}"
        ),
        training=training,
        mean_accept_len=mean_accept_len,
        acceptance_setup=acceptance_setup,
        speedup=speedup,
        speedup_setup=speedup_setup,
        accept_len_by_epoch=[(row["epoch"], row["eval_mean_accept_len"]) for row in measured],
        description=(
            "The trained draft of the offline pocket VLM (SmolLM2-135M-Instruct + EfficientNet-Lite0 as LLaVA, built "
            f"by `specvlm pocket build`), trained on {provenance.get('date', 'an unrecorded date')}; every number "
            f"below comes from `{DRAFT_PROVENANCE_FILE}`."
        ),
        quick_start=(
            "from specvlm_hf.pocket import demo_inputs, load_pocket_draft, load_pocket_vlm\n"
            "\n"
            "target, processor = load_pocket_vlm()\n"
            "draft = load_pocket_draft(target)\n"
            "out = target.generate(**demo_inputs(processor), assistant_model=draft, max_new_tokens=96)  # same tokens"
        ),
        reproduce=" && ".join(
            portable_command(line) for line in provenance.get("commands") or [provenance.get("command")] if line
        ) or None,
        framework_versions=provenance.get("package_versions"),
    )
