"""Our trainer against the published diffusers Diffusion-DPO LoRA script (the "peer"), side by side.

Both train the same pipeline on disk on the same Pick-a-Pic-layout parquet dataset, with the same batch, resolution,
LoRA (rank 4, alpha 4, gaussian init, to_q/k/v/out.0), AdamW and gradient clipping, each in its own process; the runs
alternate (peer, then each of our configurations) for several rounds, so load from other jobs hits all alike. Step
times come from per-step timestamps (the end of every optimizer step), start-up and the first `--warmup` steps
excluded; the per-step breakdown (VAE encode, text encode, policy forward, policy backward, reference forward,
optimizer, other) is measured from outside by `benchmarks/probe/sitecustomize.py`, which wraps the modules' methods at
class level: the peer's code is run as shipped.

    python benchmarks/bench_peer.py --peer ../shared/peer --model sd15 --resolution 256 --batch 1 --steps 8 \
        --rounds 3 --json peer_sd15.json --markdown peer_sd15.md

See benchmarks/README.md and docs/performance.md.
"""

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROBE = os.path.join(HERE, "probe")
CATEGORIES = ("vae_encode", "text_encode", "policy_forward", "policy_backward", "reference_forward", "optimizer")
#: Our configurations: DiffusionDPOConfig overrides on top of the settings shared with the peer.
CONFIGS = {
    "off": {},
    "cache": {"precompute_latents": True, "precompute_text_embeddings": True},
    "cache+ref": {"precompute_latents": True, "precompute_text_embeddings": True, "precompute_ref_errors": True},
    "cache+ref+compile": {"precompute_latents": True, "precompute_text_embeddings": True,
                          "precompute_ref_errors": True, "torch_compile": True},
}
PEER = "peer"
#: The pre-passes our trainer runs before training, by the module that calls them.
PRE_PASSES = {"caching": ("precompute_latents", "precompute_prompt_embeddings"),
              "trainer": ("precompute_reference_errors",)}
LEARNING_RATE, BETA, RANK = 1e-4, 2500, 4  # the peer's run.sh learning rate and its default beta_dpo


# ----- the shared inputs -----------------------------------------------------------------------------------------------
def build_pipeline(model: str, path: str) -> str:
    """The pipeline both trainers load. sd15: every component at its real size with random weights: the UNet from
    bench_step.py's public config, the VAE of stable-diffusion-v1-5 (vae/config.json), a CLIP ViT-L/14 text encoder
    (text_encoder/config.json) over the small test tokenizer (the vocabulary size is kept at 49408)."""
    import torch

    if model == "tiny":
        from diffusion_dpo_trainer.testing import make_sd_pipeline

        return str(make_sd_pipeline(path))
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench_step import SD15_UNET, SD_SCHEDULE
    from diffusion_dpo_trainer.testing import write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(os.path.join(path + "-tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDPMScheduler(**SD_SCHEDULE, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def write_pickapic(path: str, rows: int, resolution: int) -> str:
    """train.parquet with Pick-a-Pic's columns (caption, jpg_0, jpg_1 as JPEG bytes, label_0 in {0, 1}: no ties, so
    both trainers see the same pairs); images a little larger than `resolution`, so both resize and crop."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = int(resolution * 1.25), int(resolution * 1.5)

    def jpeg():
        base = rng.integers(0, 256, 3)
        ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(-128, 128, 3)
        pixels = np.clip(base + ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    if os.path.isfile(os.path.join(path, "train.parquet")):  # written by an earlier run in this --workdir
        return path
    os.makedirs(path, exist_ok=True)
    datasets.Dataset.from_dict({
        "caption": [f"a photo of a red square number {i}" for i in range(rows)],
        "jpg_0": [jpeg() for _ in range(rows)], "jpg_1": [jpeg() for _ in range(rows)],
        "label_0": [float(i % 2) for i in range(rows)],
    }).to_parquet(os.path.join(path, "train.parquet"))
    return path


# ----- one run each -------------------------------------------------------------------------------------------------
def peer_command(peer: str, pipe: str, data: str, opts, out: str, steps: int) -> list[str]:
    return ["bash", os.path.join(peer, "run.sh"), pipe, data, str(steps), out, "--resolution",
            str(opts.resolution), "--train_batch_size", str(opts.batch), "--rank", str(RANK), "--learning_rate",
            str(LEARNING_RATE), "--beta_dpo", str(BETA)]


def ours_command(config: str, pipe: str, data: str, opts, out: str, steps: int) -> list[str]:
    child = {"config": config, "pipe": pipe, "data": data, "out": out, "steps": steps,
             "resolution": opts.resolution, "batch": opts.batch}
    return [sys.executable, os.path.abspath(__file__), "--child", json.dumps(child)]


def run_ours(child: dict) -> None:
    """One training run of DiffusionDPOTrainer with the peer's settings (inside the probed child process)."""
    import datasets
    import torch
    from peft import LoraConfig
    from sitecustomize import phase  # the probe

    from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer, caching, trainer

    for module, names in PRE_PASSES.items():  # time the pre-passes the trainer runs before training
        module = {"caching": caching, "trainer": trainer}[module]
        for name in names:
            def timed(*args, _function=getattr(module, name), _name=name, **kwargs):
                with phase(_name):
                    return _function(*args, **kwargs)

            setattr(module, name, timed)
    args = DiffusionDPOConfig(
        output_dir=child["out"], resolution=child["resolution"], per_device_train_batch_size=child["batch"],
        max_steps=child["steps"], learning_rate=LEARNING_RATE, beta=BETA, random_flip=True, seed=0,
        report_to="none", save_strategy="no", dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(),
        **CONFIGS[child["config"]],
    )
    lora = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                      target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    data = datasets.load_dataset(child["data"], split="train")
    DiffusionDPOTrainer(model=child["pipe"], args=args, train_dataset=data, peft_config=lora).train()


def run_probed(command: list[str], probe_out: str, env: dict) -> dict:
    """Run one training process; the probe's record plus the whole run's wall and CPU seconds (user + system of the
    process and any children it waited for, from `getrusage(RUSAGE_CHILDREN)`), kept in the probe's file."""
    env = {**env, "BENCH_PROBE_OUT": probe_out}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(probe_out) as f:
        probe = json.load(f)
    probe["wall_s"] = wall
    probe["run_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(probe_out, "w") as f:
        json.dump(probe, f)
    return probe


def summarize(probe: dict, warmup: int, clock: str) -> dict:
    """Median step time over the measured steps and the mean per-step breakdown (steps = intervals between the ends
    of consecutive optimizer steps; the first `warmup` intervals are skipped), in wall-clock or CPU seconds."""
    ends = probe["step_ends"]
    clock_ends = ends if clock == "wall" else probe["step_cpu"]
    intervals = list(zip(ends[:-1], ends[1:], clock_ends[:-1], clock_ends[1:]))[warmup:]
    if not intervals:
        sys.exit("Not enough steps: raise --steps above --warmup + 1.")
    kernel = {key: [b - a for a, b in zip(probe[key][:-1], probe[key][1:])][warmup:]
              for key in ("step_sys", "step_faults") if key in probe}  # older probe files lack them
    steps, wall, breakdown = [], [], {name: [] for name in (*CATEGORIES, "other")}
    for start, end, clock_start, clock_end in intervals:
        spent = {name: 0.0 for name in CATEGORIES}
        for name, t0, t1, cpu in probe["events"]:
            if start < t1 <= end:
                spent[name] += t1 - t0 if clock == "wall" else cpu
        steps.append(clock_end - clock_start)
        wall.append(end - start)
        for name in CATEGORIES:
            breakdown[name].append(spent[name])
        breakdown["other"].append(steps[-1] - sum(spent.values()))
    phases = {}
    for name, t0, t1, cpu in probe["phases"]:
        phases[name] = phases.get(name, 0.0) + (t1 - t0 if clock == "wall" else cpu)
    return {"step_s": statistics.median(steps), "steps_s": steps, "wall_step_s": statistics.median(wall),
            "breakdown_s": {name: statistics.fmean(values) for name, values in breakdown.items()},
            "sys_step_s": statistics.median(kernel["step_sys"]) if kernel else None,
            "page_faults_per_step": statistics.median(kernel["step_faults"]) if kernel else None,
            "pre_pass_s": phases, "peak_rss_gib": probe["peak_rss_gib"], "wall_s": probe["wall_s"],
            "torch_threads": probe["torch_threads"]}


# ----- the comparison -----------------------------------------------------------------------------------------------
def compare(opts) -> dict:
    from bench_step import machine

    workdir = opts.workdir or tempfile.mkdtemp(prefix="bench-peer-")
    pipe = os.path.join(workdir, f"pipe-{opts.model}")
    if not os.path.isdir(pipe):
        build_pipeline(opts.model, pipe)
    rows = opts.batch * (opts.steps + 1)  # one epoch covers the run
    data = write_pickapic(os.path.join(workdir, f"data-{opts.resolution}-{rows}"), rows, opts.resolution)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PROBE, ROOT]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": os.path.join(workdir, "datasets-cache"), "WANDB_DISABLED": "true"}
    if opts.short_steps is not None:
        return {"config": {k: v for k, v in vars(opts).items() if k not in ("json", "markdown")}, "rows": rows,
                "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                **compare_difference(opts, workdir, pipe, data, env)}
    runs = {name: [] for name in opts.configs}
    for round_ in range(opts.rounds):
        for name in runs:
            out = os.path.join(workdir, "out", f"{name}-{round_}")
            command = (peer_command(opts.peer, pipe, data, opts, out, opts.steps) if name == PEER
                       else ours_command(name, pipe, data, opts, out, opts.steps))
            probe_out = os.path.join(workdir, f"probe-{name}-{round_}.json")
            if opts.reuse and os.path.isfile(probe_out):
                with open(probe_out) as f:
                    probe = {**json.load(f), "wall_s": None}
            else:
                probe = run_probed(command, probe_out, env)
            result = summarize(probe, opts.warmup, opts.clock)
            runs[name].append(result)
            print(f"round {round_} {name}: {result['step_s']:.3f} s/step "
                  f"(pre-passes {json.dumps({k: round(v, 2) for k, v in result['pre_pass_s'].items()})})",
                  file=sys.stderr, flush=True)
    summary = {}
    peer_steps = [r["step_s"] for r in runs.get(PEER, [])]
    for name, results in runs.items():
        steps = [r["step_s"] for r in results]
        entry = {"step_s": statistics.median(steps), "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
                 "wall_step_s": statistics.median(r["wall_step_s"] for r in results),
                 **{key: statistics.median(r[key] for r in results) if None not in [r.get(key) for r in results]
                    else None for key in ("sys_step_s", "page_faults_per_step")},
                 "breakdown_s": {k: statistics.median(r["breakdown_s"][k] for r in results)
                                 for k in results[0]["breakdown_s"]}}
        if name != PEER and peer_steps:
            entry["paired_ratio"] = statistics.median(s / p for s, p in zip(steps, peer_steps))
            entry["ratio_of_medians"] = entry["step_s"] / statistics.median(peer_steps)
            # Each pre-pass ran cold once (the first run that needed it); later runs found it in the datasets cache:
            # its cost is the longest time measured for it.
            cold = {k: max(r["pre_pass_s"].get(k, 0.0) for rs in runs.values() for r in rs) for k in
                    results[0]["pre_pass_s"]}
            entry["pre_pass_cold_s"] = cold
            entry["pre_pass_warm_s"] = results[-1]["pre_pass_s"] if len(results) > 1 else None
            per_step = {k: v / rows * opts.batch for k, v in cold.items()}  # one epoch: one visit per pair
            ref = per_step.get("precompute_reference_errors", 0.0)
            everything = sum(per_step.values())
            for runs_sharing in (1, 4):
                entry[f"with_ref_pre_pass_{runs_sharing}_runs_ratio"] = (
                    (entry["step_s"] + ref / runs_sharing) / statistics.median(peer_steps))
                entry[f"with_all_pre_passes_{runs_sharing}_runs_ratio"] = (
                    (entry["step_s"] + everything / runs_sharing) / statistics.median(peer_steps))
        summary[name] = entry
    return {"config": {k: v for k, v in vars(opts).items() if k not in ("json", "markdown")}, "rows": rows,
            "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "summary": summary,
            "runs": runs}


def compare_difference(opts, workdir: str, pipe: str, data: str, env: dict) -> dict:
    """Seconds per step as (a `--steps` run - a `--short-steps` run) / the difference in steps, for each configuration,
    from the whole process's CPU (or wall) seconds: everything a step costs counts, whether or not the probe times it,
    and start-up and the final save cancel. Both runs read the same dataset and each has its own `datasets` cache, so
    our pre-passes run cold in both: the same work, whose measured cost still varies by a few %, so each run's own
    pre-pass seconds are taken out (the plain difference is kept as `raw_step_s`). Within a round the short runs of
    all configurations alternate, then the long runs."""
    key = "run_cpu_s" if opts.clock == "cpu" else "wall_s"
    runs = {name: [] for name in opts.configs}
    for round_ in range(opts.rounds):
        probes = {name: {} for name in runs}
        for steps in (opts.short_steps, opts.steps):
            for name in runs:
                tag = f"{name}-{steps}steps-{round_}"
                out = os.path.join(workdir, "out", tag)
                command = (peer_command(opts.peer, pipe, data, opts, out, steps) if name == PEER
                           else ours_command(name, pipe, data, opts, out, steps))
                probe_out = os.path.join(workdir, f"probe-{tag}.json")
                if opts.reuse and os.path.isfile(probe_out):
                    with open(probe_out) as f:
                        probe = json.load(f)
                else:
                    run_env = {**env, "HF_DATASETS_CACHE": os.path.join(workdir, f"datasets-cache-{tag}")}
                    probe = run_probed(command, probe_out, run_env)
                probes[name][steps] = probe
                print(f"round {round_} {name}, {steps} steps: {probe[key]:.1f} s", file=sys.stderr, flush=True)
        for name, by_steps in probes.items():
            short, long = by_steps[opts.short_steps], by_steps[opts.steps]
            phases, pre_pass = {}, {}
            for steps, probe in by_steps.items():
                for phase, t0, t1, cpu_s in probe["phases"]:
                    pre_pass[steps] = pre_pass.get(steps, 0.0) + (cpu_s if opts.clock == "cpu" else t1 - t0)
                    if probe is long:
                        phases[phase] = phases.get(phase, 0.0) + cpu_s
            steps = opts.steps - opts.short_steps
            runs[name].append({
                "step_s": ((long[key] - pre_pass.get(opts.steps, 0.0))
                           - (short[key] - pre_pass.get(opts.short_steps, 0.0))) / steps,
                "raw_step_s": (long[key] - short[key]) / steps,
                "short_run_s": short[key], "long_run_s": long[key], "pre_pass_cpu_s": phases,
                "probe_breakdown_s": summarize(long, opts.warmup, opts.clock)["breakdown_s"],
                "peak_rss_gib": long["peak_rss_gib"],
            })
    summary = {}
    peer_steps = [r["step_s"] for r in runs.get(PEER, [])]
    for name, results in runs.items():
        steps = [r["step_s"] for r in results]
        entry = {"step_s": statistics.median(steps),
                 "raw_step_s": statistics.median(r["raw_step_s"] for r in results),
                 "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
                 "pre_pass_cpu_s": results[-1]["pre_pass_cpu_s"],
                 "probe_breakdown_s": {k: statistics.median(r["probe_breakdown_s"][k] for r in results)
                                       for k in results[0]["probe_breakdown_s"]}}
        if name != PEER and peer_steps:
            entry["paired_ratio"] = statistics.median(s / p for s, p in zip(steps, peer_steps))
            entry["raw_paired_ratio"] = statistics.median(
                r["raw_step_s"] / p["raw_step_s"] for r, p in zip(results, runs[PEER]))
        summary[name] = entry
    return {"method": "difference", "summary": summary, "runs": runs}


def markdown_difference(result: dict) -> str:
    c = result["config"]
    lines = [(f"{c['model']}, {c['resolution']} px, {c['batch']} pair(s)/step, LoRA r{RANK}, {c['rounds']} round(s), "
              f"{c['clock']} seconds per step = ({c['steps']}-step run - {c['short_steps']}-step run) / "
              f"{c['steps'] - c['short_steps']}, OMP_NUM_THREADS={result['omp_num_threads']}\n"),
             ("| run | s/step | ratio to the peer | plain difference: s/step, ratio | short run s | long run s | "
              "pre-passes (CPU s, cold, long run) | ") + " | ".join(CATEGORIES)
             + " | other (probe, long run) | peak RSS |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(CATEGORIES) + 2)]
    for name, e in result["summary"].items():
        ratio = f"**{e['paired_ratio']:.3f}**" if "paired_ratio" in e else "1"
        raw = f"{e['raw_step_s']:.2f}, " + (f"{e['raw_paired_ratio']:.3f}" if "raw_paired_ratio" in e else "1")
        runs = result["runs"][name]
        short = ", ".join(f"{r['short_run_s']:.1f}" for r in runs)
        long = ", ".join(f"{r['long_run_s']:.1f}" for r in runs)
        pre = ", ".join(f"{k} {v:.1f}" for k, v in e["pre_pass_cpu_s"].items()) or "-"
        parts = " | ".join(f"{e['probe_breakdown_s'][k]:.2f}" for k in (*CATEGORIES, "other"))
        lines.append(f"| {name} | {e['step_s']:.2f} | {ratio} | {raw} | {short} | {long} | {pre} | {parts} | "
                     f"{e['peak_rss_gib']:.2f} GiB |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    if result.get("method") == "difference":
        return markdown_difference(result)
    c = result["config"]
    lines = [f"{c['model']}, {c['resolution']} px, {c['batch']} pair(s)/step, LoRA r{RANK}, {c['rounds']} rounds x "
             f"{c['steps']} steps ({c['warmup']} warm-up), OMP_NUM_THREADS={result['omp_num_threads']}, "
             f"{c['clock']} seconds\n",
             "| run | s/step (median) | wall s/step | paired ratio | + ref pre-pass, 1 run / 4 runs | + all pre-passes, 1 run / 4 "
             "runs | " + " | ".join(CATEGORIES) + " | other | system s/step | page faults/step | peak RSS |",
             "|---|---|---|---|---|---|" + "---|" * (len(CATEGORIES) + 4)]
    for name, e in result["summary"].items():
        if "paired_ratio" not in e:
            ratios = "- | - | -"
        else:
            ref = ("-" if "precompute_reference_errors" not in e["pre_pass_cold_s"] else
                   f"{e['with_ref_pre_pass_1_runs_ratio']:.3f} / {e['with_ref_pre_pass_4_runs_ratio']:.3f}")
            every = ("-" if not e["pre_pass_cold_s"] else
                     f"{e['with_all_pre_passes_1_runs_ratio']:.3f} / {e['with_all_pre_passes_4_runs_ratio']:.3f}")
            ratios = f"**{e['paired_ratio']:.3f}** | {ref} | {every}"
        parts = " | ".join(f"{e['breakdown_s'][k]:.3f}" for k in (*CATEGORIES, "other"))
        kernel = ("- | -" if e.get("sys_step_s") is None else
                  f"{e['sys_step_s']:.3f} | {e['page_faults_per_step']:.0f}")
        lines.append(f"| {name} | {e['step_s']:.3f} | {e['wall_step_s']:.3f} | {ratios} | {parts} | {kernel} | "
                     f"{e['peak_rss_gib']:.2f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--peer", default=os.path.join(ROOT, "..", "shared", "peer"),
                        help="the peer's folder (holds run.sh); default ../shared/peer from the repository root")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--short-steps", type=int,
                        help="measure each configuration by two runs, of --short-steps and of --steps optimizer steps: "
                             "s/step = the difference of their whole-process seconds / the difference in steps")
    parser.add_argument("--warmup", type=int, default=2,
                        help="step intervals skipped at the start of each run (the probe's per-step figures)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of all runs")
    parser.add_argument("--configs", nargs="+", choices=(PEER, *CONFIGS), default=[PEER, "off", "cache", "cache+ref"],
                        help="the runs of each round, in order (peer: the published script)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                        help="cpu: the process's CPU seconds (the work, robust on a machine shared with other jobs; "
                             "use with OMP_NUM_THREADS=1); wall: elapsed seconds")
    parser.add_argument("--workdir", help="keep the pipeline, data and caches here (default: a new temp folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the runs already measured in --workdir (resume an interrupted comparison)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    opts = parser.parse_args(argv)
    if opts.child:
        return run_ours(json.loads(opts.child))
    if opts.short_steps is not None and not 0 < opts.short_steps < opts.steps:
        parser.error(f"--short-steps must be between 1 and --steps - 1 ({opts.steps - 1}), got {opts.short_steps}")
    if not os.path.isfile(os.path.join(opts.peer, "run.sh")):
        sys.exit(f"No run.sh in {opts.peer}: pass --peer with the peer's folder.")
    sys.path.insert(0, ROOT)
    result = compare(opts)
    table = markdown(result)
    print(table)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    if opts.markdown:
        with open(opts.markdown, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
