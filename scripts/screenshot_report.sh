#!/usr/bin/env bash
# Render an evaluation report.html in headless Chromium and save a screenshot, to check the page a user opens.
#
#   bash scripts/screenshot_report.sh [REPORT_DIR] [OUT.png]
#
# Without REPORT_DIR, a demo report is built first (tiny random SD pipeline and LoRA from
# diffusion_dpo_trainer.testing, three prompts, two brightness/redness rewards; no download).
# Needs Chromium (Debian: `apt-get update && apt-get install -y chromium`); CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
REPORT_DIR="${1:-}"
OUT="$(realpath -m "${2:-report-screenshot.png}")"
if [ -z "$REPORT_DIR" ]; then
  REPORT_DIR="$(mktemp -d)/report"
  python - "$REPORT_DIR" <<'PY'
import sys, tempfile

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusion_dpo_trainer.protocol import evaluate_protocol
from diffusion_dpo_trainer.testing import make_sd_pipeline

def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]

def redness(images, prompts):
    return [float(np.asarray(im, dtype=np.float64)[..., 0].mean()) for im in images]

scratch = tempfile.mkdtemp()
sd = make_sd_pipeline(f"{scratch}/sd", sample_size=64)
pipe = DiffusionPipeline.from_pretrained(sd)
pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
with torch.no_grad():
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.3)
pipe.save_lora_weights(f"{scratch}/lora",
                       unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
sets = {"demo": ["a red square", "a blue circle", "a cat on a dog", "a painting of a photo"]}
evaluate_protocol(sd, sets, [brightness, redness], sys.argv[1], lora=f"{scratch}/lora", seeds=[0, 1, 2],
                  num_inference_steps=4, resolution=64, progress=False)
PY
fi
CHROMIUM="$(command -v chromium || command -v chromium-browser || command -v google-chrome)"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1100 \
  --screenshot="$OUT" "file://$(realpath "$REPORT_DIR")/report.html" 2>/dev/null
echo "screenshot of $REPORT_DIR/report.html: $OUT"
