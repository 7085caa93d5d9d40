"""Image–caption data for the pocket VLM projector, and the held-out benchmark photos.

Every source is installable from a package registry, and nothing is fetched at import or test time:

- Noto emoji (npm `emoji-datasource-google@16.0.0`, images Apache-2.0, package MIT), fetched with `npm pack` into a
  cache folder when the training data is first built; caption = the emoji's Unicode name;
- sample photos of scikit-image, scikit-learn and matplotlib (pip), with hand-written captions;
- rendered text (DejaVu fonts bundled with matplotlib) and coloured shapes drawn with PIL, captioned exactly.

[`BENCH_PHOTOS`] are reserved for benchmark prompts and never used for training ([`TRAIN_PHOTOS`] is disjoint from
them, which [`check_disjoint`] asserts); [`write_bench_assets`] writes them as 224×224 PNGs with `prompts.jsonl` and
`LICENSES.md` into `specvlm_hf/assets/bench/`.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..bench.prompts import BENCH_DIR, BENCH_PROMPTS_FILE  # the bench owns its assets; kept importable from here
from .build import IMAGE_SIZE, cache_root

EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
EMOJI_TARBALL_SHA256 = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
IMAGENET_NAMES_PACKAGE = "timm==1.0.31"
EMOJI_CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
)
TRAIN_INSTRUCTIONS = (
    "Describe the image.",
    "What is in this image?",
    "What do you see?",
    "Describe this picture briefly.",
    "What does this image show?",
    "Give a short caption for this image.",
)
SOURCE_WEIGHTS = {"emoji": 0.65, "photo": 0.15, "text": 0.1, "shape": 0.1}
COLORS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "gray": (128, 128, 128),
    "pink": (245, 150, 190),
    "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three"}
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")


@dataclass(frozen=True)
class PhotoSpec:
    """A sample photo from an installed package.

    Args:
        name (`str`): short identifier, also the benchmark file stem.
        load (`Callable[[], Image.Image]`): returns the photo as an RGB image.
        source (`str`): where it comes from (package and file or function).
        license (`str`): licence and attribution.
        captions (`tuple[str, ...]`): training captions (empty for benchmark photos).
        flip (`bool`): whether a horizontal flip keeps the captions true (False for text).
    """

    name: str
    load: Callable[[], Image.Image]
    source: str
    license: str
    captions: tuple[str, ...] = ()
    flip: bool = True


def _to_rgb(array: np.ndarray) -> Image.Image:
    """RGB PIL image from a uint8/float/bool gray, RGB or RGBA array (alpha composited onto white)."""
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _skimage(function: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        result = getattr(skimage.data, function)()
        return _to_rgb(result[0] if function == "stereo_motorcycle" else result)

    return load


def _sklearn(filename: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return _to_rgb(load_sample_image(filename))

    return load


def _matplotlib(filename: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data(filename)) as image:
            return _to_rgb(np.asarray(image.convert("RGBA")))

    return load


_SKIMAGE_SRC = "scikit-image `skimage.data.{}()`"
BENCH_PHOTOS: tuple[PhotoSpec, ...] = (
    PhotoSpec(
        "astronaut",
        _skimage("astronaut"),
        _SKIMAGE_SRC.format("astronaut"),
        "Public domain (NASA photo of astronaut Eileen Collins)",
    ),
    PhotoSpec("coffee", _skimage("coffee"), _SKIMAGE_SRC.format("coffee"), "CC0 (photographer Rachel Michetti)"),
    PhotoSpec("chelsea", _skimage("chelsea"), _SKIMAGE_SRC.format("chelsea"), "CC0 (photographer Stéfan van der Walt)"),
    PhotoSpec(
        "rocket",
        _skimage("rocket"),
        _SKIMAGE_SRC.format("rocket"),
        "Public domain (SpaceX launch photo of DSCOVR on Falcon 9)",
    ),
    PhotoSpec("camera", _skimage("camera"), _SKIMAGE_SRC.format("camera"), "CC0 (photographer Lav Varshney)"),
    PhotoSpec(
        "china",
        _sklearn("china.jpg"),
        "scikit-learn `load_sample_image('china.jpg')`",
        "CC-BY-2.0, danielbuechele (Flickr), https://creativecommons.org/licenses/by/2.0/",
    ),
    PhotoSpec(
        "flower",
        _sklearn("flower.jpg"),
        "scikit-learn `load_sample_image('flower.jpg')`",
        "CC-BY-2.0, vultilion (Flickr), https://creativecommons.org/licenses/by/2.0/",
    ),
    PhotoSpec(
        "grace_hopper",
        _matplotlib("grace_hopper.jpg"),
        "matplotlib `sample_data/grace_hopper.jpg`",
        "Public domain (U.S. Navy portrait of Grace Hopper)",
    ),
)

_SKIMAGE_LICENSE = "CC0 / public domain per the `skimage.data` docstring"
TRAIN_PHOTOS: tuple[PhotoSpec, ...] = (
    PhotoSpec(
        "coins",
        _skimage("coins"),
        _SKIMAGE_SRC.format("coins"),
        _SKIMAGE_LICENSE,
        ("A black and white photo of old Greek coins arranged in rows.", "Many ancient coins on a gray background."),
    ),
    PhotoSpec(
        "hubble_deep_field",
        _skimage("hubble_deep_field"),
        _SKIMAGE_SRC.format("hubble_deep_field"),
        "Public domain (NASA)",
        ("A telescope image of many distant galaxies in space.", "Colorful galaxies and stars in the dark sky."),
    ),
    PhotoSpec(
        "moon",
        _skimage("moon"),
        _SKIMAGE_SRC.format("moon"),
        "scikit-image sample data (BSD-3-Clause)",
        ("A grayscale photo of the surface of the moon with craters.", "The cratered surface of the moon."),
    ),
    PhotoSpec(
        "page",
        _skimage("page"),
        _SKIMAGE_SRC.format("page"),
        "scikit-image sample data (BSD-3-Clause)",
        ("A scanned page of printed text about image segmentation.", "A page of printed text."),
        flip=False,
    ),
    PhotoSpec(
        "text",
        _skimage("text"),
        _SKIMAGE_SRC.format("text"),
        _SKIMAGE_LICENSE,
        ("Handwritten math equations on a sheet of paper.", "A grayscale photo of handwritten formulas."),
        flip=False,
    ),
    PhotoSpec(
        "retina",
        _skimage("retina"),
        _SKIMAGE_SRC.format("retina"),
        "CC0 (Häggström, Mikael)",
        ("A medical photo of a human retina with red blood vessels.", "An orange and red image of the back of an eye."),
    ),
    PhotoSpec(
        "brick",
        _skimage("brick"),
        _SKIMAGE_SRC.format("brick"),
        "CC0 (CC0Textures)",
        ("A gray brick wall.", "A close-up photo of bricks in a wall."),
    ),
    PhotoSpec(
        "grass",
        _skimage("grass"),
        _SKIMAGE_SRC.format("grass"),
        "CC0 (CC0Textures)",
        ("A black and white close-up photo of grass.", "Blades of grass seen from above."),
    ),
    PhotoSpec(
        "gravel",
        _skimage("gravel"),
        _SKIMAGE_SRC.format("gravel"),
        "CC0 (CC0Textures)",
        ("A grayscale photo of small gravel stones.", "A close-up of gravel on the ground."),
    ),
    PhotoSpec(
        "cell",
        _skimage("cell"),
        _SKIMAGE_SRC.format("cell"),
        "CC0 (Stefan van der Walt)",
        ("A microscope image of a single cell floating in liquid.", "A blurry gray microscope picture of a cell."),
    ),
    PhotoSpec(
        "immunohistochemistry",
        _skimage("immunohistochemistry"),
        _SKIMAGE_SRC.format("immunohistochemistry"),
        _SKIMAGE_LICENSE,
        ("A microscope image of tissue stained brown and blue.", "Stained cells under a microscope."),
    ),
    PhotoSpec(
        "clock",
        _skimage("clock"),
        _SKIMAGE_SRC.format("clock"),
        "Public domain (Stefan van der Walt)",
        ("A blurry grayscale photo of a clock.", "A motion-blurred picture of a wall clock."),
    ),
    PhotoSpec(
        "colorwheel",
        _skimage("colorwheel"),
        _SKIMAGE_SRC.format("colorwheel"),
        "scikit-image sample data (BSD-3-Clause)",
        ("A color wheel with all the colors of the rainbow on a black background.", "A circle of bright colors."),
    ),
    PhotoSpec(
        "skimage_logo",
        _skimage("logo"),
        _SKIMAGE_SRC.format("logo"),
        "scikit-image logo (BSD-3-Clause)",
        ("The scikit-image logo: a snake in a green and orange circle.", "A green and orange logo with a snake."),
        flip=False,
    ),
    PhotoSpec(
        "microaneurysms",
        _skimage("microaneurysms"),
        _SKIMAGE_SRC.format("microaneurysms"),
        "CC0 (Andreas Maier)",
        ("A grayscale close-up of blood vessels in a retina.", "A gray medical image of thin dark vessels."),
    ),
    PhotoSpec(
        "horse",
        _skimage("horse"),
        _SKIMAGE_SRC.format("horse"),
        "CC0 (Andreas Preuss)",
        ("A black silhouette of a horse on a white background.", "The black shape of a standing horse."),
    ),
    PhotoSpec(
        "checkerboard",
        _skimage("checkerboard"),
        _SKIMAGE_SRC.format("checkerboard"),
        "scikit-image sample data (BSD-3-Clause)",
        ("A black and white checkerboard pattern.", "A chessboard pattern of black and white squares."),
    ),
    PhotoSpec(
        "motorcycle",
        _skimage("stereo_motorcycle"),
        _SKIMAGE_SRC.format("stereo_motorcycle") + " (left view)",
        "Middlebury 2014 stereo dataset (Scharstein et al.), used for training only, not redistributed",
        ("A photo of a red motorcycle parked in a garage.", "A red motorbike in a workshop with shelves and boxes."),
    ),
    PhotoSpec(
        "present",
        _matplotlib("Minduka_Present_Blue_Pack.png"),
        "matplotlib `sample_data/Minduka_Present_Blue_Pack.png`",
        "Public domain (Openclipart, Minduka)",
        ("A blue gift box with a silver ribbon and bow.", "A wrapped blue present."),
    ),
    PhotoSpec(
        "matplotlib_logo",
        _matplotlib("logo2.png"),
        "matplotlib `sample_data/logo2.png`",
        "matplotlib logo (matplotlib license)",
        ("The matplotlib logo with blue letters.", "The word matplotlib written in blue."),
        flip=False,
    ),
)
TEXTURES = ("brick", "grass", "gravel", "moon", "hubble_deep_field")  # training photos used as emoji backgrounds
LFW_FACE_CAPTIONS = ("A small black and white photo of a person's face.", "A grayscale close-up of a human face.")
LFW_LICENSE = "Labeled Faces in the Wild subset shipped with scikit-image (research use), training only"


def check_disjoint() -> None:
    """Raises `ValueError` if a benchmark photo is also a training photo (by name or by pixels)."""
    train_names = {spec.name for spec in TRAIN_PHOTOS}
    overlap = train_names & {spec.name for spec in BENCH_PHOTOS}
    if overlap:
        raise ValueError(f"benchmark photos {sorted(overlap)} are also training photos")
    bench_digests = {hashlib.sha256(spec.load().tobytes()).hexdigest(): spec.name for spec in BENCH_PHOTOS}
    for spec in TRAIN_PHOTOS:
        digest = hashlib.sha256(spec.load().tobytes()).hexdigest()
        if digest in bench_digests:
            raise ValueError(
                f"training photo {spec.name!r} has the pixels of benchmark photo {bench_digests[digest]!r}"
            )


def data_sources() -> list[dict[str, str]]:
    """Sources and licences of the projector's training data, as recorded in `projector_provenance.json`."""
    sources = [
        {
            "name": f"Noto emoji from npm `{EMOJI_PACKAGE}` (categories: {', '.join(EMOJI_CATEGORIES)})",
            "license": "images Apache-2.0 (Google Noto Emoji), package MIT",
        },
        {
            "name": "rendered text in DejaVu fonts (bundled with matplotlib) and coloured shapes drawn with PIL",
            "license": "synthetic; DejaVu fonts: Bitstream Vera / DejaVu free licence",
        },
        {"name": "scikit-image `lfw_subset()` faces (first 100)", "license": LFW_LICENSE},
        {
            "name": f"ImageNet-1k class names (WordNet lemmas) from PyPI `{IMAGENET_NAMES_PACKAGE}`, used to "
            "initialise the projector from the EfficientNet ImageNet classifier",
            "license": "timm Apache-2.0; WordNet licence (permissive)",
        },
    ]
    sources += [{"name": f"{spec.name}: {spec.source}", "license": spec.license} for spec in TRAIN_PHOTOS]
    return sources


def fetch_emoji(data_dir: str | Path) -> Path:
    """Downloads `emoji-datasource-google` with `npm pack` (once) and extracts `emoji.json` and the 64 px PNGs.

    Args:
        data_dir (`str` or `Path`): cache folder; the files land in `data_dir/emoji-datasource-google/`.

    Returns:
        `Path`: the extracted folder (`emoji.json`, `LICENSE`, `img/google/64/*.png`).
    """
    target = Path(data_dir) / "emoji-datasource-google"
    if (target / "emoji.json").is_file():
        return target
    if shutil.which("npm") is None:
        raise RuntimeError(f"`npm` is needed once to fetch {EMOJI_PACKAGE} (e.g. `apt-get install npm`).")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", EMOJI_PACKAGE, "--pack-destination", tmp], check=True, capture_output=True)
        (tarball,) = Path(tmp).glob("*.tgz")
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != EMOJI_TARBALL_SHA256:
            raise RuntimeError(f"{tarball.name} has sha256 {digest}, expected {EMOJI_TARBALL_SHA256}")
        staging = Path(tmp) / "out"
        with tarfile.open(tarball) as archive:
            wanted = [
                m
                for m in archive.getmembers()
                if m.isfile()
                and (m.name in ("package/emoji.json", "package/LICENSE") or m.name.startswith("package/img/google/64/"))
            ]
            archive.extractall(staging, members=wanted, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging / "package"), target)
    return target


def fetch_imagenet_class_names(data_dir: str | Path) -> list[str]:
    """The 1,000 ImageNet-1k class names in classifier order (first WordNet lemma, e.g. "tabby", "espresso").

    They come from the `timm` wheel (Apache-2.0; `timm/data/_info/imagenet_synsets.txt` and
    `imagenet_synset_to_lemma.txt`), fetched once with `pip download --no-deps` into `data_dir`; timm is not installed.
    The list is cached as `data_dir/imagenet_class_names.json`.
    """
    cache = Path(data_dir) / "imagenet_class_names.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, IMAGENET_NAMES_PACKAGE]
        subprocess.run(command, check=True, capture_output=True)
        (wheel,) = Path(tmp).glob("timm-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            synsets = archive.read("timm/data/_info/imagenet_synsets.txt").decode().split()
            lemmas = archive.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode().splitlines()
    lemma_of = dict(line.split("\t", 1) for line in lemmas)
    names = [lemma_of[synset].split(",")[0].strip() for synset in synsets]
    if len(names) != 1000:
        raise RuntimeError(f"expected 1000 ImageNet classes in {IMAGENET_NAMES_PACKAGE}, got {len(names)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(names))
    return names


def default_data_dir() -> Path:
    """Cache folder of downloaded training data: `<cache_root()>/pocket-data`."""
    return cache_root() / "pocket-data"


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def load_emoji(data_dir: str | Path) -> list[tuple[Image.Image, str]]:
    """Emoji of [`EMOJI_CATEGORIES`] as `(RGBA 64×64 image, caption)`, e.g. "An emoji of a hot beverage."."""
    folder = fetch_emoji(data_dir)
    pairs = []
    for entry in json.loads((folder / "emoji.json").read_text()):
        path = folder / "img" / "google" / "64" / entry["image"]
        if entry["category"] not in EMOJI_CATEGORIES or not entry["has_img_google"] or not path.is_file():
            continue
        phrase = entry["name"].lower().replace(": ", " with ").replace(" symbol", "")
        with Image.open(path) as image:
            pairs.append((image.convert("RGBA"), f"An emoji of {_article(phrase)}."))
    return pairs


def _text_vocabulary(captions: list[str]) -> list[str]:
    """Alphabetic words of 3-9 letters from captions, sorted (a reproducible word list for rendered text)."""
    words = {w for caption in captions for w in caption.lower().strip(".").split() if w.isalpha() and 3 <= len(w) <= 9}
    return sorted(words - {"emoji", "with", "and", "the"})


def _random_crop(image: Image.Image, rng: random.Random, min_scale: float) -> Image.Image:
    """Random square-ish crop covering at least `min_scale` of the shorter side, resized to 224×224."""
    width, height = image.size
    side = min(width, height) * rng.uniform(min_scale, 1.0)
    crop_w = min(width, side * rng.uniform(0.85, 1.15))
    crop_h = min(height, side * rng.uniform(0.85, 1.15))
    left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    box = (round(left), round(top), round(left + crop_w), round(top + crop_h))
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.87, cy + r * 0.5), (cx + r * 0.87, cy + r * 0.5)]
    return [(cx - r, cy - r), (cx + r, cy + r)]


class CaptionMixture:
    """Deterministic, indexable stream of `(image, caption, source)` training examples.

    Example `i` depends only on `(seed, i)`: a source is drawn with [`SOURCE_WEIGHTS`], then an item and its
    augmentation (emoji placed at a random size on a white, coloured or texture background; random crops and flips of
    photos; random words, fonts and colours for text; one to three shapes).

    Args:
        data_dir (`str` or `Path`): cache for the emoji package (see [`fetch_emoji`]).
        seed (`int`, *optional*, defaults to 0): seed of the stream.
    """

    def __init__(self, data_dir: str | Path, seed: int = 0):
        self.seed = seed
        self.emoji = load_emoji(data_dir)
        import matplotlib
        import skimage.data

        # (images, captions, flippable); the 100 LFW faces count as one photo so they do not dominate
        self.photos = [([spec.load()], spec.captions, spec.flip) for spec in TRAIN_PHOTOS]
        self.textures = [
            images[0] for (images, _, _), spec in zip(self.photos, TRAIN_PHOTOS, strict=True) if spec.name in TEXTURES
        ]
        self.photos.append(([_to_rgb(face) for face in skimage.data.lfw_subset()[:100]], LFW_FACE_CAPTIONS, True))
        self.words = _text_vocabulary([caption for _, caption in self.emoji])
        font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        self.fonts = [str(font_dir / name) for name in FONT_FILES]

    @property
    def counts(self) -> dict[str, int]:
        """Number of distinct base items per source (before augmentation)."""
        return {
            "emoji": len(self.emoji),
            "photo": sum(len(images) for images, _, _ in self.photos),
            "photo_subjects": len(self.photos),
            "text_vocabulary": len(self.words),
            "fonts": len(self.fonts),
            "shape_kinds": len(SHAPES),
        }

    def __getitem__(self, index: int) -> tuple[Image.Image, str, str]:
        rng = random.Random(f"{self.seed}:{index}")
        source = rng.choices(list(SOURCE_WEIGHTS), weights=list(SOURCE_WEIGHTS.values()))[0]
        make = {"emoji": self._emoji, "photo": self._photo, "text": self._text, "shape": self._shape}[source]
        image, caption = make(rng)
        return image, caption, source

    def _emoji(self, rng: random.Random) -> tuple[Image.Image, str]:
        emoji, caption = rng.choice(self.emoji)
        kind = rng.random()
        if kind < 0.4:
            canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        elif kind < 0.7:
            canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randint(120, 255) for _ in range(3)))
        else:
            canvas = _random_crop(rng.choice(self.textures), rng, 0.3)
        size = rng.randint(100, IMAGE_SIZE)
        sprite = emoji.resize((size, size), Image.Resampling.BICUBIC)
        position = (rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size))
        canvas.paste(sprite, position, sprite)
        return canvas, caption

    def _photo(self, rng: random.Random) -> tuple[Image.Image, str]:
        images, captions, flip = rng.choice(self.photos)
        image = _random_crop(rng.choice(images), rng, 0.6)
        if flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, rng.choice(captions)

    def _text(self, rng: random.Random) -> tuple[Image.Image, str]:
        words = " ".join(rng.sample(self.words, rng.randint(1, 2)))
        text = rng.choice((str.upper, str.lower, str.title))(words)
        foreground, background = rng.sample(list(COLORS), 2)
        canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[background])
        draw = ImageDraw.Draw(canvas)
        font_path, size = rng.choice(self.fonts), 64
        font = ImageFont.truetype(font_path, size)
        while draw.textlength(text, font=font) > IMAGE_SIZE - 16 and size > 12:
            size -= 4
            font = ImageFont.truetype(font_path, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = rng.uniform(8, max(8.0, IMAGE_SIZE - 8 - (right - left))) - left
        y = rng.uniform(8, max(8.0, IMAGE_SIZE - 8 - (bottom - top))) - top
        draw.text((x, y), text, fill=COLORS[foreground], font=font)
        return canvas, f'The text "{text}" written in {foreground} on a {background} background.'

    def _shape(self, rng: random.Random) -> tuple[Image.Image, str]:
        shape, count = rng.choice(SHAPES), rng.randint(1, 3)
        foreground, background = rng.sample(list(COLORS), 2)
        canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[background])
        draw = ImageDraw.Draw(canvas)
        radius = rng.uniform(20, 70) if count == 1 else rng.uniform(15, 30)
        slots = (
            rng.sample([(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)], count)
            if count > 1
            else [(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))]
        )
        for sx, sy in slots:
            points = _shape_points(shape, sx * IMAGE_SIZE, sy * IMAGE_SIZE, radius)
            {"circle": draw.ellipse, "square": draw.rectangle, "triangle": draw.polygon}[shape](
                points, fill=COLORS[foreground]
            )
        noun = shape if count == 1 else f"{shape}s"
        subject = f"A {foreground} {noun}" if count == 1 else f"{NUMBER_WORDS[count]} {foreground} {noun}"
        return canvas, f"{subject} on a {background} background."


def write_bench_assets(out_dir: str | Path = BENCH_DIR) -> Path:
    """Writes the held-out photos (224×224 PNG, shortest-edge resize + center crop), `prompts.jsonl`, `LICENSES.md`.

    Returns:
        `Path`: the `prompts.jsonl` file; image paths in it are relative to its folder.
    """
    check_disjoint()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        "# Benchmark photos",
        "",
        "Held out from projector training. Each was resized (shortest edge 224) and",
        "center-cropped to 224×224 from the original in the listed package.",
        "",
        "| File | Source | Licence |",
        "|---|---|---|",
    ]
    for spec in BENCH_PHOTOS:
        image = spec.load()
        scale = IMAGE_SIZE / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - IMAGE_SIZE) // 2, (image.height - IMAGE_SIZE) // 2
        image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)).save(out_dir / f"{spec.name}.png", optimize=True)
        rows.append(f"| `{spec.name}.png` | {spec.source} | {spec.license} |")
    (out_dir / "LICENSES.md").write_text("\n".join(rows) + "\n")
    prompts = [
        (["astronaut.png"], "Describe the image in detail."),
        (["coffee.png"], "What is in this picture?"),
        (["chelsea.png"], "Describe the image."),
        (["rocket.png"], "What is happening in this image?"),
        (["camera.png"], "Describe this photo."),
        (["china.png"], "Describe the image in detail."),
        (["flower.png"], "What do you see in this image?"),
        (["grace_hopper.png"], "Who or what is shown in this picture? Describe it."),
        (["chelsea.png", "coffee.png"], "Compare the two images."),
        ([], "Explain in a few sentences why the sky is blue."),
        ([], "Write a short poem about the sea."),
    ]
    path = out_dir / BENCH_PROMPTS_FILE
    with open(path, "w") as handle:
        for images, prompt in prompts:
            handle.write(json.dumps({"images": images, "prompt": prompt, "max_new_tokens": 128}) + "\n")
    return path


def load_bench_prompts(path: str | Path | None = None) -> list[dict]:
    """Reads and validates a `prompts.jsonl` (default: the committed one).

    Returns:
        `list[dict]`: rows with `images` (absolute `Path`s), `prompt` (`str`) and `max_new_tokens` (`int`).
    """
    path = Path(path) if path is not None else BENCH_DIR / BENCH_PROMPTS_FILE
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        row = json.loads(line)
        if set(row) != {"images", "prompt", "max_new_tokens"}:
            raise ValueError(f"{path}:{number}: expected keys images, prompt, max_new_tokens, got {sorted(row)}")
        if not (
            isinstance(row["prompt"], str)
            and row["prompt"]
            and isinstance(row["max_new_tokens"], int)
            and row["max_new_tokens"] > 0
            and isinstance(row["images"], list)
        ):
            raise ValueError(f"{path}:{number}: invalid field types or values")
        images = [path.parent / name for name in row["images"]]
        missing = [str(image) for image in images if not image.is_file()]
        if missing:
            raise ValueError(f"{path}:{number}: missing image files {missing}")
        rows.append({**row, "images": images})
    return rows


__all__ = [
    "BENCH_PHOTOS",
    "CaptionMixture",
    "TRAIN_INSTRUCTIONS",
    "TRAIN_PHOTOS",
    "check_disjoint",
    "data_sources",
    "default_data_dir",
    "fetch_emoji",
    "fetch_imagenet_class_names",
    "load_bench_prompts",
    "load_emoji",
    "write_bench_assets",
]
