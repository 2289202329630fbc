"""Other libraries' messages that a user of this package can neither act on nor avoid, filtered out by their exact
text at the logger that emits them (nothing else from those loggers, and nothing of ours, is touched).

Each was seen on import in this package's environment (`diffusion-dpo train ...` printed all of them before its first
line of output):

- torchao's C++ extensions built for another torch fail to load; the kernels this package uses do not need them.
- torch's pytree deprecation of `register_constant` on Enums, called by torchao's own code.
- bitsandbytes on CPU looks for an optional kernel on the Hub (offline: a trust-check notice and a failure).
- diffusers cannot register torchao's tensor types for pickle loading; this package loads safetensors only.
"""

import logging
import re

#: logger name -> the messages (regular expressions, matched at the start) dropped from it.
NOISE = {
    "torchao": [r"Failed to load \S*torchao\S*\.so: "],
    "torch.utils._pytree": [r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile"],
    "kernels._internals.hf_hub": [r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"],
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
    "diffusers.quantizers.torchao.torchao_quantizer": [r"Unable to import `torchao` Tensor objects"],
}


class DropMessages(logging.Filter):
    """Drops the records whose message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def install() -> None:
    """Attach the filters (once) to their loggers; run before the libraries are imported, since most of these
    messages come at import time."""
    for name, patterns in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
