"""Per-step time breakdown of any diffusers training process, measured from outside (bench_peer.py).

Put this folder on PYTHONPATH and set BENCH_PROBE_OUT to a JSON path: Python imports this module at start-up, and it
wraps, at class level, the VAE's `encode`, the CLIP text encoder's `forward`, the UNet's `forward` (with grad enabled:
the policy; without: the reference), `Tensor.backward`, and every optimizer's `step` (global hooks). The training
script itself is not touched. At exit it writes each call's (name, start, end, CPU seconds) and the optimizer-step
end times (wall clock, the process's CPU time, its system CPU time and its minor page faults), which delimit the
steps, plus the process's peak RSS. CPU time is what to compare on a machine shared with other jobs: it counts the
work done, not the time spent waiting for a core. System time and page faults show how much of it is the kernel
handing out fresh memory (glibc returns large freed blocks to the kernel, and every reuse faults them in again).
"""

import atexit
import json
import os
import resource
import time

OUT = os.environ.get("BENCH_PROBE_OUT")

if OUT:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    events, step_ends, step_cpu, step_sys, step_faults, marks = [], [], [], [], [], {}
    # On a GPU the kernels run asynchronously: synchronise at each boundary, so a call's time is its own.
    _sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def _timed(function, name):
        def wrapper(*args, **kwargs):
            label = name() if callable(name) else name
            _sync()
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                _sync()
                events.append((label, start, time.perf_counter(), time.process_time() - cpu))

        wrapper.__wrapped__ = function
        return wrapper

    AutoencoderKL.encode = _timed(AutoencoderKL.encode, "vae_encode")
    for encoder in (CLIPTextModel, CLIPTextModelWithProjection):
        encoder.forward = _timed(encoder.forward, "text_encode")
    UNet2DConditionModel.forward = _timed(
        UNet2DConditionModel.forward, lambda: "policy_forward" if torch.is_grad_enabled() else "reference_forward"
    )
    torch.Tensor.backward = _timed(torch.Tensor.backward, "policy_backward")

    def _before_step(optimizer, args, kwargs):
        _sync()
        marks["optimizer"] = (time.perf_counter(), time.process_time())

    def _after_step(optimizer, args, kwargs):
        _sync()
        end, cpu = time.perf_counter(), time.process_time()
        start, cpu_start = marks.pop("optimizer", (end, cpu))
        events.append(("optimizer", start, end, cpu - cpu_start))
        step_ends.append(end)
        step_cpu.append(cpu)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        step_sys.append(usage.ru_stime)
        step_faults.append(usage.ru_minflt)

    register_optimizer_step_pre_hook(_before_step)
    register_optimizer_step_post_hook(_after_step)

    def phase(name):
        """A context for the driver to mark a phase it runs itself (e.g. a pre-pass before training)."""
        class _Phase:
            def __enter__(self):
                self.start, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                marks.setdefault("phases", []).append(
                    (name, self.start, time.perf_counter(), time.process_time() - self.cpu))

        return _Phase()

    @atexit.register
    def _write():
        with open(OUT, "w") as f:
            json.dump({"events": events, "step_ends": step_ends, "step_cpu": step_cpu, "step_sys": step_sys,
                       "step_faults": step_faults, "phases": marks.get("phases", []),
                       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "torch_threads": torch.get_num_threads()}, f)
