"""Reward reached: the images sampled and CPU seconds each of two on-policy runs needs to reach the other's final
training reward (docs/nft.md, NFT against GRPO), from the `--log-dir` files of benchmarks/digits_sweep.py.

    python benchmarks/reward_reached.py logs/grpo.json:1 logs/nft.json:5

Each argument is a log file and the optimizer steps per rollout (the sweep's `online_iterations`: 1 means fresh samples
every step). The reward is the logged `reward`, the mean reward-model score of the images sampled in each logging
window; a run "reaches" a value at the first logged window whose reward is at least that. Images are counted by
rollouts started by then; CPU seconds are the logged `cpu_s` where the run has it (NFT), else the run's
`train_cpu_s` pro rata of its steps (every step of a run costs alike).
"""

import argparse
import json
import math


def load(spec: str) -> dict:
    path, _, every = spec.rpartition(":")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    logs = [h for h in run["log_history"] if "reward" in h]
    steps = logs[-1]["step"]
    per_rollout = run["images_sampled"] / math.ceil(steps / int(every))
    return {"name": path, "logs": logs, "steps": steps, "every": int(every), "per_rollout": per_rollout, "run": run}


def reached(run: dict, target: float) -> dict | None:
    hit = next((h for h in run["logs"] if h["reward"] >= target), None)
    if hit is None:
        return None
    cpu = hit.get("cpu_s", run["run"]["train_cpu_s"] * hit["step"] / run["steps"])
    return {"step": hit["step"], "reward": round(hit["reward"], 3),
            "images": round(math.ceil(hit["step"] / run["every"]) * run["per_rollout"]), "cpu_s": round(cpu, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=2, metavar="LOG:STEPS_PER_ROLLOUT")
    runs = [load(spec) for spec in parser.parse_args(argv).runs]
    rows = []
    for target, chaser in (runs, runs[::-1]):
        final = target["logs"][-1]["reward"]
        rows.append({"target": target["name"], "final_reward": round(final, 3), "final_step": target["steps"],
                     "target_images": target["run"]["images_sampled"],
                     "target_train_cpu_s": target["run"]["train_cpu_s"],
                     "chaser": chaser["name"], "reached": reached(chaser, final),
                     "chaser_best": round(max(h["reward"] for h in chaser["logs"]), 3)})
        print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
