"""The command's first second: `--version` and every `--help` that needs no model answer without importing torch,
diffusers or transformers, and no command prints other libraries' import messages that the user cannot act on."""

import logging
import os
import subprocess
import sys

import pytest

from diffusion_dpo_trainer import quiet

HEAVY = {"torch", "diffusers", "transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes", "torchao"}


def run_command(*argv: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "diffusion_dpo_trainer", *argv], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["build-pairs", "--help"], ["evaluate", "--help"],
                                  ["serve-reward", "--help"]])
def test_version_and_help_import_no_heavy_library_and_print_only_their_answer(argv):
    result = run_command(*argv, importtime=True)
    assert result.returncode == 0
    assert ("diffusion-dpo 0.1.0" if argv == ["--version"] else "usage: diffusion-dpo") in result.stdout
    lines = result.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert not imported & HEAVY, sorted(imported & HEAVY)
    assert [line for line in lines if not line.startswith("import time:")] == []  # no other output at all


def test_train_help_prints_no_upstream_noise():
    """`train --help` needs TrainingArguments, so transformers, peft, bitsandbytes and torchao are imported: in this
    environment they print seven lines (torchao's .so loads, torch's pytree deprecation, bitsandbytes' kernel hub)."""
    result = run_command("train", "--help")
    assert result.returncode == 0 and "--model_name_or_path" in result.stdout
    assert result.stderr == ""


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


SO = "/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
# (logger, a message it really prints that is filtered, another message of the same logger that must still show)
CASES = [
    ("torchao", f"Failed to load {SO}: Could not load this library: {SO}",
     "Skipping import of cpp extensions due to incompatible torch version. Please upgrade to torch >= 2.11.0"),
    ("torch.utils._pytree", ("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                             "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses "
                             "is deprecated"),
     "pytree: something else about Enum subclasses"),
    ("kernels._internals.hf_hub", ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                   "because Hugging Face Hub is in offline mode."),
     "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode."),
    ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
                                       "'kernels-community/quantization-bitsandbytes' is not available in the local "
                                       "cache"),
     "Failed to load the CUDA library"),
    ("diffusers.quantizers.torchao.torchao_quantizer", ("Unable to import `torchao` Tensor objects. This may affect "
                                                        "loading checkpoints serialized with `torchao`"),
     "torchao quantization needs torch >= 2.5"),
]


@pytest.mark.parametrize("name, noise, kept", CASES, ids=[c[0] for c in CASES])
def test_exactly_the_upstream_noise_is_filtered(name, noise, kept):
    quiet.install()  # done on import of the package; a second call adds nothing
    logger, handler = logging.getLogger(name), Collect()
    assert sum(isinstance(f, quiet.DropMessages) for f in logger.filters) == 1
    logger.addHandler(handler)
    try:
        logger.warning(noise)
        logger.warning(kept)
        logger.warning("%s", "a message of our own, through the same logger")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == [kept, "a message of our own, through the same logger"]
