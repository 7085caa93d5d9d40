"""StreamingDistillationDataset: lazy reading through `datasets`, bad records skipped and counted, Trainer and CLI."""

from __future__ import annotations

import itertools
import json
import os
import tracemalloc

import pytest
import torch

from specvlm_hf.errors import UserValueError
from specvlm_hf.training import (
    DistillationDataset,
    OnlineDistillationTrainer,
    StreamingDistillationDataset,
    cli,
    load_llava_records,
    streaming,
)
from specvlm_hf.training.streaming import stream_llava_files

from .training_helpers import make_records, tiny_args


def _line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def write_messy_jsonl(path, image_dir, good: int = 4) -> dict[str, int]:
    """
    A JSONL file with a BOM, good records interleaved with every kind of bad line, and a torn last line.
    Returns the expected line number of each problem.
    """
    records = make_records(good, image_dir, seed=4)
    missing = make_records(1, image_dir, seed=9)[0]
    missing["images"] = ["gone.png"]  # resolves next to the data file, where there is none
    lines = [
        b"\xef\xbb\xbf" + _line(records[0]),  # 1: BOM then a good record
        b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n',  # 2: a Latin-1 byte
        _line(records[1]),  # 3
        b"\n",  # 4: blank, ignored
        b"{not json}\n",  # 5
        _line(missing),  # 6: missing image
        _line({"conversations": [{"from": "human", "value": "hello"}]}),  # 7: no assistant turn
        *[_line(record) for record in records[2:]],  # 8, 9
        _line(records[0])[:25],  # 10: torn
    ]
    path.write_bytes(b"".join(lines))
    return {"bad_byte": 2, "not_json": 5, "missing": 6, "no_answer": 7, "torn": 10}


def test_bad_lines_are_skipped_and_counted_with_file_and_line(processor, image_dir, tmp_path, caplog):
    path = tmp_path / "messy.jsonl"
    lines = write_messy_jsonl(path, image_dir)
    dataset = StreamingDistillationDataset(str(path), processor)
    examples = list(dataset)
    assert len(examples) == 4
    assert all({"input_ids", "labels", "pixel_values"} <= set(example) for example in examples)
    assert dataset.skipped == {"malformed": 3, "missing_image": 1, "no_assistant_turn": 1}
    assert dataset.skip_examples["malformed"].startswith(f"{path}:{lines['bad_byte']}: not UTF-8")
    assert dataset.skip_examples["missing_image"].startswith(f"{path}:{lines['missing']}:")
    assert dataset.skip_examples["no_assistant_turn"].startswith(f"{path}:{lines['no_answer']}:")
    assert f"{path}:{lines['not_json']}: not JSON" in caplog.text
    assert dataset.records_read == 9
    # the same records as the in-memory dataset, in file order
    reference = DistillationDataset(str(path), processor, show_progress=False)
    assert len(reference) == 4
    for index, example in enumerate(examples):
        assert torch.equal(example["input_ids"], reference[index]["input_ids"])
    # a second epoch counts nothing twice
    assert len(list(dataset)) == 4
    assert sum(dataset.skipped.values()) == 5


def test_torn_last_line_is_named(processor, image_dir, tmp_path):
    path = tmp_path / "torn.jsonl"
    lines = write_messy_jsonl(path, image_dir)
    problems = [item for item in stream_llava_files([str(path)]) if item["problem"]]
    expected = [f"{path}:{lines[key]}" for key in ("bad_byte", "not_json", "torn")]
    assert [item["location"] for item in problems] == expected
    assert problems[-1]["problem"].startswith("torn last line")


def test_a_stream_with_no_usable_record_is_an_error(processor, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"{oops\n\xff\xfe\n")
    with pytest.raises(UserValueError, match="None of the 2 records"):
        list(StreamingDistillationDataset(str(path), processor))
    with pytest.raises(UserValueError, match="UTF-16"):
        StreamingDistillationDataset(str(_utf16(tmp_path)), processor)
    with pytest.raises(FileNotFoundError):
        StreamingDistillationDataset(str(tmp_path / "nowhere.jsonl"), processor)


def _utf16(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_text('{"conversations": []}\n', encoding="utf-16")
    return path


def test_iteration_is_lazy(processor, image_dir, tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as handle:
        for record in make_records(3000, image_dir, seed=1):
            handle.write(_line(record))
    dataset = StreamingDistillationDataset(str(path), processor)
    assert dataset.records_read == 0  # construction reads nothing but the first bytes
    first = list(itertools.islice(iter(dataset), 2))
    assert len(first) == 2 and dataset.records_read == 2
    shuffled = StreamingDistillationDataset(str(path), processor, shuffle_buffer_size=16, seed=3)
    list(itertools.islice(iter(shuffled), 2))
    assert shuffled.records_read <= 2 + 16  # only the shuffle buffer is read ahead


@pytest.mark.parametrize("layout", ["jsonl", "json-list"])
def test_memory_stays_flat_on_a_large_file(layout, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "_CHUNK", 1 << 16)  # a JSON list is decoded through a 64 KiB buffer
    answer = "word " * 800  # ~4 kB per record
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": answer}]}
    path = tmp_path / f"large.{layout}"
    count = 3000  # ~12 MB
    with open(path, "w", encoding="utf-8") as handle:
        if layout == "jsonl":
            handle.writelines(json.dumps(record) + "\n" for _ in range(count))
        else:
            handle.write("[\n" + ",\n".join(json.dumps(record, indent=1) for _ in range(count)) + "\n]\n")
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        seen = sum(1 for item in stream_llava_files([str(path)]) if item["problem"] is None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < size / 10, (peak, size)  # a whole-file read would peak above the file's size


def test_a_json_list_streams_the_same_records_with_their_lines(image_dir, tmp_path):
    records = make_records(5, image_dir, seed=2)
    path = tmp_path / "list.json"
    path.write_text("\ufeff[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + "\n]\n", encoding="utf-8")
    items = list(stream_llava_files([str(path)]))
    assert [json.loads(item["text"]) for item in items] == records
    first_lines = [int(item["location"].rsplit(":", 1)[1]) for item in items]
    assert first_lines[0] == 2 and first_lines == sorted(first_lines)
    assert [json.loads(i["text"]) for i in items] == [
        {k: v for k, v in r.items()} for r in records
    ] and len(load_llava_records(path)) == 5
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"a": 1},\n {"a": 2\n]\n', encoding="utf-8")
    with pytest.raises(UserValueError, match="line 3"):
        list(stream_llava_files([str(broken)]))


def test_the_trainer_streams_a_messy_file(target, draft, processor, image_dir, tmp_path):
    path = tmp_path / "messy.jsonl"
    write_messy_jsonl(path, image_dir)
    args = tiny_args(tmp_path, streaming=True, max_steps=3, streaming_shuffle_buffer_size=4)
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=str(path), processing_class=processor
    )
    assert isinstance(trainer.train_dataset, StreamingDistillationDataset)
    output = trainer.train()
    assert trainer.state.global_step == 3
    assert output.metrics["train_records_skipped"] == 5
    with pytest.raises(UserValueError, match="max_steps"):
        tiny_args(tmp_path, streaming=True, max_steps=-1)


def test_worker_processes_report_their_skipped_records(target, draft, processor, image_dir, tmp_path):
    path = tmp_path / "messy.jsonl"
    write_messy_jsonl(path, image_dir)
    args = tiny_args(
        tmp_path, streaming=True, max_steps=2, streaming_shuffle_buffer_size=0, dataloader_num_workers=1
    )
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=args, train_dataset=str(path), processing_class=processor
    )
    trainer.train()
    # the problems before the last usable record reach the main process with the batches
    assert trainer.train_dataset.skipped == {"malformed": 2, "missing_image": 1, "no_assistant_turn": 1}


def test_cli_streaming_flag(tmp_path):
    data = tmp_path / "data.jsonl"
    from .training_helpers import write_images

    write_images(tmp_path)
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(6, tmp_path)), encoding="utf-8")
    help_text = cli.make_parser().format_help()
    assert "--streaming" in help_text and "--ttt_steps" in help_text
    script_args, config = cli.make_parser().parse_args_into_dataclasses(
        args=f"--tiny llava --output_dir {tmp_path / 'o'} --streaming --max_steps 2 --ttt_steps 3".split()
    )
    assert config.streaming and config.ttt_steps == 3
    with pytest.raises(UserValueError, match="max_steps"):
        cli.make_parser().parse_args_into_dataclasses(args=f"--output_dir {tmp_path / 'o'} --streaming".split())
    trainer = cli.train(
        *cli.make_parser().parse_args_into_dataclasses(
            args=(
                f"--tiny llava --tiny_records 8 --output_dir {tmp_path / 'draft'} --max_steps 2 --streaming "
                "--ttt_steps 2 --per_device_train_batch_size 2 --report_to none --disable_tqdm true "
                "--dataloader_pin_memory false --use_cpu true --save_strategy no --draft_vocab_size 48"
            ).split()
        )
    )
    assert isinstance(trainer.train_dataset, StreamingDistillationDataset)
    assert trainer.state.global_step == 2
    assert trainer.model.config.training_recipe["ttt_steps"] == 2
    assert trainer.model.config.draft_vocab_size == 48


def test_a_datasets_iterable_dataset_of_records_streams(target, draft, processor, image_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = make_records(4, image_dir, seed=6)
    records[1] = {"conversations": [{"from": "human", "value": "no answer"}], "images": []}

    def generate():
        yield from records

    stream = datasets.IterableDataset.from_generator(generate)
    dataset = StreamingDistillationDataset(stream, processor, shuffle_buffer_size=2, seed=1)
    assert len(list(dataset)) == 3
    assert dataset.skipped == {"no_assistant_turn": 1}
    assert dataset.skip_examples["no_assistant_turn"].startswith("record ")
    # the trainer streams a datasets.IterableDataset without being asked to
    trainer = OnlineDistillationTrainer(
        model=draft, teacher=target, args=tiny_args(tmp_path, max_steps=2), train_dataset=stream,
        processing_class=processor,
    )  # fmt: skip
    assert isinstance(trainer.train_dataset, StreamingDistillationDataset)
    assert trainer.train().global_step == 2
