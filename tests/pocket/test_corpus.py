"""The pocket draft's training corpus: size and mix, determinism, disjointness from the benchmark, image names."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter

import pytest

from specvlm_hf.bench.prompts import BENCH_DIR
from specvlm_hf.errors import UserValueError
from specvlm_hf.pocket import corpus
from specvlm_hf.pocket.corpus import (
    CorpusRecipe,
    build_corpus,
    check_corpus_disjoint,
    image_name,
    materialize_images,
    read_answers,
)

NAMES = [f"class{i}" for i in range(200)] + ["sea lion", "sky lantern", "ox"]


def test_corpus_size_mix_and_determinism():
    recipe = CorpusRecipe(image_records=300, multi_image_records=60, text_records=400)
    records = build_corpus(recipe, NAMES)
    assert len(records) == recipe.total_records == 760
    assert records == build_corpus(recipe, NAMES)  # same recipe, same corpus
    assert records != build_corpus(CorpusRecipe(seed=12, image_records=300, multi_image_records=60,
                                                text_records=400), NAMES)
    kinds = Counter(len(record["images"]) for record in records)
    assert kinds[0] == 400 and kinds[1] == 300 and kinds[2] + kinds[3] == 60 and kinds[3] > 0
    head = Counter(len(record["images"]) > 0 for record in records[:100])  # shuffled: every prefix is mixed
    assert head[True] > 25 and head[False] > 25
    assert len({record["id"] for record in records}) == len(records)
    texts = [record["conversations"][0]["value"] for record in records if not record["images"]]
    assert len(set(texts)) == len(texts)
    long = [record for record in records if record["max_new_tokens"] == recipe.long_max_new_tokens]
    assert 0.08 < len(long) / (700) < 0.25
    images = [path for record in records for path in record["images"]]
    assert len(set(images)) == len(images)  # every image is drawn once
    for record in records:
        assert record["conversations"][0]["value"].count("<image>") == len(record["images"])


def test_benchmark_topics_are_never_asked():
    records = build_corpus(CorpusRecipe(image_records=0, multi_image_records=0, text_records=180), NAMES)
    text = " ".join(record["conversations"][0]["value"].lower() for record in records)
    assert "sea lion" not in text and "sky lantern" not in text
    assert check_corpus_disjoint(records)["prompts"] == 180


def test_disjointness_check_refuses_benchmark_prompts_and_images(tmp_path):
    bench = [json.loads(line) for line in (BENCH_DIR / "prompts.jsonl").read_text().splitlines() if line.strip()]
    text_prompt = next(row["prompt"] for row in bench if not row["images"])
    copied = {"id": "x", "images": [], "conversations": [{"from": "human", "value": text_prompt.upper() + "  "}]}
    with pytest.raises(ValueError, match="repeats a benchmark text prompt"):
        check_corpus_disjoint([copied])
    topic = {"id": "y", "images": [], "conversations": [{"from": "human", "value": "Tell me about the sea."}]}
    with pytest.raises(ValueError, match="repeats a benchmark text prompt"):
        check_corpus_disjoint([topic])
    photo = next(row["images"][0] for row in bench if row["images"])
    shutil.copy(BENCH_DIR / photo, tmp_path / image_name(23, 5))
    record = {"id": "z", "images": [f"images/{image_name(23, 5)}"],
              "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}]}
    with pytest.raises(ValueError, match="pixels of a benchmark image"):
        check_corpus_disjoint([record], tmp_path)


def test_images_are_named_by_their_recipe_and_bad_names_fail_before_any_download(tmp_path):
    assert image_name(23, 42) == "c23_0000042.png"
    (tmp_path / image_name(23, 42)).write_bytes(b"already drawn")
    assert materialize_images([{"images": [f"images/{image_name(23, 42)}"]}], tmp_path, show_progress=False) == 0
    with pytest.raises(UserValueError, match="not a corpus image name"):
        materialize_images([{"images": ["images/photo.png"]}], tmp_path, data_dir=tmp_path / "none",
                           show_progress=False)
    assert not (tmp_path / "none").exists()


def test_read_and_export_answers(tmp_path, monkeypatch):
    answers = tmp_path / "answers.jsonl"
    rows = [{"id": str(i), "images": [], "answer_tokens": 10 + i,
             "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "é"}]} for i in range(3)]
    answers.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) + '{"torn": ')
    assert read_answers(answers) == rows  # the torn last line of an interrupted run is skipped
    assert read_answers(tmp_path / "missing.jsonl") == []
    target = tmp_path / "assets" / "answers.jsonl.gz"
    monkeypatch.setattr(corpus, "COMMITTED_ANSWERS", target)
    corpus.export_corpus(answers, CorpusRecipe(), {"seconds": 1.0}, {"torch": "x"})
    assert read_answers(target) == rows
    first = target.read_bytes()
    corpus.export_corpus(answers, CorpusRecipe(), {"seconds": 1.0}, {"torch": "x"})
    assert target.read_bytes() == first  # reproducible bytes
    meta = json.loads((target.parent / "corpus_meta.json").read_text())
    assert meta["records"] == 3 and meta["answer_tokens"] == 33
    with gzip.open(target, "rt", encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == 3


def test_a_fresh_machine_resumes_the_committed_answers_only_for_the_same_input(tmp_path, monkeypatch):
    committed = tmp_path / "assets" / "answers.jsonl.gz"
    monkeypatch.setattr(corpus, "COMMITTED_ANSWERS", committed)
    fingerprint = {"key": "k1", "data": {"records": 3}, "target": {"dtype": "bfloat16"}, "settings": {}}
    output = tmp_path / "work" / "answers.jsonl"
    output.parent.mkdir()
    assert corpus._resume_from_committed(output, fingerprint) == 0  # nothing committed
    answers = tmp_path / "made" / "answers.jsonl"
    answers.parent.mkdir()
    rows = [{"id": str(i), "images": [], "answer_tokens": 4, "conversations": []} for i in range(3)]
    answers.write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers.with_name("answers.meta.json").write_text(json.dumps(fingerprint))
    corpus.export_corpus(answers, CorpusRecipe(), {}, {})
    other = {**fingerprint, "key": "k2", "target": {"dtype": "float32"}}
    assert corpus._resume_from_committed(output, other) == 0 and not output.exists()  # another input: never mixed
    assert corpus._resume_from_committed(output, fingerprint) == 3
    assert read_answers(output) == rows
    assert json.loads(output.with_name("answers.meta.json").read_text())["key"] == "k1"
    output.write_text("")
    assert corpus._resume_from_committed(output, fingerprint) == 0  # a local output always wins


def test_progress_is_kept_across_resumed_calls(tmp_path):
    output = tmp_path / "answers.jsonl"
    first = {"started": "t1", "batch_size": 64}
    corpus._record_progress(output, first, {"written": 10, "answer_tokens": 1000}, 5.0)
    corpus._record_progress(output, first, {"written": 20, "answer_tokens": 2000}, 10.0)  # same call: updated
    corpus._record_progress(output, {"started": "t2"}, {"written": 4, "answer_tokens": 100}, 2.0)
    calls = json.loads(corpus.progress_path(output).read_text())
    assert [c["written"] for c in calls] == [20, 4] and calls[0]["records_per_second"] == 2.0
