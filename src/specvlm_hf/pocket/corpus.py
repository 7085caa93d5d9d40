"""The pocket draft's training prompts at scale: >10,000 varied prompts, disjoint from the benchmark, reproducible.

[`build_corpus`] writes prompt-only LLaVA records (answers come from [`self_distill_corpus`]: the pocket VLM answers
every prompt greedily in large left-padded batches). What it mixes, all drawn from one seeded RNG:

- **one-image prompts** over [`corpus_image`]s: the projector's [`CaptionMixture`] stream under its own seed (emoji
  on plain, coloured or texture backgrounds, random crops and flips of the training photos, rendered words, coloured
  shapes), then colour jitter (brightness, contrast, saturation) on about half of them; asked one of
  [`IMAGE_INSTRUCTIONS`] (descriptions, captions, colours, counting, stories and poems about the picture, what
  happens next, lists, explanations for a child);
- **several-image prompts** (two or three images) asked one of [`MULTI_IMAGE_INSTRUCTIONS`];
- **text-only prompts** from [`TEXT_TEMPLATES`] (explanations, stories, poems, lists, how-to, descriptions,
  comparisons, letters, dialogues, pros and cons, advice) over ImageNet class names and [`GENERAL_TOPICS`];
- a share of **long-answer prompts** (ViSpec's trick: ask for long, detailed answers) generated with a larger
  `max_new_tokens`.

Images are not stored: an image's file name says how to make it (`c<seed>_<index>.png` is [`corpus_image`]`(seed,
index)`), so the committed answers ([`COMMITTED_ANSWERS`]) plus this module recreate the whole data set
([`materialize_images`]). [`check_corpus_disjoint`] refuses any record whose prompt text equals a benchmark prompt
or whose image has a benchmark image's pixels; the benchmark's text topics (the sky, the sea) are left out of the
topic lists.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from ..errors import UserValueError

logger = logging.getLogger(__name__)

#: The committed self-distilled corpus (gzipped JSONL; images are recreated from their names).
COMMITTED_ANSWERS = Path(__file__).resolve().parent.parent / "assets" / "pocket" / "draft_data" / "answers.jsonl.gz"
COMMITTED_META = "answers.meta.json"  # the committed answers' fingerprint (resuming them needs the same key)
_IMAGE_NAME = re.compile(r"^c(\d+)_(\d{7})\.png$")

IMAGE_INSTRUCTIONS = (
    "Describe the image.",
    "Describe this picture in detail.",
    "What is in this image?",
    "What do you see in this picture?",
    "Write a caption for this image.",
    "Give a short caption and then a longer description of this picture.",
    "What colours do you see in this image?",
    "How many objects are in this picture? Describe them.",
    "What is the main subject of this image?",
    "Describe the background of this picture.",
    "Write a short story inspired by this picture.",
    "Write a short poem about what you see in this image.",
    "What might happen next in this scene?",
    "Where could this picture have been taken? Explain why.",
    "List three things you notice in this image.",
    "Explain this picture to a child.",
    "What is the mood of this image?",
    "Is there any text in this image? What does it say?",
    "Describe the shapes and colours in this picture.",
    "What would be a good title for this picture? Explain your choice.",
    "Tell me something interesting about what this image shows.",
    "What is unusual about this picture?",
    "Describe this image as if you were talking to someone who cannot see it.",
    "Write an advertisement for the thing shown in this picture.",
    "What questions would you ask about this picture?",
)
LONG_IMAGE_INSTRUCTIONS = (
    "Describe this image in as much detail as you can, in several paragraphs.",
    "Write a long story of several paragraphs inspired by this picture.",
    "Give a very detailed description of everything in this picture, then explain what it might mean.",
)
MULTI_IMAGE_INSTRUCTIONS = (
    "Compare these images.",
    "What is the difference between these pictures?",
    "Describe each image.",
    "How are these images alike and how do they differ?",
    "Write a short story that connects these pictures.",
    "Which of these images do you like best, and why?",
    "List what you see in each picture.",
)
TEXT_TEMPLATES = (
    "Explain what {a} is.",
    "Explain in detail how {a} works.",
    "Write a short poem about {a}.",
    "Tell me a short story about {a}.",
    "Describe {a} in a few sentences.",
    "Give me three facts about {the}.",
    "Give me a list of five interesting facts about {the}.",
    "Why do people find {the} interesting?",
    "Write a short paragraph about {a}.",
    "How would you explain {a} to a five-year-old?",
    "What are the pros and cons of {a}?",
    "Compare {a} and {b}.",
    "What is the difference between {a} and {b}?",
    "Write a letter to a friend about {a}.",
    "Write a dialogue between two people talking about {a}.",
    "How do I take care of {a}? Give step-by-step advice.",
    "Write a how-to guide about {the}.",
    "Summarise what everyone should know about {the}.",
    "Write a riddle whose answer is {a}.",
    "Write a product description for {a}.",
    "What is the history of {the}?",
    "Write a news report about {a} that did something surprising.",
    "Give me some tips about {the}.",
    "Describe a day in the life of {a}.",
)
LONG_TEXT_TEMPLATES = (
    "Write a long, detailed essay about {the}, with several paragraphs.",
    "Tell me a long story about {a}, with a beginning, a middle and an end.",
    "Explain everything you know about {the}, in detail.",
    "Write a detailed guide of at least ten steps about {the}.",
)
GENERAL_TOPICS = (
    "photosynthesis", "gravity", "the moon", "volcano", "rainbow", "electricity", "magnet", "the human heart",
    "the internet", "a computer", "a bicycle", "a train", "an airplane", "the weather", "a thunderstorm", "snow",
    "a forest", "a desert", "a mountain", "a river", "a city", "a village", "a library", "a museum", "a school",
    "a hospital", "a farm", "a garden", "a kitchen", "bread", "coffee", "tea", "chocolate", "pizza", "soup",
    "cheese", "rice", "an apple", "a banana", "a robot", "a rocket", "a telescope", "a microscope", "a camera",
    "a smartphone", "a clock", "a map", "a compass", "a castle", "a bridge", "a lighthouse", "a windmill",
    "recycling", "friendship", "kindness", "music", "painting", "dancing", "football", "chess", "swimming",
    "running", "sleep", "exercise", "a healthy breakfast", "time management", "learning a language",
    "saving money", "a birthday party", "a holiday", "winter", "summer", "autumn", "spring", "the alphabet",
    "numbers", "fractions", "a triangle", "a circle", "dinosaurs", "the Roman Empire", "ancient Egypt",
    "the printing press", "the wheel", "fire", "water", "the desert fox", "bees", "ants", "whales",
    "a coral reef", "the solar system", "Mars", "a comet", "a black hole", "clouds", "wind", "earthquakes",
    "a newspaper", "a poem", "a letter", "a job interview", "a team", "a city park", "public transport",
    "an electric car", "solar power", "a battery", "a light bulb", "a refrigerator", "a washing machine",
    "a piano", "a guitar", "a violin", "a drum", "a theatre", "a film", "a book", "a diary", "a birthday cake",
    "a picnic", "a campfire", "a tent", "a backpack", "hiking", "a zoo", "a circus", "a market", "a bakery",
    "a restaurant", "a hotel", "an airport", "a spaceship", "a submarine", "a volcano eruption", "an island",
)
#: Topics and prompts of the benchmark's text-only prompts: never asked in training.
BENCH_TEXT_TOPICS = ("sky", "sea")


@dataclass
class CorpusRecipe:
    """Every knob of the pocket draft's training corpus (saved with the corpus and in the draft's provenance)."""

    seed: int = 11
    image_seed: int = 23  # CaptionMixture seed of the corpus images (projector: 0, the first draft: 7)
    image_records: int = 5000
    multi_image_records: int = 800
    text_records: int = 5200
    long_answer_fraction: float = 0.15
    max_new_tokens: int = 128
    long_max_new_tokens: int = 256
    jitter_probability: float = 0.5

    @property
    def total_records(self) -> int:
        return self.image_records + self.multi_image_records + self.text_records


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def _articles(topic: str, general: bool) -> dict[str, str]:
    """`{"a": ..., "the": ...}` forms of a topic: ImageNet class names are countable nouns ("a tabby", "the
    tabby"); [`GENERAL_TOPICS`] carry their own article ("a robot" -> "the robot") or none (mass nouns, plurals)."""
    if topic.startswith(("a ", "an ")):
        return {"a": topic, "the": "the " + topic.split(" ", 1)[1]}
    if general:
        return {"a": topic, "the": topic}
    article = "an" if topic[0].lower() in "aeiou" else "a"
    return {"a": f"{article} {topic}", "the": f"the {topic}"}


class CorpusImages:
    """Deterministic corpus images: `corpus_image(seed, index)` = a [`CaptionMixture`] item plus colour jitter.

    Args:
        data_dir (`str` or `Path`): cache of the emoji package (see [`~specvlm_hf.pocket.data.fetch_emoji`]).
        jitter_probability (`float`, *optional*, defaults to 0.5): share of images with colour jitter.
    """

    def __init__(self, data_dir: str | Path, jitter_probability: float = 0.5):
        from .data import CaptionMixture

        self._data_dir = data_dir
        self._streams: dict[int, Any] = {}
        self._mixture = CaptionMixture
        self.jitter_probability = jitter_probability

    def __call__(self, seed: int, index: int) -> Image.Image:
        stream = self._streams.get(seed)
        if stream is None:
            stream = self._streams[seed] = self._mixture(self._data_dir, seed=seed)
        image, _, _ = stream[index]
        rng = random.Random(f"jitter:{seed}:{index}")
        if rng.random() < self.jitter_probability:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
            image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
        return image.convert("RGB")


def image_name(seed: int, index: int) -> str:
    """File name of corpus image `index` of stream `seed` (its recipe: see [`materialize_images`])."""
    return f"c{seed}_{index:07d}.png"


def materialize_images(
    records: Iterable[dict[str, Any]], image_dir: str | Path, data_dir: str | Path | None = None,
    jitter_probability: float = 0.5, show_progress: bool = True,
) -> int:
    """Writes every missing corpus image named by `records` into `image_dir`; returns how many were written."""
    from .data import default_data_dir, fetch_emoji

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({Path(path).name for record in records for path in record.get("images", [])})
    missing = [name for name in names if not (image_dir / name).is_file()]
    for name in missing:
        if _IMAGE_NAME.match(name) is None:
            raise UserValueError(f"{name!r} is not a corpus image name (c<seed>_<index>.png) and is missing from {image_dir}")
    if not missing:
        return 0
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    fetch_emoji(data_dir)
    make = CorpusImages(data_dir, jitter_probability)
    for name in tqdm(missing, desc="Drawing corpus images", disable=not show_progress):
        match = _IMAGE_NAME.match(name)
        make(int(match.group(1)), int(match.group(2))).save(image_dir / name)
    return len(missing)


def build_corpus(recipe: CorpusRecipe, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """
    The corpus's prompt records, shuffled (every prefix is a balanced subset: the data-size ablation trains on
    prefixes).

    Records: `{"id", "images": ["images/c<seed>_<index>.png", ...], "conversations": [{"from": "human", "value"}],
    "max_new_tokens"}`. Ids are stable for a recipe.

    Args:
        recipe ([`CorpusRecipe`]): sizes and seeds.
        class_names (`Sequence[str]`): ImageNet class names (see [`~specvlm_hf.pocket.data.fetch_imagenet_class_names`]).
    """
    rng = random.Random(recipe.seed)
    topics = [(name, False) for name in class_names if name] + [(name, True) for name in GENERAL_TOPICS]
    topics = [t for t in topics if not any(re.search(rf"\b{w}\b", t[0].lower()) for w in BENCH_TEXT_TOPICS)]
    records: list[dict[str, Any]] = []
    next_image = 0

    def images(count: int) -> list[str]:
        nonlocal next_image
        paths = [f"images/{image_name(recipe.image_seed, next_image + i)}" for i in range(count)]
        next_image += count
        return paths

    def long_answer() -> bool:
        return rng.random() < recipe.long_answer_fraction

    for number in range(recipe.image_records):
        long = long_answer()
        question = rng.choice(LONG_IMAGE_INSTRUCTIONS if long else IMAGE_INSTRUCTIONS)
        records.append(_record(f"c-img{number}", images(1), "<image>\n" + question, recipe, long))
    for number in range(recipe.multi_image_records):
        count = 2 if rng.random() < 0.75 else 3
        question = rng.choice(MULTI_IMAGE_INSTRUCTIONS)
        records.append(_record(f"c-multi{number}", images(count), "<image>\n" * count + question, recipe, False))
    asked: set[str] = set()
    for number in range(recipe.text_records):
        long = long_answer()
        while True:  # no text prompt twice
            template = rng.choice(LONG_TEXT_TEMPLATES if long else TEXT_TEMPLATES)
            first, second = rng.sample(topics, 2)
            words = _articles(*first)
            question = template.format(a=words["a"], the=words["the"], b=_articles(*second)["a"])
            question = question[0].upper() + question[1:]
            if question not in asked:
                break
        asked.add(question)
        records.append(_record(f"c-txt{number}", [], question, recipe, long))
    rng.shuffle(records)
    return records


def _record(key: str, images: list[str], question: str, recipe: CorpusRecipe, long: bool) -> dict[str, Any]:
    return {
        "id": key,
        "images": images,
        "conversations": [{"from": "human", "value": question}],
        "max_new_tokens": recipe.long_max_new_tokens if long else recipe.max_new_tokens,
    }


def check_corpus_disjoint(
    records: Iterable[dict[str, Any]], image_dir: str | Path | None = None, bench_prompts: Sequence[dict] | None = None
) -> dict[str, int]:
    """
    Refuses (`ValueError`) a corpus that shares a prompt or an image with the benchmark.

    A text-only record may not equal a benchmark prompt (normalised text) nor mention a benchmark text topic
    ([`BENCH_TEXT_TOPICS`]); with `image_dir`, no corpus image may have the pixels of a benchmark image.

    Returns:
        `dict`: how many prompts and images were checked.
    """
    from ..bench.prompts import BENCH_DIR, DEFAULT_PROMPTS_PATH

    if bench_prompts is None:
        bench_prompts = [json.loads(line) for line in DEFAULT_PROMPTS_PATH.read_text().splitlines() if line.strip()]
    bench_texts = {_normalise(row["prompt"]) for row in bench_prompts if not row.get("images")}
    bench_digests = {
        hashlib.sha256(Image.open(BENCH_DIR / Path(path).name).convert("RGB").tobytes()).hexdigest()
        for row in bench_prompts for path in row.get("images", [])
    }
    checked_prompts = checked_images = 0
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", " ")
        if not record.get("images"):
            text = _normalise(question)
            if text in bench_texts or any(re.search(rf"\b{word}\b", text) for word in BENCH_TEXT_TOPICS):
                raise ValueError(f"corpus record {record['id']} repeats a benchmark text prompt: {question!r}")
        checked_prompts += 1
        if image_dir is not None:
            for path in record.get("images", []):
                with Image.open(Path(image_dir) / Path(path).name) as image:
                    digest = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
                if digest in bench_digests:
                    raise ValueError(f"corpus image {path} has the pixels of a benchmark image")
                checked_images += 1
    return {"prompts": checked_prompts, "images": checked_images}


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """Reads a (gzipped) answers JSONL; torn lines of an interrupted run are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    question = record["conversations"][0]["value"]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in record["images"]]
    content.append({"type": "text", "text": question.replace("<image>\n", "").strip()})
    return [{"role": "user", "content": content}]


def corpus_fingerprint(
    target: torch.nn.Module, processor: Any, records: Sequence[dict[str, Any]], batch_size: int, chunk_size: int,
    recipe: CorpusRecipe | None = None,
) -> dict[str, Any]:
    """What determines the corpus answers: the prompt records, the target (weights, dtype) and the batching."""
    from ..training.self_distill import regeneration_fingerprint

    settings: dict[str, Any] = {"batch_size": batch_size, "chunk_size": chunk_size, "greedy": True}
    if recipe is not None:
        settings["recipe"] = asdict(recipe)
    return regeneration_fingerprint(
        target, processor, list(records), max_new_tokens=max(int(r["max_new_tokens"]) for r in records),
        generation_kwargs=settings,
    )


def _resume_from_committed(output: Path, fingerprint: dict[str, Any]) -> int:
    """
    Starts `output` from the committed answers when there is no local output yet and the committed corpus was made
    by the same input (same fingerprint key); returns how many records it brought. Another key: nothing is copied
    and the reason is logged (records of another input are never mixed in).
    """
    from ..training.self_distill import _write_meta

    meta = COMMITTED_ANSWERS.parent / COMMITTED_META
    if output.exists() or not COMMITTED_ANSWERS.is_file() or not meta.is_file():
        return 0
    stored = json.loads(meta.read_text())
    if stored.get("key") != fingerprint["key"]:
        differs = [part for part in ("data", "target", "settings") if stored.get(part) != fingerprint.get(part)]
        logger.warning(
            "the committed corpus was generated with other %s (key %s, now %s): generating from scratch",
            "/".join(differs) or "settings", stored.get("key"), fingerprint["key"],
        )
        return 0
    rows = read_answers(COMMITTED_ANSWERS)
    with open(output, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    _write_meta(str(output), fingerprint)
    logger.info("resuming the committed corpus: %d records already answered", len(rows))
    return len(rows)


@torch.no_grad()
def self_distill_corpus(
    target: torch.nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    output_path: str | Path,
    *,
    batch_size: int = 64,
    chunk_size: int = 1024,
    recipe: CorpusRecipe | None = None,
    fingerprint: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """
    The pocket VLM answers every prompt record greedily, in left-padded batches of up to `batch_size` rows, and
    appends LLaVA records (with `answer_tokens`) to `output_path` (JSONL; image paths relative to its folder).

    Records are taken in their order, `chunk_size` at a time, and batched inside a chunk by number of images and
    `max_new_tokens` (so a prefix of the output is a balanced subset). The output is keyed to its input: the
    fingerprint of the records, the target and the settings is stored in `<stem>.meta.json`, and resuming into the
    output of another input raises instead of mixing records. Interrupted runs resume (records already written are
    skipped; a torn last line is dropped). The progress bar shows records/s and answer tokens/s. `fingerprint`
    defaults to [`corpus_fingerprint`] of `records` (pass the whole corpus's to answer only part of it).

    Returns:
        `dict`: `written`, `already_done`, `empty` (skipped empty answers), `answer_tokens`, `seconds`,
        `records_per_second`, `tokens_per_second` of this call.
    """
    from ..training.self_distill import _check_resumable, _completed_keys, _write_meta

    output_path = Path(output_path)
    root = output_path.parent
    if fingerprint is None:
        fingerprint = corpus_fingerprint(target, processor, records, batch_size, chunk_size, recipe)
    _check_resumable(str(output_path), fingerprint)
    done = _completed_keys(str(output_path))
    _write_meta(str(output_path), fingerprint)
    pending = [record for record in records if record["id"] not in done]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    parameter = next(target.parameters())
    stats = {"written": 0, "already_done": len(records) - len(pending), "empty": 0, "answer_tokens": 0}
    started = time.perf_counter()
    call = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch_size": batch_size,
            "dtype": str(parameter.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}
    bar = tqdm(total=len(pending), desc="Self-distilling the corpus", unit="rec", disable=not show_progress)
    with open(output_path, "a", encoding="utf-8") as handle:
        for begin in range(0, len(pending), chunk_size):
            groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for record in pending[begin : begin + chunk_size]:
                groups.setdefault((len(record["images"]), int(record["max_new_tokens"])), []).append(record)
            for (_, max_new_tokens), group in sorted(groups.items()):
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    answers = _answer_batch(target, processor, tokenizer, parameter, root, batch, max_new_tokens)
                    for record, (answer, length) in zip(batch, answers, strict=True):
                        if not answer:
                            stats["empty"] += 1
                            continue
                        conversation = record["conversations"] + [{"from": "gpt", "value": answer}]
                        row = {**record, "conversations": conversation, "answer_tokens": length}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                        stats["written"] += 1
                        stats["answer_tokens"] += length
                    handle.flush()
                    bar.update(len(batch))
                    elapsed = time.perf_counter() - started
                    _record_progress(output_path, call, stats, elapsed)
                    bar.set_postfix(rec_s=f"{stats['written'] / elapsed:.2f}", tok_s=f"{stats['answer_tokens'] / elapsed:.0f}")
    bar.close()
    seconds = time.perf_counter() - started
    stats.update(
        seconds=seconds,
        records_per_second=stats["written"] / seconds if seconds else 0.0,
        tokens_per_second=stats["answer_tokens"] / seconds if seconds else 0.0,
    )
    if stats["empty"]:
        logger.warning("Self-distillation: %d empty answers skipped.", stats["empty"])
    return stats


def progress_path(output_path: str | Path) -> Path:
    """`<stem>.progress.json`: every generation call's measured records/s and tokens/s (kept across resumes)."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.stem + ".progress.json")


def _record_progress(output_path: Path, call: dict[str, Any], stats: dict[str, Any], elapsed: float) -> None:
    path = progress_path(output_path)
    calls = json.loads(path.read_text()) if path.is_file() else []
    entry = {**call, "seconds": round(elapsed, 1), "written": stats["written"], "answer_tokens": stats["answer_tokens"],
             "records_per_second": stats["written"] / elapsed, "tokens_per_second": stats["answer_tokens"] / elapsed}
    calls = [c for c in calls if c.get("started") != call["started"]] + [entry]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(calls, indent=1) + "\n")
    temporary.replace(path)


def _answer_batch(target, processor, tokenizer, parameter, root: Path, batch, max_new_tokens: int):
    texts = [processor.apply_chat_template(_messages(r), add_generation_prompt=True) for r in batch]
    images = [Image.open(root / path).convert("RGB") for r in batch for path in r["images"]]
    if images:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    else:
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
    inputs = {
        k: (v.to(parameter.device, parameter.dtype) if torch.is_floating_point(v) else v.to(parameter.device))
        for k, v in inputs.items()
    }
    out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = target.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    pad = tokenizer.pad_token_id
    results = []
    for row in new:
        ids = row.tolist()
        length = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        if pad is not None and pad not in eos:
            length = min(length, next((i for i, t in enumerate(ids) if t == pad), length))
        text = tokenizer.decode(ids[:length], skip_special_tokens=True).strip()
        results.append((text, length))
    return results


def default_corpus_dir() -> Path:
    """Working folder of the corpus (answers, images, meta): `<cache_root()>/pocket-draft/corpus`."""
    from .build import cache_root

    return cache_root() / "pocket-draft" / "corpus"


def make_corpus(
    recipe: CorpusRecipe | None = None,
    work_dir: str | Path | None = None,
    *,
    dtype: str = "auto",
    batch_size: int = 64,
    limit: int | None = None,
    num_threads: int | None = None,
    export: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """
    The whole corpus stage of the pocket draft recipe: prompts ([`build_corpus`]), images ([`materialize_images`]),
    the disjointness check ([`check_corpus_disjoint`]) and the answers ([`self_distill_corpus`]) in
    `work_dir/answers.jsonl`. Resumable; `limit` answers only the first `limit` prompts (a balanced prefix).

    Args:
        dtype (`str`, *optional*, defaults to `"auto"`): the target's dtype for generation; `"auto"` is the demo's
            policy (bf16 where the CPU has native bf16 units and the exactness probe passes, else fp32): the
            fastest dtype whose batched greedy answers are the target's own.
        export (`bool`, *optional*, defaults to `False`): also write the answers, gzipped, to [`COMMITTED_ANSWERS`]
            (the copy committed with the project) and a `corpus_meta.json` beside it.

    Returns:
        `dict`: the generation statistics of this call plus `records` (prompts), `answered` (records in the output),
        `answer_tokens_total`, `dtype` and its reason.
    """
    from ..demo import choose_dtype
    from .build import load_pocket_vlm, package_versions
    from .data import default_data_dir, fetch_imagenet_class_names

    recipe = recipe or CorpusRecipe()
    work_dir = Path(work_dir) if work_dir is not None else default_corpus_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    choice = choose_dtype(dtype)
    corpus = build_corpus(recipe, fetch_imagenet_class_names(default_data_dir()))
    records = corpus[:limit] if limit is not None else corpus
    materialize_images(records, work_dir / "images", jitter_probability=recipe.jitter_probability,
                       show_progress=show_progress)
    checked = check_corpus_disjoint(records, work_dir / "images")
    logger.info("corpus disjoint from the benchmark: %s", checked)
    target, processor = load_pocket_vlm(dtype=choice.dtype)
    output = work_dir / "answers.jsonl"
    fingerprint = corpus_fingerprint(target, processor, corpus, batch_size, 1024, recipe)
    _resume_from_committed(output, fingerprint)
    stats = self_distill_corpus(
        target, processor, records, output, batch_size=batch_size, recipe=recipe, fingerprint=fingerprint,
        show_progress=show_progress,
    )
    answered = read_answers(output)
    stats.update(
        records=len(records),
        answered=len(answered),
        answer_tokens_total=sum(int(row.get("answer_tokens", 0)) for row in answered),
        dtype=str(choice.dtype).removeprefix("torch."),
        dtype_reason=choice.reason,
        torch_threads=torch.get_num_threads(),
    )
    if export:
        export_corpus(output, recipe, stats, package_versions())
    return stats


def export_corpus(answers: str | Path, recipe: CorpusRecipe, stats: dict[str, Any], versions: dict[str, str]) -> Path:
    """Writes `answers` gzipped to [`COMMITTED_ANSWERS`] with a `corpus_meta.json` (recipe, statistics, versions)."""
    rows = read_answers(answers)
    COMMITTED_ANSWERS.parent.mkdir(parents=True, exist_ok=True)
    temporary = COMMITTED_ANSWERS.with_suffix(".tmp")
    with open(temporary, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
        for row in rows:  # mtime=0: the same answers give the same bytes
            packed.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    temporary.replace(COMMITTED_ANSWERS)
    from ..training.self_distill import regeneration_meta_path

    fingerprint = Path(regeneration_meta_path(answers))
    if fingerprint.is_file():  # lets another machine resume the committed answers (same input only)
        (COMMITTED_ANSWERS.parent / COMMITTED_META).write_text(fingerprint.read_text())
    progress = progress_path(answers)
    meta = {
        "recipe": asdict(recipe),
        "records": len(rows),
        "of_records": recipe.total_records,
        "answer_tokens": sum(int(row.get("answer_tokens", 0)) for row in rows),
        "generation": stats,
        "generation_calls": json.loads(progress.read_text()) if progress.is_file() else [],
        "package_versions": versions,
        "date": time.strftime("%Y-%m-%d"),
    }
    (COMMITTED_ANSWERS.parent / "corpus_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return COMMITTED_ANSWERS
