"""LLaVA-format data: parsing, assistant-only labels, bad records skipped and counted, collation."""

from __future__ import annotations

import codecs
import json
import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from specvlm_hf.errors import UserFileNotFoundError, UserValueError
from specvlm_hf.testing.tiny_processors import build_tiny_processor, build_tiny_tokenizer
from specvlm_hf.training.data import (
    SKIP_REASONS,
    DistillationCollator,
    DistillationDataset,
    load_llava_records,
    parse_llava_record,
)

from .training_helpers import COLORS, make_records


def _record(question: str, answer: str, images=None) -> dict:
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if images is not None:
        record["images"] = images
    return record


def _labelled_text(tokenizer, example) -> str:
    labels = example["labels"]
    return tokenizer.decode(labels[labels != -100])


def test_parse_places_images_at_placeholders_or_first_user_turn():
    parsed = parse_llava_record(
        {
            "images": ["a.png", "b.png"],
            "conversations": [
                {"from": "system", "value": "be brief ."},
                {"from": "human", "value": "<image>\nfirst ?"},
                {"from": "gpt", "value": "yes ."},
                {"from": "human", "value": "and <image> this ?"},
                {"from": "gpt", "value": "no ."},
                {"from": "human", "value": "trailing question without answer"},
            ],
        }
    )
    assert parsed.images == ["a.png", "b.png"]
    assert [m["role"] for m in parsed.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert parsed.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "first ?"}]
    assert parsed.messages[3]["content"] == [
        {"type": "text", "text": "and"},
        {"type": "image"},
        {"type": "text", "text": "this ?"},
    ]
    no_placeholder = parse_llava_record(_record("what ?", "red .", images=["a.png"]))
    assert no_placeholder.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "what ?"}]


def test_labels_cover_exactly_the_assistant_turns(processor, image_dir):
    record = {
        "images": [str(image_dir / "red.png"), str(image_dir / "blue.png")],
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the cat ?"},
            {"from": "gpt", "value": "the cat is red ."},
            {"from": "human", "value": "<image> and the sky ?"},
            {"from": "gpt", "value": "blue sky ."},
        ],
    }
    dataset = DistillationDataset([record], processor, show_progress=False)
    example = dataset[0]
    tokenizer = processor.tokenizer
    assert _labelled_text(tokenizer, example) == "the cat is red . </s> blue sky . </s>"
    assert example["pixel_values"].shape == (2, 3, 24, 24)
    assert int((example["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 18
    assert dataset.lengths == [example["input_ids"].shape[0]]
    # the draft's targets (labels from position 2 on) are what the vocabulary builder counts
    assert sum(dataset.label_token_counts.values()) == int((example["labels"][2:] != -100).sum())


def test_all_text_labels_exclude_image_placeholders(processor, image_dir):
    record = _record("<image>\nwhat color ?", "red .", images=[str(image_dir / "red.png")])
    example = DistillationDataset([record], processor, assistant_only_loss=False, show_progress=False)[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    labelled = example["labels"] != -100
    assert not labelled[example["input_ids"] == image_id].any()
    assert labelled[example["input_ids"] != image_id].all()


def test_each_bad_record_kind_is_skipped_and_counted(processor, image_dir, tmp_path, caplog):
    good = make_records(2, image_dir)
    rows = good + [
        "not a record",  # malformed: not an object
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yes"}]},  # unknown role
        _record("<image> <image> two ?", "one .", images=[str(image_dir / "red.png")]),  # placeholder mismatch
        {
            "conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]
        },  # no user first
        {"images": ["x.png"]},  # no conversations
        _record("only a question ?", "   "),  # no (non-empty) assistant turn
        {"conversations": [{"from": "human", "value": "hello ?"}]},  # no assistant turn at all
        _record("<image> what ?", "red .", images=["missing.png"]),  # missing image (relative to the file)
        _record("<image> what ?", "red .", images=[str(image_dir / "corrupt.png")]),  # unreadable image
        _record("the cat " * 40, "red ."),  # too long for max_length=64
    ]
    path = tmp_path / "data.jsonl"
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write("{this line is not json\n")  # malformed: unparseable line

    with caplog.at_level(logging.WARNING, logger="specvlm_hf.training.data"):
        dataset = DistillationDataset(path, processor, max_length=64, show_progress=False)
    assert len(dataset) == 2
    assert dataset.num_records == len(rows) + 1
    assert dict(dataset.skipped) == {
        "malformed": 6,
        "no_assistant_turn": 2,
        "missing_image": 1,
        "unreadable_image": 1,
        "too_long": 1,
    }
    assert set(dataset.skip_examples) == set(dataset.skipped)
    assert "missing.png" in dataset.skip_examples["missing_image"]
    assert dataset.skip_examples["missing_image"].startswith(f"{path}:10: ")  # file and line of the record
    assert "11 skipped (malformed: 6, no_assistant_turn: 2, missing_image: 1" in dataset.skip_summary()
    assert "2 usable records, 11 skipped" in caplog.text
    assert set(dataset.skipped) <= set(SKIP_REASONS)


def test_template_and_processor_errors_are_skipped_and_counted(image_dir, monkeypatch):
    text_record = _record("what ?", "red .")
    image_record = _record("<image> what ?", "red .", images=[str(image_dir / "red.png")])

    # a template whose per-turn renders are not prefixes of the whole render cannot be masked turn by turn
    broken = build_tiny_processor()
    broken.chat_template = broken.chat_template + "{{ messages | length }}"
    dataset_or_error = pytest.raises(ValueError, match="None of the 1 records is usable: 1 skipped \\(template_error")
    with dataset_or_error:
        DistillationDataset([text_record], broken, show_progress=False)

    processor = build_tiny_processor()

    def fail(*args, **kwargs):
        raise RuntimeError("image processor exploded")

    monkeypatch.setattr(processor.image_processor, "preprocess", fail)
    dataset = DistillationDataset([image_record, text_record], processor, show_progress=False)
    assert len(dataset) == 1 and dict(dataset.skipped) == {"processor_error": 1}
    assert "image processor exploded" in dataset.skip_examples["processor_error"]


def test_file_loading_resolves_relative_paths_and_accepts_json_lists(processor, image_dir, tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "local.png")
    record = _record("<image> what ?", "red .")
    record["image"] = "local.png"  # original LLaVA key, relative to the data file
    (tmp_path / "data.json").write_text(json.dumps([record]))
    records = load_llava_records(tmp_path / "data.json")
    assert records[0]["images"] == [str(tmp_path / "local.png")] and "image" not in records[0]
    assert len(DistillationDataset(tmp_path / "data.json", processor, show_progress=False)) == 1


def test_datasets_and_in_memory_images(processor, image_dir):
    datasets = pytest.importorskip("datasets")
    rows = [_record("<image> what color ?", "red .", images=["red.png"])]
    from_hub_format = datasets.Dataset.from_list(rows)
    dataset = DistillationDataset(from_hub_format, processor, image_root=image_dir, show_progress=False)
    assert dataset[0]["pixel_values"].shape == (1, 3, 24, 24)
    pil_rows = [_record("<image> what color ?", "red .", images=[Image.new("RGB", (24, 24), COLORS["red"])])]
    pil_example = DistillationDataset(pil_rows, processor, show_progress=False)[0]
    torch.testing.assert_close(pil_example["pixel_values"], dataset[0]["pixel_values"], atol=0.05, rtol=0)


def test_text_only_targets_use_a_tokenizer():
    tokenizer = build_tiny_tokenizer()
    rows = [_record("what is the color ?", "red ."), _record("<image> what ?", "red .", images=["a.png"])]
    dataset = DistillationDataset(rows, tokenizer, show_progress=False)
    assert len(dataset) == 1 and dict(dataset.skipped) == {"malformed": 1}
    example = dataset[0]
    assert set(example) == {"input_ids", "attention_mask", "labels"}
    assert _labelled_text(tokenizer, example) == "red . </s>"


def test_prompt_is_cut_before_the_first_answer(processor, image_dir):
    dataset = DistillationDataset(make_records(1, image_dir), processor, show_progress=False)
    prompt = dataset.prompt(0)
    text = processor.tokenizer.decode(prompt["input_ids"][0])
    assert text.endswith("<|end|> <|assistant|>") and prompt["pixel_values"].shape == (1, 3, 24, 24)


def test_collator_pads_concatenates_and_shifts_labels(processor, image_dir):
    dataset = DistillationDataset(make_records(3, image_dir, seed=3), processor, show_progress=False)
    examples = [dataset[i] for i in range(3)]
    batch = DistillationCollator(pad_token_id=processor.tokenizer.pad_token_id)(examples)
    length = max(example["input_ids"].shape[0] for example in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["shift_labels"].shape == (3, length)
    assert batch["pixel_values"].shape == (3, 3, 24, 24)
    for row, example in enumerate(examples):
        n = example["input_ids"].shape[0]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert (batch["labels"][row, n:] == -100).all()
    # shift_labels[:, t] = labels[:, t + 2]: the token the draft predicts at draft position t
    assert torch.equal(batch["shift_labels"][:, :-2], batch["labels"][:, 2:])
    assert (batch["shift_labels"][:, -2:] == -100).all()
    predicted = sum(int((example["labels"][2:] != -100).sum()) for example in examples)
    assert int((batch["shift_labels"] != -100).sum()) == predicted


def test_collator_zero_pads_image_dimensions():
    collate = DistillationCollator()
    first = {
        "input_ids": torch.tensor([5, 6, 7]),
        "labels": torch.tensor([-100, -100, 7]),
        "attention_mask": torch.ones(3, dtype=torch.long),
        "pixel_values": torch.ones(1, 1, 3, 2, 2),
        "pixel_attention_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool),
    }
    second = {
        "input_ids": torch.tensor([5, 6]),
        "labels": torch.tensor([-100, 6]),
        "attention_mask": torch.ones(2, dtype=torch.long),
        "pixel_values": torch.full((1, 2, 3, 2, 2), 2.0),
        "pixel_attention_mask": torch.ones(1, 2, 2, 2, dtype=torch.bool),
    }
    batch = collate([first, second])
    assert batch["pixel_values"].shape == (2, 2, 3, 2, 2)
    assert batch["pixel_values"][0, 1].abs().sum() == 0 and (batch["pixel_values"][1] == 2).all()
    assert batch["pixel_attention_mask"].tolist()[0][1] == [[False, False], [False, False]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate([])


# --- file reading: encodings, torn lines, missing files (issue #12, item 3) ----------------------------------------


def _jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(row).encode("utf-8") + b"\n" for row in rows)


def test_jsonl_bad_bytes_and_torn_last_line_are_skipped_with_file_and_line(processor, image_dir, tmp_path, caplog):
    rows = make_records(4, image_dir, seed=5)
    lines = _jsonl_bytes(rows).splitlines(keepends=True)
    # not UTF-8: "\xe9"
    bad_bytes = json.dumps(_record("what ?", "caf\u00e9 ."), ensure_ascii=False).encode("latin-1") + b"\n"
    torn = json.dumps(rows[0])[:25].encode()  # an interrupted write: no closing brace, no newline
    path = tmp_path / "data.jsonl"
    path.write_bytes(lines[0] + bad_bytes + b"".join(lines[1:]) + torn)
    with caplog.at_level(logging.WARNING, logger="specvlm_hf.training.data"):
        dataset = DistillationDataset(path, processor, show_progress=False)
    assert len(dataset) == 4 and dataset.num_records == 6
    assert dict(dataset.skipped) == {"malformed": 2}
    assert f"{path}:2: not UTF-8" in dataset.skip_examples["malformed"]
    assert f"{path}:2: not UTF-8" in caplog.text and f"{path}:6: torn last line" in caplog.text
    skipped = {}
    assert len(load_llava_records(path, skipped=(counts := Counter()), skip_examples=skipped)) == 4
    assert counts == {"malformed": 2} and skipped["malformed"].startswith(f"{path}:2:")


def test_utf8_bom_is_accepted_in_jsonl_and_json_lists(processor, image_dir, tmp_path):
    rows = make_records(3, image_dir, seed=6)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + _jsonl_bytes(rows))
    dataset = DistillationDataset(jsonl, processor, show_progress=False)
    assert len(dataset) == 3 and not dataset.skipped
    as_list = tmp_path / "bom.json"
    as_list.write_bytes(codecs.BOM_UTF8 + json.dumps(rows, indent=2).encode())
    dataset = DistillationDataset(as_list, processor, show_progress=False)
    assert len(dataset) == 3 and dataset.num_records == 3 and not dataset.skipped


def test_undecodable_files_and_missing_files_are_clear_user_errors(tmp_path):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(_record("what ?", "red .")).encode("utf-16"))
    with pytest.raises(UserValueError, match=f"{utf16}.*UTF-16"):
        load_llava_records(utf16)
    latin1 = tmp_path / "latin1.jsonl"
    row = json.dumps(_record("caf\u00e9 ?", "s\u00ed ."), ensure_ascii=False)
    latin1.write_bytes("\n".join([row] * 3).encode("latin-1"))
    with pytest.raises(UserValueError, match=f"{latin1} is not UTF-8 text"):
        load_llava_records(latin1)
    broken_list = tmp_path / "list.json"
    broken_list.write_bytes(b'[\n  {"conversations": []},\n  {"x": "caf\xe9"}\n]')
    with pytest.raises(UserValueError, match=f"{broken_list}: line 3: not UTF-8"):
        load_llava_records(broken_list)
    with pytest.raises(UserFileNotFoundError, match="no data file at .*missing.jsonl"):
        load_llava_records(tmp_path / "missing.jsonl")
    with pytest.raises(UserValueError, match="is a folder"):
        load_llava_records(tmp_path)


def test_jsonl_is_read_line_by_line(image_dir, tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_bytes(make_records(3, image_dir)))
    real_open = open

    class LineOnly:
        def __init__(self, handle):
            self._handle = handle

        def read(self, size=-1):
            assert 0 <= size <= 1 << 16, "the whole file was read at once"
            return self._handle.read(size)

        def __iter__(self):
            return iter(self._handle)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: LineOnly(real_open(*args, **kwargs)))
    assert len(load_llava_records(path)) == 3


# --- records that break after validation (issue #12, item 4) -------------------------------------------------------


def test_a_record_whose_image_vanishes_after_validation_is_skipped_and_counted(processor, tmp_path, caplog):
    rows = []
    for index, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (24, 24), COLORS[color]).save(tmp_path / f"{index}.png")
        rows.append(_record("<image> what color ?", f"{color} .", images=[f"{index}.png"]))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dataset = DistillationDataset(path, processor, show_progress=False)
    assert len(dataset) == 3
    (tmp_path / "1.png").unlink()
    (tmp_path / "2.png").write_bytes(b"not a png any more")
    with caplog.at_level(logging.WARNING, logger="specvlm_hf.training.data"):
        items = [dataset[i] for i in range(3)]
    # each broken record is replaced by the next usable one, so a batch keeps its size
    assert all(torch.equal(item["input_ids"], items[0]["input_ids"]) for item in items)
    assert dict(dataset.failed_in_use) == {"missing_image": 1, "unreadable_image": 1}
    assert f"{path}:2" in caplog.text and f"{path}:3" in caplog.text
    assert "0 skipped; 2 failed after validation (missing_image: 1, unreadable_image: 1)" in dataset.skip_summary()
    assert len(list(dataset)) == 3  # iteration still ends (IndexError past the end)
    (tmp_path / "0.png").unlink()
    with pytest.raises(UserValueError, match="every usable record"):
        dataset[0]
