"""Command line for the pocket VLM: `build`, `train-projector`, `train-draft` and `info`.

Wired as `specvlm pocket ...`; also runnable as `python -m specvlm_hf.pocket.cli ...`.

```bash
specvlm pocket build                    # compose + cache the VLM (bf16 safetensors), reused if up to date
specvlm pocket train-projector          # reproduce assets/pocket/projector.safetensors on CPU
specvlm pocket train-draft              # reproduce assets/pocket/draft/ (the shipped SpecVLM draft) on CPU
specvlm pocket train-compressors        # compressor variants of the draft for the ablation (specvlm bench)
specvlm pocket info                     # where it is, sizes, provenance
```

A sub-command whose optional packages are missing stops before doing anything with a
[`~specvlm_hf.errors.MissingExtraError`] naming the extra to install (`pocket`, `pocket-train`; see
[`~specvlm_hf.pocket.requirements.COMMAND_EXTRAS`]); bad flags raise a one-line
[`~specvlm_hf.errors.UserValueError`]. The `specvlm` command prints either as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ..errors import UserValueError
from ..demo import non_negative_int, positive_int
from .requirements import require_command_extras

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag (unknown, invalid choice, bad value) as a one-line [`UserValueError`]."""

    def error(self, message: str):  # type: ignore[override]
        raise UserValueError(f"{message} (see `{self.prog} --help`)")


def _add_corpus_dir(parser: argparse.ArgumentParser) -> None:
    """`--corpus-dir`, shared by the commands that read the draft's training corpus."""
    parser.add_argument(
        "--corpus-dir", type=Path, default=None,
        help="the build-corpus folder (default: the cache's; the committed corpus when there is none)",
    )


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Builds (or fills, when given, e.g. a sub-parser of `specvlm`) the `pocket` argument parser."""
    from .compressor_ablation import VARIANTS
    from .train_draft import PocketDraftRecipe
    from .train_projector import ProjectorTrainingConfig

    parser = parser or _Parser(prog="specvlm pocket", description="The offline pocket VLM.")
    commands = parser.add_subparsers(dest="pocket_command", required=True)

    build = commands.add_parser("build", help="compose the pocket VLM from installed packages and cache it")
    build.add_argument(
        "--cache-dir", type=Path, default=None, help="output folder (default: $SPECVLM_HF_CACHE/pocket-vlm)"
    )
    build.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")

    defaults = ProjectorTrainingConfig()
    train = commands.add_parser("train-projector", help="train the projector on CPU (LM and vision tower frozen)")
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    train.add_argument(
        "--random-init", action="store_true", help="start from a random projector instead of the ImageNet init"
    )
    train.add_argument("--init-threshold", type=float, default=defaults.init_threshold)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--num-threads", type=int, default=defaults.num_threads, help="torch threads (0: torch default)")
    train.add_argument(
        "--max-minutes",
        type=float,
        default=defaults.max_minutes,
        help="safety stop: end training after this many minutes (0: never)",
    )
    train.add_argument(
        "--data-dir", default=None, help="cache for downloaded data (default: $SPECVLM_HF_CACHE/pocket-data)"
    )
    train.add_argument("--output-dir", default=defaults.output_dir, help="where the projector files are written")
    train.add_argument(
        "--sample-max-new-tokens",
        type=int,
        default=defaults.sample_max_new_tokens,
        help="greedy tokens on held-out photos before/after training (0: skip)",
    )

    recipe = PocketDraftRecipe()
    draft = commands.add_parser(
        "train-draft", help="reproduce the shipped SpecVLM draft (self-distilled data + online distillation, CPU)"
    )
    draft.add_argument(
        "--epochs", type=float, default=recipe.epochs,
        help=f"passes over the training records, fractions allowed (default: {recipe.epochs:g})",
    )
    draft.add_argument(
        "--learning-rate", type=float, default=recipe.learning_rate,
        help=f"peak learning rate of the cosine schedule (default: {recipe.learning_rate:g})",
    )
    draft.add_argument(
        "--batch-size", type=positive_int, default=recipe.batch_size,
        help=f"records per optimizer step (default: {recipe.batch_size})",
    )
    draft.add_argument(
        "--draft-vocab-size", type=positive_int, default=recipe.draft_vocab_size,
        help=f"ids of the draft's reduced head, the most frequent answer tokens (default: {recipe.draft_vocab_size})",
    )
    draft.add_argument(
        "--train-records", type=int, default=None, help="train on the first N corpus records (default: all)"
    )
    draft.add_argument("--ttt-steps", type=positive_int, default=recipe.ttt_steps, help="training-time test steps (1: EAGLE-1)")
    draft.add_argument("--ttt-decay", type=float, default=recipe.ttt_decay, help="loss weight decay per TTT step")
    draft.add_argument(
        "--lambda-logit", type=float, default=recipe.lambda_logit,
        help=f"weight of the distillation loss on the teacher's token distribution (default: {recipe.lambda_logit:g})",
    )
    draft.add_argument(
        "--lambda-feat", type=float, default=recipe.lambda_feat,
        help=f"weight of the feature-regression loss (default: {recipe.lambda_feat:g})",
    )
    draft.add_argument(
        "--target-layer-ids", type=int, nargs="+", default=None,
        help="target layers the draft reads (default: the last; e.g. 2 15 -1 for EAGLE-3-style fusion)",
    )
    draft.add_argument(
        "--teacher-dtype", default=recipe.teacher_dtype, choices=["auto", *DTYPES],
        help="dtype of the teacher's forward (auto: bfloat16 where the CPU has native bf16 units, else float32)",
    )
    draft.add_argument(
        "--evaluations-per-epoch", type=int, default=recipe.evaluations_per_epoch,
        help="bench-prompt acceptance measurements (fp32, T=0 and 1) per epoch",
    )
    draft.add_argument("--seed", type=int, default=recipe.seed, help=f"draft initialisation and data order (default: {recipe.seed})")
    draft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work dir")
    draft.add_argument(
        "--overwrite-output", action="store_true",
        help="replace a trained draft already in the output dir (refused otherwise, before any training; a --resume "
        "run replaces it anyway: it continues the run that wrote it)",
    )
    draft.add_argument(
        "--no-untrained-eval", dest="measure_untrained", action="store_false",
        help="skip the acceptance measurement before training (it depends only on seed, draft shape and vocabulary)",
    )
    _add_corpus_dir(draft)
    draft.add_argument("--work-dir", type=Path, default=None, help="data and trainer folder (default: cache)")
    draft.add_argument("--output-dir", type=Path, default=None, help="where the draft is written (default: assets)")
    draft.add_argument(
        "--num-threads", type=non_negative_int, default=0,
        help="torch threads (0: torch default; 1 when another job shares the cores)",
    )

    prune = commands.add_parser(
        "prune-draft-vocab",
        help="shrink a trained draft's reduced head to its most frequent ids, keeping the trained rows (cheaper draft "
        "steps on CPU; acceptance measured before and after)",
    )
    prune.add_argument(
        "--draft-vocab-size", type=positive_int, required=True,
        help="ids kept, the most frequent answer tokens of the draft's training records (fewer than it has now)",
    )
    prune.add_argument("--draft-dir", type=Path, default=None, help="the trained draft (default: the shipped one)")
    prune.add_argument(
        "--output-dir", type=Path, default=None, help="where the pruned draft is written (default: --draft-dir)"
    )
    prune.add_argument(
        "--overwrite-output", action="store_true", help="replace a draft already in the output dir (refused otherwise)"
    )
    prune.add_argument(
        "--no-measure", dest="measure", action="store_false",
        help="skip the acceptance measurement before and after pruning (about 4 minutes on a 2-core CPU)",
    )
    _add_corpus_dir(prune)
    prune.add_argument("--work-dir", type=Path, default=None, help="data folder, as for train-draft (default: cache)")
    prune.add_argument("--num-threads", type=non_negative_int, default=0, help="torch threads (0: torch default)")

    from .corpus import CorpusRecipe

    corpus_recipe = CorpusRecipe()
    corpus = commands.add_parser(
        "build-corpus",
        help="the draft's training corpus at scale: >10,000 prompts (disjoint from the benchmark) answered by the "
        "pocket VLM in large batches (resumable)",
    )
    corpus.add_argument("--image-records", type=non_negative_int, default=corpus_recipe.image_records)
    corpus.add_argument("--multi-image-records", type=non_negative_int, default=corpus_recipe.multi_image_records)
    corpus.add_argument("--text-records", type=non_negative_int, default=corpus_recipe.text_records)
    corpus.add_argument("--long-answer-fraction", type=float, default=corpus_recipe.long_answer_fraction)
    corpus.add_argument("--max-new-tokens", type=positive_int, default=corpus_recipe.max_new_tokens)
    corpus.add_argument("--long-max-new-tokens", type=positive_int, default=corpus_recipe.long_max_new_tokens)
    corpus.add_argument("--seed", type=int, default=corpus_recipe.seed)
    corpus.add_argument("--batch-size", type=positive_int, default=64, help="rows per generate call (left-padded)")
    corpus.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="generation dtype (auto: policy)")
    corpus.add_argument("--limit", type=positive_int, default=None, help="answer only the first N prompts (a balanced prefix)")
    corpus.add_argument("--work-dir", type=Path, default=None, help="default: cache/pocket-draft/corpus")
    corpus.add_argument("--export", action="store_true", help="also write the gzipped copy committed in assets/")
    corpus.add_argument(
        "--export-only", action="store_true",
        help="write the gzipped copy of what the work dir holds now (e.g. of an interrupted run), generate nothing",
    )
    corpus.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch default)")

    report = commands.add_parser(
        "draft-report", help="acceptance by epoch of draft training runs: a table and a plot"
    )
    report.add_argument(
        "--run", nargs="+", required=True, metavar="LABEL=PATH",
        help="a run's bench_acceptance.jsonl (train-draft work folder) or draft_provenance.json, with a label",
    )
    report.add_argument("--out", type=Path, required=True, help="folder for acceptance.md and acceptance.png")
    report.add_argument("--title", default="", help="plot title")

    ablation = commands.add_parser(
        "train-compressors", help="fine-tune compressor variants of the shipped draft for the #4 ablation"
    )
    ablation.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all")
    ablation.add_argument("--output-root", type=Path, default=None, help="default: cache/pocket-draft/ablation")
    ablation.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch default)")

    info = commands.add_parser("info", help="print where the pocket VLM is, its size and provenance")
    info.add_argument("--cache-dir", type=Path, default=None)
    return parser


def _info(cache_dir: Path | None) -> int:
    from .build import PROVENANCE_FILE, committed_projector_path, default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    projector = committed_projector_path()
    print(
        f"committed projector: {projector} ({projector.stat().st_size / 1e6:.2f} MB)"
        if projector.is_file()
        else f"committed projector: none at {projector} (the build uses a random projector)"
    )
    provenance = cache_dir / PROVENANCE_FILE
    if not provenance.is_file():
        print(f"pocket VLM: not built in {cache_dir} (run `specvlm pocket build`)")
        return 1
    size = sum(path.stat().st_size for path in cache_dir.iterdir() if path.is_file())
    record = json.loads(provenance.read_text())
    parameters = record["num_parameters"] / 1e6
    print(f"pocket VLM: {cache_dir} ({size / 1e6:.1f} MB, {record['dtype']}, {parameters:.2f}M parameters)")
    print(json.dumps({key: record[key] for key in ("sources", "projector", "package_versions")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the `pocket` command line; returns the exit status."""
    args = make_parser().parse_args(argv)
    require_command_extras(args.pocket_command)
    if args.pocket_command == "build":
        from .build import build_pocket_vlm

        print(build_pocket_vlm(args.cache_dir, dtype=DTYPES[args.dtype], force=args.force))
        return 0
    if args.pocket_command == "train-projector":
        from .train_projector import ProjectorTrainingConfig, train_projector

        config = ProjectorTrainingConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            imagenet_init=not args.random_init,
            init_threshold=args.init_threshold,
            seed=args.seed,
            num_threads=args.num_threads or None,
            max_minutes=args.max_minutes or None,
            data_dir=args.data_dir,
            output_dir=args.output_dir,
            sample_max_new_tokens=args.sample_max_new_tokens,
        )
        command = "specvlm pocket " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(train_projector(config, command=command))
        return 0
    if args.pocket_command == "train-draft":
        from .train_draft import DRAFT_DIR, PocketDraftRecipe, train_pocket_draft

        if args.epochs <= 0:
            raise UserValueError(f"--epochs must be positive, got {args.epochs}")
        recipe = PocketDraftRecipe(
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            draft_vocab_size=args.draft_vocab_size,
            train_records=args.train_records,
            ttt_steps=args.ttt_steps,
            ttt_decay=args.ttt_decay,
            lambda_logit=args.lambda_logit,
            lambda_feat=args.lambda_feat,
            target_layer_ids=args.target_layer_ids,
            teacher_dtype=args.teacher_dtype,
            evaluations_per_epoch=args.evaluations_per_epoch,
            seed=args.seed,
        )
        command = "specvlm pocket " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(train_pocket_draft(
            recipe, args.work_dir, args.output_dir or DRAFT_DIR, command, args.num_threads or None, resume=args.resume,
            corpus_dir=args.corpus_dir, measure_untrained=args.measure_untrained,
            overwrite_output=args.overwrite_output,
        ))
        return 0
    if args.pocket_command == "prune-draft-vocab":
        from .prune_draft import prune_pocket_draft

        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        command = "specvlm pocket " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(prune_pocket_draft(
            args.draft_vocab_size, args.draft_dir, args.output_dir, work_dir=args.work_dir, corpus_dir=args.corpus_dir,
            command=command, overwrite_output=args.overwrite_output, measure=args.measure,
        ))
        return 0
    if args.pocket_command == "build-corpus":
        from .corpus import CorpusRecipe, make_corpus

        recipe = CorpusRecipe(
            seed=args.seed,
            image_records=args.image_records,
            multi_image_records=args.multi_image_records,
            text_records=args.text_records,
            long_answer_fraction=args.long_answer_fraction,
            max_new_tokens=args.max_new_tokens,
            long_max_new_tokens=args.long_max_new_tokens,
        )
        if args.export_only:
            from .build import package_versions
            from .corpus import default_corpus_dir, export_corpus

            answers = (args.work_dir or default_corpus_dir()) / "answers.jsonl"
            if not answers.is_file():
                raise UserValueError(f"nothing to export: no {answers} (run build-corpus first)")
            print(export_corpus(answers, recipe, {"exported_from": str(answers)}, package_versions()))
            return 0
        stats = make_corpus(
            recipe, args.work_dir, dtype=args.dtype, batch_size=args.batch_size, limit=args.limit,
            num_threads=args.num_threads or None, export=args.export,
        )
        print(json.dumps(stats, indent=2))
        return 0
    if args.pocket_command == "draft-report":
        from .draft_report import write_report

        runs = {}
        for spec in args.run:
            label, separator, path = spec.rpartition("=")  # labels may hold "=" (e.g. "TTT K=2")
            if not separator or not label or not path:
                raise UserValueError(f"--run takes LABEL=PATH, got {spec!r}")
            runs[label] = Path(path)
        for path in write_report(runs, args.out, args.title):
            print(path)
        return 0
    if args.pocket_command == "train-compressors":
        from .compressor_ablation import train_variants

        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        for name, path in train_variants(args.variants, args.output_root).items():
            print(f"{name}: {path}")
        return 0
    return _info(args.cache_dir)


if __name__ == "__main__":
    raise SystemExit(main())
