"""Tiny builders keyed by pipeline class name: the family conformance suite builds every registered family with one."""

from collections.abc import Callable

#: Pipeline class name -> `builder(path, sample_size=32, seed=0) -> str` (the saved pipeline's path).
TINY_BUILDERS: dict[str, Callable[..., str]] = {}
#: Pipeline class name -> `make(n, size) -> datasets.Dataset` of preference pairs the family trains on, where the
#: default (`make_preference_dataset`: images) does not fit (e.g. videos).
TINY_DATA: dict[str, Callable] = {}
#: Pipeline class name -> extra keyword arguments for a pipeline call in tests (e.g. a small `num_frames`).
TINY_CALL_KWARGS: dict[str, dict] = {}


def tiny_builder(*pipeline_class_names: str, data: Callable | None = None, call_kwargs: dict | None = None):
    """Register the decorated function as the tiny offline builder of these pipeline classes (with, optionally, the
    preference data its family trains on and the extra arguments a pipeline call needs)."""

    def register(builder):
        for name in pipeline_class_names:
            if name in TINY_BUILDERS:
                raise ValueError(f"A tiny builder for {name} is already registered ({TINY_BUILDERS[name].__name__}).")
            TINY_BUILDERS[name] = builder
            if data is not None:
                TINY_DATA[name] = data
            TINY_CALL_KWARGS[name] = dict(call_kwargs or {})
        return builder

    return register
