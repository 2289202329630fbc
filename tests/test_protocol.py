"""The evaluation protocol: prompt sets by name (local stand-ins with the Hub sets' columns), base/tuned sampling,
report.json figures recomputed from the raw scores, resuming after a kill, report.html, and the CLI."""

import json
import sys
from html.parser import HTMLParser

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from helpers import lora
from peft.utils import get_peft_model_state_dict

import diffusion_dpo_trainer
from diffusion_dpo_trainer import cli, prompt_sets, protocol
from diffusion_dpo_trainer.protocol import evaluate_protocol, sampling_settings, summarize
from diffusion_dpo_trainer.sampling import sample_images

SAMPLING = {"num_inference_steps": 2, "resolution": 32, "batch_size": 2, "progress": False}
PROMPTS = ["a red square", "a blue circle", "a cat on a dog"]


def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def redness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64)[..., 0].mean()) for image in images]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, sd_path):
    """A LoRA with large random weights: the tuned model visibly differs from the base."""
    pipe = DiffusionPipeline.from_pretrained(sd_path)
    pipe.unet.add_adapter(lora())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("lora") / "lora"
    pipe.save_lora_weights(path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- prompt sets

@pytest.fixture
def hub_stand_ins(tmp_path, monkeypatch):
    """Local datasets laid out like the Hub ones: same split names, same columns."""
    def parquet(name, split, column, prompts):
        folder = tmp_path / name / "data"
        folder.mkdir(parents=True)
        datasets.Dataset.from_dict({column: prompts, "other": list(range(len(prompts)))}).to_parquet(
            folder / f"{split}-00000-of-00001.parquet")
        return str(tmp_path / name)

    monkeypatch.setattr(prompt_sets, "HUB_SETS", {
        "parti": (parquet("parti", "train", "Prompt", ["p1", "p2", "p3"]), "train", "Prompt"),
        "pickapic-test": (parquet("pickapic", "test_unique", "caption", ["c1", "c2"]), "test_unique", "caption"),
        "drawbench": (parquet("drawbench", "train", "Prompts", ["d1"]), "train", "Prompts"),
    })
    hps = tmp_path / "HPDv2" / "benchmark"
    hps.mkdir(parents=True)
    for style in prompt_sets.HPS_STYLES:
        (hps / f"{style}.json").write_text(json.dumps([f"{style} 1", f"{style} 2"]), encoding="utf-8")
    monkeypatch.setattr(prompt_sets, "HPS_BENCHMARK", str(tmp_path / "HPDv2"))


def test_published_prompt_sets_load_by_name(hub_stand_ins, prompts_file, tmp_path):
    sets = prompt_sets.load_prompt_sets(["parti", "pickapic-test", "drawbench", "hpsv2", prompts_file])
    assert sets["parti"] == ["p1", "p2", "p3"] and sets["pickapic-test"] == ["c1", "c2"] and sets["drawbench"] == ["d1"]
    assert [k for k in sets if k.startswith("hpsv2/")] == ["hpsv2/anime", "hpsv2/concept-art", "hpsv2/paintings",
                                                            "hpsv2/photo"]
    assert sets["hpsv2/photo"] == ["photo 1", "photo 2"]
    assert sets[prompts_file] == PROMPTS  # blank lines dropped
    assert prompt_sets.load_prompt_sets("parti", max_prompts=2) == {"parti": ["p1", "p2"]}
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"caption": "x", "id": 1}\n{"caption": "y", "id": 2}\n', encoding="utf-8")
    assert prompt_sets.load_prompt_sets(str(jsonl)) == {str(jsonl): ["x", "y"]}


def test_prompt_set_errors_name_the_column_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"words": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"columns \['words'\]; expected one of \('prompt'"):
        prompt_sets.load_prompt_sets(str(bad))
    bad.write_text('{"prompt": "x"}\n{"prompt": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': expected a non-empty string"):
        prompt_sets.load_prompt_sets(str(bad))


# ---------------------------------------------------------------- sampler settings

def test_sampler_settings_default_to_the_papers_and_are_overridable(sd_path, sdxl_path):
    pipe = DiffusionPipeline.from_pretrained(sd_path)
    assert sampling_settings(pipe) == {"scheduler": type(pipe.scheduler).__name__, "num_inference_steps": 50,
                                       "guidance_scale": 7.5}
    assert sampling_settings(DiffusionPipeline.from_pretrained(sdxl_path))["guidance_scale"] == 5.0
    settings = sampling_settings(pipe, "DDIMScheduler", 20, 3.0, 64)
    assert settings == {"scheduler": "DDIMScheduler", "num_inference_steps": 20, "guidance_scale": 3.0,
                        "height": 64, "width": 64}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="Unknown scheduler 'Nope'"):
        sampling_settings(pipe, "Nope")


# ---------------------------------------------------------------- the report's figures

def test_report_figures_recomputed_from_the_raw_scores(tmp_path, sd_path, lora_dir, prompts_file):
    report = evaluate_protocol(sd_path, [prompts_file], [brightness, redness], tmp_path / "out", lora=lora_dir,
                               seeds=[0, 1], **SAMPLING)
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2  # variants x prompts x seeds
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    settings = report["settings"]
    assert settings["sampling"]["num_inference_steps"] == 2 and settings["sampling"]["guidance_scale"] == 7.5
    assert settings["seeds"] == [0, 1] and settings["lora"] == lora_dir and "diffusers" in settings["versions"]
    assert settings["versions"]["diffusion_dpo_trainer"] == diffusion_dpo_trainer.__version__
    for reward in ("brightness", "redness"):
        entry = report["results"][prompts_file][reward]
        score = {(r["variant"], r["index"], r["seed"]): r["scores"][reward] for r in rows}
        for variant in ("base", "tuned"):
            mean = np.mean([score[(variant, i, s)] for i in range(3) for s in (0, 1)])
            assert entry[variant]["mean"] == pytest.approx(mean)
            low, high = entry[variant]["ci95"]
            assert low <= mean <= high and low < high
        wins = sum(score[("tuned", i, s)] > score[("base", i, s)] for i in range(3) for s in (0, 1))
        assert entry["win_rate"]["value"] == pytest.approx(wins / 6) and entry["win_rate"]["win"] == wins
        assert entry["num_prompts"] == 3 and entry["num_images_per_variant"] == 6
    # The saved images are the pipeline's own samples for (prompt, seed): base = adapter off, tuned = LoRA on.
    pipe = DiffusionPipeline.from_pretrained(sd_path)
    expected = sample_images(pipe, PROMPTS[1:2], [1], progress=False, num_inference_steps=2, guidance_scale=7.5,
                             height=32, width=32)[0]
    folder = tmp_path / "out" / "images" / protocol._slug(prompts_file)
    np.testing.assert_array_equal(np.asarray(expected), np.asarray(datasets.Image().decode_example(
        {"path": str(folder / "base" / "00001_1.png"), "bytes": None})))
    assert not np.array_equal(np.asarray(expected), np.asarray(datasets.Image().decode_example(
        {"path": str(folder / "tuned" / "00001_1.png"), "bytes": None})))


def test_identical_models_tie_exactly(tmp_path, sd_path, prompts_file):
    report = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out", reference=sd_path,
                               seeds=[0], **SAMPLING)
    entry = report["results"][prompts_file]["brightness"]
    assert entry["win_rate"] == {"value": 0.5, "ci95": [0.5, 0.5], "win": 0, "tie": 3, "loss": 0}
    assert entry["base"] == entry["tuned"]


def test_a_non_finite_reward_stops_the_evaluation_before_any_report(tmp_path, sd_path, prompts_file):
    """A NaN score would tie every comparison and land in report.json as bare NaN (invalid JSON): it is an error
    naming the reward, the image and its prompt, and no report is written."""
    def broken(images, prompts):
        return [float("nan") if p == PROMPTS[1] else 1.0 for p in prompts]

    with pytest.raises(ValueError, match=rf"'broken' returned nan for image 1 \(prompt '{PROMPTS[1]}'\)"):
        evaluate_protocol(sd_path, [prompts_file], [broken], tmp_path / "out", seeds=[0], **SAMPLING)
    assert not (tmp_path / "out" / "report.json").exists()


def test_summary_bootstraps_over_prompts_not_images():
    # Prompts score 0, 10 and 20 on each of 4 seeds: three clusters, not twelve independent images. Resampling the 3
    # prompts draws all-0 or all-20 with probability 1/27 > 2.5% each: the interval reaches both ends (over images,
    # 12 draws, it could not).
    rows = [{"set": "s", "variant": v, "index": i, "seed": s, "scores": {"r": 10.0 * i + (v == "tuned")}}
            for v in ("base", "tuned") for i in (0, 1, 2) for s in range(4)]
    entry = summarize(rows, ["r"])["s"]["r"]
    assert entry["base"]["mean"] == 10.0 and entry["tuned"]["mean"] == 11.0
    assert entry["base"]["ci95"] == [0.0, 20.0]
    assert entry["win_rate"]["value"] == 1.0 and entry["win_rate"]["win"] == 12


def test_a_fine_tuned_denoiser_is_compared_with_the_pipelines_own(tmp_path, sd_path, prompts_file):
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "tuned" / "unet")
    report = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out",
                               denoiser=str(tmp_path / "tuned"), **SAMPLING)
    entry = report["results"][prompts_file]["brightness"]
    plain = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "plain", **SAMPLING)
    assert entry["base"] == plain["results"][prompts_file]["brightness"]["base"]
    assert "tuned" not in plain["results"][prompts_file]["brightness"]
    assert entry["tuned"]["mean"] != entry["base"]["mean"]


# ---------------------------------------------------------------- resuming

def _close(a, b) -> bool:
    """Nested report dicts equal, numbers up to float rounding."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == pytest.approx(b, rel=1e-5)


def test_a_killed_evaluation_resumes_without_resampling(tmp_path, sd_path, lora_dir, prompts_file, monkeypatch):
    sampled = []
    real = protocol.iter_sample_batches

    def counting(pipe, prompts, seeds, *args, **kwargs):
        for batch in real(pipe, prompts, seeds, *args, **kwargs):
            sampled.extend(batch)
            yield batch

    monkeypatch.setattr(protocol, "iter_sample_batches", counting)
    calls = []

    def dies_on_third_batch(images, prompts):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while scoring its third batch
        return brightness(images, prompts)

    dies_on_third_batch.__name__ = "brightness"
    with pytest.raises(KeyboardInterrupt):
        evaluate_protocol(sd_path, [prompts_file], [dies_on_third_batch], tmp_path / "out", lora=lora_dir,
                          seeds=[0, 1], **SAMPLING)
    assert len((tmp_path / "out" / "scores.jsonl").read_text().splitlines()) == 4  # two batches of two
    assert not (tmp_path / "out" / "report.json").exists()
    sampled.clear()
    resumed = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out", lora=lora_dir, seeds=[0, 1],
                                **SAMPLING)
    assert len(sampled) == 12 - 4  # only what was missing
    fresh = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "fresh", lora=lora_dir, seeds=[0, 1],
                              **SAMPLING)
    assert _close(resumed["results"], fresh["results"])
    # A finished evaluation reruns without sampling anything; other settings are refused.
    sampled.clear()
    evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out", lora=lora_dir, seeds=[0, 1], **SAMPLING)
    assert sampled == []
    # A kill in the middle of writing a line: the broken line is dropped, its item redone, the file repaired.
    scores_file = tmp_path / "out" / "scores.jsonl"
    text = scores_file.read_text()
    scores_file.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:20])
    again = evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out", lora=lora_dir, seeds=[0, 1],
                              **SAMPLING)
    # The redone image was sampled alone instead of in a batch of two: equal up to float rounding.
    assert len(sampled) == 1 and _close(again["results"], fresh["results"])
    assert [json.loads(line) for line in scores_file.read_text().splitlines()]  # every line parses again
    with pytest.raises(ValueError, match=r"other settings \(seeds\)"):
        evaluate_protocol(sd_path, [prompts_file], [brightness], tmp_path / "out", lora=lora_dir, seeds=[0, 2],
                          **SAMPLING)


# ---------------------------------------------------------------- report.html and the CLI

class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.cells.append(data.strip())


def test_html_report_shows_the_table_and_embedded_image_pairs(tmp_path, sd_path, lora_dir, prompts_file):
    evaluate_protocol(sd_path, [prompts_file], [brightness, redness], tmp_path / "out", lora=lora_dir,
                      num_html_samples=2, **SAMPLING)
    page = _Collector()
    page.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 2 * 2 and all(a["src"].startswith("data:image/png;base64,") for a in images)
    assert [a["alt"] for a in images] == ["base", "tuned", "base", "tuned"]
    rows = [tag for tag, _ in page.tags if tag == "tr"]
    assert len(rows) == 1 + 2  # header + one row per (set, reward)
    assert "brightness" in page.cells and "redness" in page.cells and any("a red square" in c for c in page.cells)


def test_evaluate_command_runs_the_protocol(tmp_path, sd_path, lora_dir, prompts_file, monkeypatch, capsys):
    module = type(sys)("my_rewards")
    module.brightness = brightness
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    code = cli.main(["evaluate", "--model", sd_path, "--lora", lora_dir, "--prompt_set", prompts_file, "--rewards",
                     "my_rewards:brightness", "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "2",
                     "--resolution", "32", "--seeds", "0", "1", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["sampling"]["guidance_scale"] == 7.5
    assert report["settings"]["dtype"] == "float32"
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["reward"] == "my_rewards:brightness" and lines[-1].endswith("report.html")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", sd_path, "--lora", lora_dir, "--prompt_set", prompts_file])
    assert exit_info.value.code == 2 and "--output_dir" in capsys.readouterr().err
