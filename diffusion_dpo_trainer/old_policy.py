"""DiffusionNFT's old policy: an exponential moving average of the policy whose decay grows with the step.

The old policy defines NFT's implicit positive and negative policies (losses.nft_loss); it starts equal to the policy
and, after each round of sampling and training, moves towards it as old <- decay * old + (1 - decay) * policy with
decay = 0 before `flat` steps, then min((step - flat) * uprate, uphold). A decay of 0 makes it a copy of the policy
(it then lags one round), a growing decay makes it an ever slower anchor. Source: NVlabs/DiffusionNFT
scripts/train_nft_sd3.py:169-189 (`return_decay`) and 1034-1039 (the update, once per epoch, with `global_step` the
number of optimizer steps so far), at 24af555.
"""

from collections.abc import Iterable

import torch

# The official `decay_type` presets: (flat, uprate, uphold). 1 is the default of config/nft.py; 2 is its OCR recipe.
NFT_DECAY_PRESETS = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def nft_ema_decay(step: int, flat: int = 0, uprate: float = 0.001, uphold: float = 0.5) -> float:
    """The old policy's decay after `step` optimizer steps: 0 while step < flat, then min((step - flat) * uprate,
    uphold)."""
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@torch.no_grad()
def ema_update_(old_parameters: Iterable[torch.Tensor], parameters: Iterable[torch.Tensor], decay: float) -> None:
    """old <- old * decay + new * (1 - decay), in place, parameter by parameter (strictly paired)."""
    for old, new in zip(old_parameters, parameters, strict=True):
        if old is new:
            raise ValueError("the old policy shares a tensor with the policy: give it its own copy (adapter).")
        old.copy_(old * decay + new.detach() * (1.0 - decay))
