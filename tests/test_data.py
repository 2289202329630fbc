"""Dataset formats, paired augmentation, SDXL micro-conditioning and cached latents/prompt embeddings."""

import io
import json
import logging
import math

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import LN2, lora, losses_of, make_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_dpo_trainer import DiffusionDPOTrainer, to_preference_pairs
from diffusion_dpo_trainer.caching import module_fingerprint, precompute_latents
from diffusion_dpo_trainer.collators import PreferenceCollator
from diffusion_dpo_trainer.families import StableDiffusionFamily, load_family
from diffusion_dpo_trainer.formats import prepare_preference_dataset
from diffusion_dpo_trainer.transforms import load_image, paired_transform


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def solid(colour, size=(32, 32)):
    return Image.new("RGB", size, colour)


def gradient(width, height):
    """An image with no symmetry: every pixel differs, so any crop offset or flip shows in the pixels."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    array = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                            np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2)
    return Image.fromarray(array.astype(np.uint8))


def pickapic(labels, captions=None):
    """Pick-a-Pic layout: jpg_0 is red, jpg_1 is blue in every row, so the winner is readable from its colour."""
    n = len(labels)
    return Dataset.from_dict({
        "caption": captions if captions is not None else [f"prompt {i}" for i in range(n)],
        "jpg_0": [png(solid((255, 0, 0)))] * n,
        "jpg_1": [png(solid((0, 0, 255)))] * n,
        "label_0": labels,
        "are_different": [True] * n,
    })


def colour_of(value, row=0, column="chosen"):
    return load_image(value, row, column).getpixel((0, 0))


def write_folder(root, n=4, size=32):
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            solid((200, 20 * i, 0), (size + 8 * i, size)).save(root / "images" / f"win{i}.png")
            solid((0, 20 * i, 200), (size, size)).save(root / "images" / f"lose{i}.png")
            f.write(json.dumps({"prompt": f"a solid red square {i}", "chosen_file_name": f"images/win{i}.png",
                                "rejected_file_name": f"images/lose{i}.png"}) + "\n")
    return root


# ----- formats --------------------------------------------------------------------------------------------------------
def test_pickapic_ties_are_dropped_and_counted(caplog):
    labels = [1.0, 0.5, 0.0, 0.5, 1.0]
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo_trainer.formats"):
        pairs = to_preference_pairs(pickapic(labels), "train_dataset")
    assert "dropped 2 of 5" in caplog.text and "ties" in caplog.text
    assert len(pairs) == 3
    assert pairs["row_index"][:] == [0, 2, 4]
    assert pairs["prompt"][:] == ["prompt 0", "prompt 2", "prompt 4"]
    # label_0 == 1: jpg_0 (red) wins; label_0 == 0: jpg_1 (blue) wins.
    assert [colour_of(v) for v in pairs["chosen"]] == [(255, 0, 0), (0, 0, 255), (255, 0, 0)]
    assert [colour_of(v) for v in pairs["rejected"]] == [(0, 0, 255), (255, 0, 0), (0, 0, 255)]


def test_streamed_pickapic_is_normalised_as_it_streams():
    labels = [1.0, 0.5, 0.0, 0.5, 1.0]
    pairs = to_preference_pairs(pickapic(labels).to_iterable_dataset(), "train_dataset")
    assert isinstance(pairs, datasets.IterableDataset)  # nothing was read up front
    rows = list(pairs)
    assert [r["row_index"] for r in rows] == [0, 2, 4] and [r["prompt"] for r in rows] == ["prompt 0", "prompt 2",
                                                                                             "prompt 4"]
    assert [colour_of(r["chosen"]) for r in rows] == [(255, 0, 0), (0, 0, 255), (255, 0, 0)]
    assert [colour_of(r["rejected"]) for r in rows] == [(0, 0, 255), (255, 0, 0), (0, 0, 255)]
    bad = to_preference_pairs(pickapic([1.0, 0.0, 0.3]).to_iterable_dataset())
    with pytest.raises(ValueError, match=r"Row 2, column 'label_0': expected 1 .* got 0.3"):
        list(bad)


def test_pickapic_on_disk_is_normalised_without_copying_images(tmp_path):
    source_path = str(tmp_path / "pickapic")
    pickapic([1.0, 0.0, 0.5, 1.0] * 5).save_to_disk(source_path)
    source = datasets.load_from_disk(source_path)
    pairs = to_preference_pairs(source)
    assert len(pairs) == 15
    # Still the same memory-mapped Arrow file, read through an index mapping: no image bytes were rewritten.
    assert {f["filename"] for f in pairs.cache_files} == {f["filename"] for f in source.cache_files}


def test_trl_image_representations_give_identical_pixels(tmp_path):
    """PIL, datasets.Image, encoded bytes and file paths are all read as the same image."""
    image = gradient(40, 32)
    path = str(tmp_path / "image.png")
    image.save(path)
    as_pil = Dataset.from_dict({"prompt": ["p"], "chosen": [image], "rejected": [image]})
    as_bytes = Dataset.from_dict({"prompt": ["p"], "chosen": [png(image)], "rejected": [png(image)]})
    as_path = Dataset.from_dict({"prompt": ["p"], "chosen": [path], "rejected": [path]})
    as_feature = as_path.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    collate = PreferenceCollator(32)
    batches = [collate([prepare_preference_dataset(d)[0]]) for d in (as_pil, as_bytes, as_path, as_feature)]
    for batch in batches[1:]:
        assert torch.equal(batch["chosen_pixel_values"], batches[0]["chosen_pixel_values"])
        assert torch.equal(batch["rejected_pixel_values"], batches[0]["rejected_pixel_values"])


def test_preference_folder_is_read_through_datasets(tmp_path):
    folder = write_folder(tmp_path / "folder", n=3)
    pairs = to_preference_pairs(str(folder))
    assert pairs["prompt"][:] == [f"a solid red square {i}" for i in range(3)]
    assert isinstance(pairs.features["chosen"], datasets.Image)
    for i in range(3):
        assert colour_of(pairs[i]["chosen"]) == (200, 20 * i, 0)
        assert colour_of(pairs[i]["rejected"]) == (0, 20 * i, 200)
        assert load_image(pairs[i]["chosen"], i, "chosen").size == (32 + 8 * i, 32)


def test_preference_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="metadata.jsonl does not exist"):
        to_preference_pairs(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}))
    expected = r"line 1: expected keys \['prompt', 'chosen_file_name', 'rejected_file_name'\]"
    with pytest.raises(ValueError, match=expected):
        to_preference_pairs(str(tmp_path))


# ----- bad input ------------------------------------------------------------------------------------------------------
def test_label_outside_the_valid_set_names_row_and_column():
    with pytest.raises(ValueError, match=r"Row 2, column 'label_0': expected 1 .*0 .*0.5.*got 0.3"):
        to_preference_pairs(pickapic([1.0, 0.0, 0.3, 1.0]))


def test_dataset_of_only_ties_is_rejected():
    with pytest.raises(ValueError, match=r"empty after dropping its 3 Pick-a-Pic ties"):
        to_preference_pairs(pickapic([0.5, 0.5, 0.5]), "train_dataset")


def test_non_string_caption_names_row_and_column():
    with pytest.raises(ValueError, match=r"Row 1, column 'caption': expected a string"):
        to_preference_pairs(pickapic([1.0, 0.0], captions=["fine", None]))


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["prompt", "chosen"], r"missing column\(s\) \['rejected'\] of the prompt/chosen/rejected format"),
        (["caption", "jpg_0", "jpg_1"], r"missing column\(s\) \['label_0'\] of the Pick-a-Pic format"),
        (["text", "image"], r"match no supported format"),
    ],
)
def test_missing_columns_are_named(columns, message):
    with pytest.raises(ValueError, match=message):
        to_preference_pairs(Dataset.from_dict({c: ["x"] for c in columns}))


def test_undecodable_image_is_named_when_caching(tmp_path, sd_path, pairs):
    broken = Dataset.from_dict({"prompt": ["a", "b"], "chosen": [png(solid((1, 2, 3))), b"not an image"],
                                "rejected": [png(solid((3, 2, 1)))] * 2})
    with pytest.raises(ValueError, match=r"Row 1, column 'chosen': could not read an image"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, precompute_latents=True), train_dataset=broken)


# ----- property tests -------------------------------------------------------------------------------------------------
colours = st.tuples(*[st.integers(0, 255)] * 3)
sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))
prompts = st.text(max_size=20)


@st.composite
def trl_rows(draw):
    """Rows of the TRL format, each image in a random representation."""
    n = draw(st.integers(1, 5))
    rows = {"prompt": [], "chosen": [], "rejected": [], "expected": []}
    kind = draw(st.sampled_from(["pil", "bytes", "dict"]))  # one representation per column, as Arrow requires
    for _ in range(n):
        rows["prompt"].append(draw(prompts))
        pair = [solid(draw(colours), draw(sizes)) for _ in range(2)]
        rows["expected"].append([image.getpixel((0, 0)) for image in pair])
        for column, image in zip(("chosen", "rejected"), pair):
            value = {"pil": image, "bytes": png(image), "dict": {"bytes": png(image), "path": None}}[kind]
            rows[column].append(value)
    return rows


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=trl_rows())
def test_any_valid_trl_rows_normalise(rows):
    expected = rows.pop("expected")
    pairs = prepare_preference_dataset(Dataset.from_dict(rows))
    assert pairs["prompt"][:] == rows["prompt"]
    for i, (chosen, rejected) in enumerate(expected):
        assert colour_of(pairs[i]["chosen"], i) == chosen
        assert colour_of(pairs[i]["rejected"], i, "rejected") == rejected


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.sampled_from([0, 0.5, 1]), min_size=1, max_size=12).filter(lambda ls: set(ls) != {0.5}),
       data=st.data())
def test_any_valid_pickapic_rows_normalise(labels, data):
    captions = data.draw(st.lists(prompts, min_size=len(labels), max_size=len(labels)))
    pairs = to_preference_pairs(pickapic([float(x) for x in labels], captions))
    kept = [i for i, label in enumerate(labels) if label != 0.5]
    assert pairs["row_index"][:] == kept
    assert pairs["prompt"][:] == [captions[i] for i in kept]
    red, blue = (255, 0, 0), (0, 0, 255)
    assert [colour_of(v) for v in pairs["chosen"]] == [red if labels[i] == 1 else blue for i in kept]
    assert [colour_of(v) for v in pairs["rejected"]] == [blue if labels[i] == 1 else red for i in kept]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    data=st.data(),
    bad_label=st.one_of(st.floats(allow_nan=True).filter(lambda x: x not in (0, 0.5, 1)), st.none()),
    # int64-range integers: a prompt Arrow cannot even store is not a row a user can hand us.
    bad_prompt=st.one_of(st.integers(-(2**63), 2**63 - 1), st.none(), st.lists(st.text(max_size=3), max_size=2)),
    kind=st.sampled_from(["label", "caption", "prompt"]),
)
def test_any_invalid_row_raises_the_documented_error(n, data, bad_label, bad_prompt, kind):
    row = data.draw(st.integers(0, n - 1))
    texts = ["ok"] * n
    if bad_prompt is None:
        texts[row] = None  # a missing value in a string column
    else:
        texts, row = [bad_prompt] * n, 0  # Arrow columns have one type: a whole column of non-strings
    if kind == "prompt":
        values = [solid((1, 2, 3))] * n
        dataset, column = Dataset.from_dict({"prompt": texts, "chosen": values, "rejected": values}), "prompt"
    elif kind == "caption":
        dataset, column = pickapic([1.0] * n, texts), "caption"
    else:
        row = data.draw(st.integers(0, n - 1))
        labels = [1.0] * n
        labels[row] = bad_label
        dataset, column = pickapic(labels), "label_0"
    with pytest.raises(ValueError, match=rf"Row {row}, column '{column}': expected"):
        to_preference_pairs(dataset)


# ----- paired augmentation and micro-conditioning ---------------------------------------------------------------------
def _encoded(image: Image.Image, format_name: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **save_kwargs)
    return buffer.getvalue()


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one), from (H, W, 3) uint16 values."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _palette_with_transparent_red():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    image.putdata([0, 1])
    image.info["transparency"] = 0  # red is transparent
    return image


WHITE, BLACK, RED, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("name, encoded, expected", [
    # 16-bit greyscale PNG: 65535 is white and 32896 (= 128 * 257) mid-grey; PIL's convert clipped both to 255.
    ("I;16 png", lambda: _encoded(Image.fromarray(np.array([[65535, 32896, 0]], np.uint16)), "PNG"),
     [WHITE, (128,) * 3, BLACK]),
    ("I 32-bit tiff", lambda: _encoded(Image.fromarray(np.array([[65535, 32896, 0]], np.int32), "I"), "TIFF"),
     [WHITE, (128,) * 3, BLACK]),
    ("F float tiff", lambda: _encoded(Image.fromarray(np.array([[1.0, 0.25, 0.0]], np.float32), "F"), "TIFF"),
     [WHITE, (64,) * 3, BLACK]),
    ("16-bit RGB png", lambda: _png_rgb16(np.array([[[65535, 0, 0], [0, 32896, 65535]]], np.uint16)),
     [RED, (0, 128, 255)]),
    ("L", lambda: _encoded(Image.fromarray(np.array([[100, 0]], np.uint8)), "PNG"), [(100,) * 3, BLACK]),
    # alpha over white: transparent black is white, opaque black black, half-transparent black about half grey
    ("LA", lambda: _encoded(Image.fromarray(np.array([[[0, 0], [0, 255], [0, 128]]], np.uint8), "LA"), "PNG"),
     [WHITE, BLACK, (127,) * 3]),
    ("RGBA", lambda: _encoded(Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255]]], np.uint8)), "PNG"),
     [WHITE, RED]),
    ("P with a transparent colour", lambda: _encoded(_palette_with_transparent_red(), "PNG"), [WHITE, BLUE]),
    ("CMYK jpeg-free tiff", lambda: _encoded(Image.fromarray(np.array([[[0, 0, 0, 0], [0, 255, 255, 0]]], np.uint8),
                                                              "CMYK"), "TIFF"), [WHITE, RED]),
])
def test_every_mode_and_bit_depth_decodes_as_it_looks(name, encoded, expected):
    image = load_image(encoded(), 3, "chosen")
    assert image.mode == "RGB"
    assert [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)] == [tuple(e) for e in expected], name


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with orientation 6 ("rotate 90 clockwise") is read upright, as viewers show it."""
    stored = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))  # 2 wide, 1 high: red | blue
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(_encoded(stored, "PNG", exif=exif), 0, "chosen")
    assert image.size == (1, 2)
    assert [tuple(p) for p in np.asarray(image).reshape(-1, 3)] == [RED, BLUE]


def test_a_pair_of_copies_gets_the_same_crop_and_flip_pixelwise():
    image = gradient(48, 40)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        (a, b), _, crops = paired_transform([image, image.copy()], 32, random_crop=True, random_flip=True)
        assert torch.equal(a, b)
        assert crops[0] == crops[1]
        flipped = not torch.equal(a, _crop(image, 32, crops[0], flipped=False))
        seen.add((crops[0], flipped))
    # The draws do vary (otherwise equality above would be trivial): several crops, both orientations.
    assert len({c for c, _ in seen}) > 5 and {f for _, f in seen} == {True, False}


def _crop(image, resolution, top_left, flipped):
    """Reference for the crop convention: crop the (flipped) resized image at the reported top-left."""
    scale = resolution / min(image.size)
    resized = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    if flipped:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = top_left
    array = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)


def test_crop_top_left_is_measured_in_the_flipped_frame():
    """SDXL's crops_coords_top_left: the pixels equal the flipped resized image cropped at the reported corner."""
    wide, tall = gradient(64, 32), gradient(40, 80)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        torch.rand(2)  # the crop draw paired_transform makes first
        flip = torch.rand(()).item() < 0.5
        flips.add(flip)
        torch.manual_seed(seed)
        pixels, sizes, crops = paired_transform([wide, tall], 32, random_crop=True, random_flip=True)
        assert sizes == [(32, 64), (80, 40)]
        for image, px, crop in zip((wide, tall), pixels, crops):
            assert torch.equal(px, _crop(image, 32, crop, flipped=flip))
    assert flips == {True, False}


def test_pairs_of_different_sizes_get_corresponding_crops():
    small = gradient(40, 32)
    large = small.resize((80, 64), Image.Resampling.NEAREST)  # the same picture at twice the size
    torch.manual_seed(1)
    for _ in range(10):
        (a, b), sizes, crops = paired_transform([small, large], 32, random_crop=True, random_flip=True)
        assert sizes == [(32, 40), (64, 80)]
        assert crops[0] == crops[1]  # both are resized to 40x32, so the same fraction is the same corner
        assert (a - b).abs().mean() < 0.05  # and they show the same part of the picture


def test_sdxl_time_ids_follow_true_sizes_crops_and_flips(tmp_path, sdxl_path):
    wide, tall = gradient(64, 32), gradient(40, 80)
    data = Dataset.from_dict({"prompt": ["a red square"] * 8, "chosen": [wide] * 8, "rejected": [tall] * 8})
    args = make_args(tmp_path, random_crop=True, random_flip=True)
    trainer = DiffusionDPOTrainer(model=sdxl_path, args=args, train_dataset=data)
    torch.manual_seed(0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    time_ids = trainer.family.time_conditioning(batch, 32, torch.device("cpu"))["time_ids"]
    assert time_ids.shape == (16, 6)
    assert len({tuple(t) for t in time_ids[:, 2:4].tolist()}) > 2  # crops vary, so the check below is not trivial
    for i in range(8):
        for j, (side, image) in enumerate((("chosen", wide), ("rejected", tall))):
            ids = time_ids[j * 8 + i].long().tolist()
            assert ids[:2] == [image.height, image.width] and ids[4:] == [32, 32]
            pixels = batch[f"{side}_pixel_values"][i]
            flipped = not torch.equal(pixels, _crop(image, 32, tuple(ids[2:4]), flipped=False))
            assert torch.equal(pixels, _crop(image, 32, tuple(ids[2:4]), flipped=flipped))

    # Without random crops and flips: centre crops. wide 64x32 -> 64x32, crop left = 16; tall 40x80 -> 32x64, top = 16.
    centre = PreferenceCollator(32)([trainer.train_dataset[0]])
    time_ids = trainer.family.time_conditioning(centre, 32, torch.device("cpu"))["time_ids"]
    assert time_ids.tolist() == [[32, 64, 0, 16, 32, 32], [80, 40, 16, 0, 32, 32]]


# ----- end to end, one per format -------------------------------------------------------------------------------------
def test_pickapic_trains_on_the_non_tied_pairs(tmp_path, sd_path):
    labels = [1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path), train_dataset=pickapic(labels),
                                  peft_config=lora())
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))


def test_streamed_pairs_train_without_being_materialised(tmp_path, sd_path, pairs):
    streamed = pairs.to_iterable_dataset()
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=3), train_dataset=streamed,
                                  peft_config=lora())
    assert isinstance(trainer.train_dataset, datasets.IterableDataset)
    trainer.train()
    assert trainer.state.global_step == 3
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    with pytest.raises(ValueError, match="map-style datasets.Dataset"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, precompute_latents=True), train_dataset=streamed,
                            peft_config=lora())


def test_folder_path_trains_sdxl(tmp_path, sdxl_path):
    folder = write_folder(tmp_path / "folder", n=4)
    trainer = DiffusionDPOTrainer(model=sdxl_path, args=make_args(tmp_path), train_dataset=str(folder),
                                  eval_dataset=str(folder), peft_config=lora())
    assert len(trainer.train_dataset) == 4
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert trainer.evaluate()["eval_loss"] > 0


def test_trl_pairs_as_bytes_and_paths_train(tmp_path, sd_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        gradient(32 + 4 * i, 32).save(paths[-1])
    data = Dataset.from_dict({"prompt": [f"p{i}" for i in range(4)], "chosen": paths,
                              "rejected": [png(solid((9, 9, 9)))] * 4})
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path), train_dataset=data, peft_config=lora())
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)


def test_cached_latents_are_the_vaes_distribution_of_the_collated_pixels(tmp_path, sdxl_path, pairs):
    """The cache stores exactly the VAE's mean and std of the pixels the collator would produce, in both orientations
    (training on it gives the same losses as no cache: the family conformance suite checks that for every family)."""
    args = make_args(tmp_path, random_flip=True, precompute_latents=True)
    trainer = DiffusionDPOTrainer(model=sdxl_path, args=args, train_dataset=pairs)
    _check_cached_distribution(trainer, pairs)


def _check_cached_distribution(trainer, pairs):
    rows = [trainer.train_dataset[i] for i in range(4)]
    pixels = PreferenceCollator(32)([prepare_preference_dataset(pairs)[i] for i in range(4)])["chosen_pixel_values"]
    for suffix, images in (("", pixels), ("_flipped", pixels.flip(-1))):
        mean, std = trainer.family.encode_pixels(images)
        torch.testing.assert_close(torch.stack([r[f"chosen_latent_mean{suffix}"] for r in rows]), mean)
        torch.testing.assert_close(torch.stack([r[f"chosen_latent_std{suffix}"] for r in rows]), std)


def test_cached_random_crops_match_encoding_the_stored_crop(tmp_path, sd_path):
    family = load_family(sd_path)
    wide, tall = gradient(64, 32), gradient(40, 80)
    data = prepare_preference_dataset(Dataset.from_dict({"prompt": ["p"] * 6, "chosen": [wide] * 6,
                                                         "rejected": [tall] * 6}))
    collator = PreferenceCollator(32, random_crop=True)
    cached = precompute_latents(data, family, collator, random_flip=True, seed=3, batch_size=4)[:]
    again = precompute_latents(data, family, collator, random_flip=True, seed=3, batch_size=2)[:]
    assert torch.equal(cached["chosen_crop_top_left"], again["chosen_crop_top_left"])  # fixed per pair and seed
    assert len({tuple(c.tolist()) for c in cached["chosen_crop_top_left"]}) > 1  # but random across pairs
    for side, image in (("chosen", wide), ("rejected", tall)):
        for suffix, flipped in (("", False), ("_flipped", True)):
            expected = torch.stack([_crop(image, 32, tuple(c.tolist()), flipped)
                                    for c in cached[f"{side}_crop_top_left{suffix}"]])
            mean, std = family.encode_pixels(expected)
            torch.testing.assert_close(cached[f"{side}_latent_mean{suffix}"], mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached[f"{side}_latent_std{suffix}"], std, atol=1e-5, rtol=1e-5)


def test_cache_is_reused_across_runs_for_datasets_on_disk(tmp_path, sd_path, pairs, monkeypatch):
    pairs.save_to_disk(str(tmp_path / "pairs"))
    on_disk = datasets.load_from_disk(str(tmp_path / "pairs"))
    args = make_args(tmp_path, precompute_latents=True, precompute_text_embeddings=True)
    first = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=on_disk)
    first_file = first.train_dataset.cache_files[0]["filename"]
    first_prompts = first.data_collator.prompt_embeddings.embeddings.cache_files[0]["filename"]

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded although a cache exists")

    monkeypatch.setattr(StableDiffusionFamily, "encode_pixels", fail)
    monkeypatch.setattr(StableDiffusionFamily, "encode_prompt", fail)
    reloaded = datasets.load_from_disk(str(tmp_path / "pairs"))
    second = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=reloaded)
    assert second.train_dataset.cache_files[0]["filename"] == first_file
    assert second.data_collator.prompt_embeddings.embeddings.cache_files[0]["filename"] == first_prompts
    monkeypatch.undo()

    # A different resolution (or model, or augmentation) is a different cache.
    other = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, resolution=16, precompute_latents=True),
                                train_dataset=on_disk)
    assert other.train_dataset.cache_files[0]["filename"] != first_file


def test_model_fingerprint_follows_the_weights(sd_path):
    vae = load_family(sd_path).vae
    before = module_fingerprint(vae)
    assert module_fingerprint(vae) == before
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-3
    assert module_fingerprint(vae) != before
