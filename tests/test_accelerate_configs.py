"""The shipped `accelerate launch` configs load with accelerate's own config loader and say what their names say."""

import os

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, prepare_multi_gpu_env
from diffusers import UNet2DConditionModel

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
CONFIG_DIR = os.path.join(EXAMPLES_DIR, "accelerate")
RECIPE = "examples/sdxl_full_pickapic.yaml"  # the paper's full fine-tune, as the docs launch it


@pytest.mark.parametrize(
    "name, distributed_type, zero_stage",
    [
        ("ddp", DistributedType.MULTI_GPU, None),
        ("fsdp", DistributedType.FSDP, None),
        ("deepspeed_zero2", DistributedType.DEEPSPEED, 2),
        ("deepspeed_zero3", DistributedType.DEEPSPEED, 3),
    ],
)
def test_config_loads_with_accelerate(name, distributed_type, zero_stage):
    # The loader rejects unknown keys, so a typo in a field name fails here rather than at launch.
    config = load_config_from_file(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage


def test_fsdp_wraps_a_block_class_the_unet_has(sd_path):
    config = load_config_from_file(os.path.join(CONFIG_DIR, "fsdp.yaml"))
    wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    present = {type(module).__name__ for module in unet.modules()}
    assert set(wrapped) <= present, (wrapped, sorted(present))


def test_multi_node_config_launches_2_machines_of_8_at_the_papers_batch():
    """examples/accelerate/multi_node.yaml with examples/sdxl_full_pickapic.yaml: launched on the second machine, it
    starts 8 local processes as node 1 of 2 that meet machine 0 at main_process_ip:port, and the recipe's batch then
    adds up to the paper's 2048 pairs per optimizer step in the recipe's precision."""
    path = os.path.join(CONFIG_DIR, "multi_node.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "--machine_rank", "1", "-m",
                                               "diffusion_dpo_trainer", "train", "--config", RECIPE])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "static"

    config = load_config_from_file(path)
    recipe = yaml.safe_load(open(os.path.join(EXAMPLES_DIR, os.path.basename(RECIPE))))
    assert config.distributed_type == DistributedType.MULTI_GPU and not config.use_cpu
    assert config.num_processes * recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] == 2048
    assert config.mixed_precision == "fp16" and recipe["fp16"]  # accelerate's precision is the recipe's
