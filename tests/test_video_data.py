"""Video preference data: PyAV decoding of mp4/webm/paths/datasets.Video, one window/crop/flip per pair, frame rules
and errors; AI feedback, win rates and the evaluation callback on a video pipeline."""

import glob

import datasets
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from helpers import LN2, make_args
from peft import LoraConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.evaluation import RewardEvaluationCallback, evaluate_win_rate
from diffusion_dpo_trainer.feedback import build_preference_pairs
from diffusion_dpo_trainer.formats import prepare_preference_dataset
from diffusion_dpo_trainer.rewards import frame_averaged
from diffusion_dpo_trainer.sampling import sample_images
from diffusion_dpo_trainer.testing.wan import colour_ramp, make_video_preference_dataset
from diffusion_dpo_trainer.video_data import VideoPreferenceCollator, encode_video

SAMPLING = dict(num_inference_steps=2, height=32, width=32, num_frames=5, max_sequence_length=16)


def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def marked_frames(count, width=48, height=40, offset=0):
    """Frames whose red channel is a horizontal gradient (moved by crops and flips), whose blue channel is 10 x the
    frame index (uniform, so it survives resizing: it tells which frames a clip took), green = `offset`."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[..., 0] = np.linspace(0, 255, width).astype(np.uint8)[None, None, :]
    frames[..., 1] = offset
    frames[..., 2] = (10 * np.arange(count)).astype(np.uint8)[:, None, None]
    return frames


def frame_numbers(pixels):
    """The frame index each frame of a (C, F, H, W) clip in [-1, 1] came from (blue = 10 x index)."""
    blue = (pixels[2].mean(dim=(1, 2)) + 1) * 127.5
    return (blue / 10).round().long().tolist()


def pair_rows(chosen, rejected, prompt="a square"):
    return [{"prompt": prompt, "chosen": c, "rejected": r, "row_index": i}
            for i, (c, r) in enumerate(zip(chosen, rejected))]


# ----- decoding -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_encoded_videos_decode_to_their_frames(tmp_path, container):
    frames = colour_ramp(9, (200, 120, 40), size=32)
    data = encode_video(frames, fps=16, container=container)
    path = tmp_path / f"clip.{container}"
    path.write_bytes(data)
    collator = VideoPreferenceCollator(32, num_frames=9)
    for value in (data, str(path), {"bytes": None, "path": str(path)}):
        pixels = collator(pair_rows([value], [frames]))
        decoded, original = pixels["chosen_pixel_values"][0], pixels["rejected_pixel_values"][0]
        assert decoded.shape == original.shape == (3, 9, 32, 32)
        # Lossy codecs: within a few levels of the source frames (a bare (F, H, W, 3) array here).
        assert (decoded - original).abs().mean() < 4 / 127.5


def test_a_datasets_video_column_is_read_with_pyav(tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.mp4"))
        with open(paths[-1], "wb") as f:
            f.write(encode_video(colour_ramp(5, (50 + 100 * i, 80, 80))))
    data = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": paths, "rejected": paths[::-1]})
    data = data.cast_column("chosen", datasets.Video(decode=False)).cast_column("rejected", datasets.Video())
    prepared = prepare_preference_dataset(data)  # decode=True needs torchcodec: cast back to decode=False
    assert prepared.features["rejected"] == datasets.Video(decode=False)
    batch = VideoPreferenceCollator(32, num_frames=5)([prepared[0], prepared[1]])
    assert batch["chosen_pixel_values"].shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(batch["chosen_pixel_values"][0], batch["rejected_pixel_values"][1])


# ----- one window, crop and flip per pair -----------------------------------------------------------------------------
def test_both_videos_of_a_pair_get_the_same_window_crop_and_flip():
    collator = VideoPreferenceCollator(32, num_frames=5, frame_stride=2, random_crop=True, random_flip=True)
    chosen, rejected = marked_frames(20), marked_frames(20, offset=200)
    starts, flips = set(), set()
    torch.manual_seed(0)
    for _ in range(12):
        batch = collator(pair_rows([list(chosen)], [rejected]))
        c, r = batch["chosen_pixel_values"][0], batch["rejected_pixel_values"][0]
        assert torch.equal(c[[0, 2]], r[[0, 2]])  # same frames (blue), same crop and flip (red)
        assert not torch.equal(c[1], r[1])  # the videos do differ
        numbers = frame_numbers(c)
        assert np.diff(numbers).tolist() == [2, 2, 2, 2] and 0 <= numbers[0] <= 20 - 9
        starts.add(numbers[0])
        flips.add(bool(c[0, 0, 0, 0] > c[0, 0, 0, -1]))  # the red gradient runs right to left when flipped
    assert len(starts) >= 3 and flips == {True, False}  # the draws do vary between pairs


def test_without_random_crop_the_clip_starts_at_the_first_frame():
    batch = VideoPreferenceCollator(32, num_frames=5)(pair_rows([marked_frames(12)], [marked_frames(12)]))
    assert frame_numbers(batch["chosen_pixel_values"][0]) == [0, 1, 2, 3, 4]


def test_video_fps_resamples_by_the_frame_rate_ratio():
    data = encode_video(marked_frames(17, 32, 32), fps=16)
    batch = VideoPreferenceCollator(32, num_frames=5, fps=8)(pair_rows([data], [data]))
    assert frame_numbers(batch["chosen_pixel_values"][0]) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match=r"Row 0, column 'chosen': the video has no frame rate"):
        VideoPreferenceCollator(32, num_frames=5, fps=8)(pair_rows([marked_frames(17)], [data]))
    with pytest.raises(ValueError, match=r"video_fps=24 is above the video's own 16 fps"):
        VideoPreferenceCollator(32, num_frames=5, fps=24)(pair_rows([data], [data]))
    with pytest.raises(ValueError, match="either video_fps or frame_stride"):
        VideoPreferenceCollator(32, num_frames=5, fps=8, frame_stride=2)


# ----- errors name the row and the column -----------------------------------------------------------------------------
def test_too_short_and_undecodable_videos_name_row_and_column():
    collator = VideoPreferenceCollator(32, num_frames=9)
    long, short = encode_video(colour_ramp(9, (90, 90, 90))), encode_video(colour_ramp(5, (90, 90, 90)))
    rows = pair_rows([long, long], [long, short])
    with pytest.raises(ValueError, match=r"Row 1, column 'rejected': the video has 5 frames, but a clip of "
                                         r"num_frames=9 every 1 frames needs 9\."):
        collator(rows)
    with pytest.raises(ValueError, match=r"Row 0, column 'chosen': could not read a video .*Expected a path"):
        collator(pair_rows([b"not a video"], [long]))
    with pytest.raises(ValueError, match=r"Row 0, column 'rejected': a frame must be a PIL image or an HxWx3 uint8"):
        collator(pair_rows([long], [[np.zeros((32, 32), dtype=np.uint8)] * 9]))


# ----- rewards, AI feedback, evaluation -------------------------------------------------------------------------------
def test_frame_averaged_scores_evenly_spread_frames():
    seen = []

    def frame_value(frames, prompts):
        seen.append(list(prompts))
        return [float(f) for f in frames]

    reward = frame_averaged(frame_value, num_frames=3)
    # Frames are their own scores: picks 0, 2, 4 of the first video (mean 4) and both frames of the second.
    assert reward([[0.0, 1.0, 2.0, 10.0, 10.0], [3.0, 5.0]], ["a", "b"]) == [4.0, 4.0]
    assert seen == [["a", "a", "a", "b", "b"]]  # one call for the whole batch, each frame with its prompt


@pytest.fixture(scope="module")
def wan_pipe(wan_path):
    return WanPipeline.from_pretrained(wan_path)


def test_video_pairs_from_a_pipeline_have_the_expected_winners_and_train(tmp_path, wan_pipe, wan_path):
    prompts, n, seed = ["a red square", "a blue circle"], 3, 7
    reward = frame_averaged(brightness, num_frames=3)
    dataset = build_preference_pairs(wan_pipe, prompts, reward, num_images_per_prompt=n, strategy="all_pairs",
                                     seed=seed, batch_size=2, progress=False, **SAMPLING)
    assert dataset.features["chosen"] == datasets.Video(decode=False)
    # Independently: regenerate every video from its documented seed, score frames 0, 2, 4 by hand, rank.
    expected = []
    for i, prompt in enumerate(prompts):
        seeds = [seed + i * n + j for j in range(n)]
        videos = sample_images(wan_pipe, [prompt] * n, seeds, progress=False, **SAMPLING)
        assert all(len(video) == 5 for video in videos)
        scores = [np.mean(brightness([video[k] for k in (0, 2, 4)], None)) for video in videos]
        for a in range(n):
            for b in range(a + 1, n):
                if scores[a] != scores[b]:
                    win, lose = (a, b) if scores[a] > scores[b] else (b, a)
                    expected.append((prompt, seeds[win], seeds[lose], scores[win], scores[lose]))
    got = list(zip(dataset["prompt"], dataset["chosen_seed"], dataset["rejected_seed"], dataset["chosen_score"],
                   dataset["rejected_score"]))
    assert [g[:3] for g in got] == [e[:3] for e in expected] and len(got) == 6
    np.testing.assert_allclose([g[3:] for g in got], [e[3:] for e in expected], rtol=1e-6)

    # The pairs (mp4 bytes in a datasets.Video column) train a video model as they are.
    args = make_args(tmp_path, num_frames=5, max_steps=1)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=dataset,
                                  peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_win_rate_of_a_video_pipeline_against_itself_is_one_half(wan_pipe):
    reward = frame_averaged(brightness, num_frames=2)
    result = evaluate_win_rate(wan_pipe, wan_pipe, ["a red square"], reward, seeds=[0, 1], return_images=True,
                               progress=False, **SAMPLING)
    assert result["win_rate"] == 0.5 and result["ties"] == 2
    video = result["images"][0]
    assert len(video) == 5
    assert result["comparisons"][0]["reward"] == pytest.approx(np.mean(brightness([video[0], video[4]], None)))


def test_callback_logs_frame_strips_of_policy_and_reference_to_tensorboard(tmp_path, wan_path):
    args = make_args(tmp_path, num_frames=5, max_steps=2, report_to="tensorboard")
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=make_video_preference_dataset(n=2),
                                  peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    trainer.add_callback(RewardEvaluationCallback(trainer, ["a red square", "a blue circle"],
                                                  frame_averaged(brightness), seeds=[0], eval_steps=2, **SAMPLING))
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "eval_win_rate" in h] == [2]
    events = EventAccumulator(glob.glob(f"{args.output_dir}/runs/*")[0], size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("eval/samples")
    # Two rows (reference, policy); per (prompt, seed) a strip of 4 of the 5 frames, 32 px each.
    assert (image.step, image.height, image.width) == (2, 2 * 32, 2 * 4 * 32)


def test_build_pairs_and_evaluate_commands_on_a_video_pipeline(tmp_path, wan_path, capsys):
    from diffusion_dpo_trainer import cli
    from diffusion_dpo_trainer.testing import make_clip_model

    common = ["--model", wan_path, "--reward", f"clip:{make_clip_model(tmp_path / 'clip')}", "--num_inference_steps",
              "2", "--resolution", "32", "--num_frames", "5"]
    out = tmp_path / "pairs"
    assert cli.main(["build-pairs", *common, "--prompt", "a red square", "--num_images_per_prompt", "3",
                     "--output_dir", str(out)]) == 0
    pairs = datasets.load_from_disk(str(out))
    assert pairs.features["chosen"] == datasets.Video(decode=False) and len(pairs) == 1
    assert pairs["chosen_score"][0] > pairs["rejected_score"][0]
    assert cli.main(["evaluate", *common, "--prompt", "a red square", "--reference_model", wan_path,
                     "--seeds", "0"]) == 0
    assert '"win_rate": 0.5' in capsys.readouterr().out


def test_a_missing_pyav_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "diffusion-dpo-trainer\[video\]"'):
        encode_video(colour_ramp(5))
