"""The `train` command's flag parser: every `DiffusionDPOConfig` field (and so every `TrainingArguments` field) is a
flag, parsed by TRL's `TrlParser`. Apart from the command's light module, since it imports transformers (and torch):
`cli.py` loads it only when `train` runs."""

import dataclasses
import re
import typing

from transformers import TrainingArguments
from trl import TrlParser

from .config import DiffusionDPOConfig


class DiffusionDPOParser(TrlParser):
    """`TrlParser` that lists our own fields before the (long) inherited `TrainingArguments` in `--help`, keeps plain
    defaults of list-typed fields, and accepts a bare `%` in help texts (argparse would crash on `--help`)."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        # HfArgumentParser drops the plain (non-factory) default of a list-typed field such as `loss_type: str |
        # list[str] = "sigmoid"`, which would reach the config as None. (Empty defaults, like `debug=""`, mean None.)
        for dtype in self.dataclass_types:
            for config_field in dataclasses.fields(dtype):
                default = config_field.default
                missing = self.get_default(config_field.name) is None
                if config_field.init and default is not dataclasses.MISSING and default and missing:
                    self.set_defaults(**{config_field.name: default})
        for action in self._actions:
            if action.help:
                action.help = re.sub(r"(?<!%)%(?![%(])", "%%", action.help)

    def _add_dataclass_arguments(self, dtype):
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        own_fields, inherited_fields = split_config_fields(dtype)
        for title, fields in (
            (f"{dtype.__name__} options", own_fields),
            ("transformers.TrainingArguments options (https://huggingface.co/docs/transformers/main_classes/trainer)",
             inherited_fields),
        ):
            group = self.add_argument_group(title)
            for config_field in fields:
                config_field.type = hints[config_field.name]
                self._parse_dataclass_field(group, config_field)


def split_config_fields(dtype=DiffusionDPOConfig) -> tuple[list[dataclasses.Field], list[dataclasses.Field]]:
    """`dtype`'s init fields in two lists: those it adds to `TrainingArguments`, and the inherited ones."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    fields = [f for f in dataclasses.fields(dtype) if f.init]
    return [f for f in fields if f.name not in inherited], [f for f in fields if f.name in inherited]
