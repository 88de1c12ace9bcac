"""What a recipe needs from this machine, checked before any model loads: packages, device, precision, ops.

Each of these used to fail only after the models had loaded (minutes with a 13B teacher):
- `attn_implementation: flash_attention_2` needs the flash-attn package and a CUDA device;
- `student.lora.quantize: 4bit` (QLoRA) needs bitsandbytes and a CUDA device, and a student read
  from disk (a preset or composed student is on disk only after a first stage);
- `fp16` mixed precision needs an accelerator; `bf16` on CUDA needs a GPU that supports it
  (`torch.cuda.is_bf16_supported`), as does a model `dtype: bf16` there;
- a DeepSpeed config whose optimizer op is compiled on first use (CPU Adam when offloading to the
  CPU, fused Adam for a config `optimizer` of type Adam on the accelerator) needs the op to be
  buildable here: compatible with this machine, ninja, and a C++ compiler (nvcc for CUDA ops).
Packages are looked up with `importlib.util.find_spec` (nothing heavy is imported).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from llavadi.config import ConfigError, ModelSpec, Recipe, StageConfig
from llavadi.device import resolve_device
from llavadi.train.engines import deepspeed_config, engine_request_problems, requested_engine


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def model_problems(spec: ModelSpec | None, who: str, device: str) -> list[str]:
    """A model's attention implementation and dtype against the packages and the device."""
    if spec is None:
        return []
    problems = []
    if spec.attn_implementation == "flash_attention_2":
        if not _installed("flash_attn"):
            problems.append(f"{who}.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                            "installed here (pip install flash-attn); or write sdpa (PyTorch's fused attention) or eager")
        if device != "cuda":
            problems.append(f"{who}.attn_implementation: flash_attention_2 runs on CUDA GPUs only; the run's device "
                            f"is {device}: write sdpa or eager")
    if spec.dtype == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append(f"{who}.dtype: bf16 is not supported by this GPU; write fp16 or fp32")
    return problems


def quantization_problems(recipe: Recipe, device: str) -> list[str]:
    """QLoRA (`student.lora.quantize: 4bit`): bitsandbytes, CUDA, and a student read from disk."""
    lora = recipe.student.lora
    if lora is None or not lora.quantize:
        return []
    problems = []
    where = "student.lora.quantize"
    if not _installed("bitsandbytes"):
        problems.append(f"{where}: 4-bit loading needs the bitsandbytes package, which is not installed here "
                        "(pip install bitsandbytes); or drop `quantize` (plain LoRA)")
    if device != "cuda":
        problems.append(f"{where}: 4-bit loading (bitsandbytes) runs on CUDA GPUs; the run's device is {device}; "
                        "drop `quantize` (plain LoRA)")
    first_lora = next((i for i, s in enumerate(recipe.stages) if s.trainable.llm), None)
    if first_lora == 0 and not recipe.student.path:
        problems.append(f"{where}: 4-bit loading reads the student from disk; a preset or composed student is on "
                        f"disk only after a first stage: add one before stage {recipe.stages[0].name!r} "
                        "(e.g. a projector pretraining stage with trainable.llm: false)")
    return problems


def precision_problems(train_args: dict, device: str, where: str) -> list[str]:
    """Mixed precision a stage's `train` asks for against the device."""
    problems = []
    if train_args.get("fp16") and device == "cpu":
        problems.append(f"{where}.fp16: fp16 mixed precision needs a GPU; the run's device is the CPU "
                        "(write bf16: true, or neither)")
    if train_args.get("bf16") and device == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append(f"{where}.bf16: this GPU does not support bf16; write fp16: true instead")
    return problems


def _op_builder(name: str):
    """DeepSpeed's builder of an op for this machine's accelerator (None: the accelerator has none)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(name)


def deepspeed_op_problems(config: dict, device: str, where: str) -> list[str]:
    """The DeepSpeed ops a config will compile on first use, each buildable here (compatible, ninja, compiler)."""
    zero = config.get("zero_optimization") or {}
    offload = any(str((zero.get(k) or {}).get("device", "none")).lower() in ("cpu", "nvme")
                  for k in ("offload_optimizer", "offload_param"))
    optimizer = str((config.get("optimizer") or {}).get("type", "")).lower()
    needed = []
    if offload:
        needed.append(("CPUAdamBuilder", "offloading to the CPU (zero_optimization.offload_*) uses DeepSpeed's CPU Adam op"))
    elif optimizer in ("adam", "adamw") and device != "cpu":
        needed.append(("FusedAdamBuilder", f"the config's optimizer {optimizer!r} uses DeepSpeed's fused Adam op"))
    if not needed:
        return []
    import deepspeed.git_version_info as built
    from torch.utils import cpp_extension

    problems = []
    for builder_name, why in needed:
        builder = _op_builder(builder_name)
        if builder is None:
            problems.append(f"{where}.deepspeed: {why}, which DeepSpeed does not have for this machine's accelerator")
            continue
        if built.installed_ops.get(builder.NAME):
            continue  # compiled when DeepSpeed was installed
        missing = []
        if not builder.is_compatible(verbose=False):
            missing.append("DeepSpeed says it is not compatible with this machine (run `ds_report`)")
        if not cpp_extension.is_ninja_available():
            missing.append("ninja is not installed (pip install ninja)")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            missing.append("no C++ compiler found (CXX or c++ on PATH)")
        if device == "cuda" and cpp_extension.CUDA_HOME is None:
            missing.append("no CUDA toolkit found (CUDA_HOME, nvcc)")
        if missing:
            problems.append(f"{where}.deepspeed: {why}, compiled on first use, and it cannot be built here: "
                            + "; ".join(missing))
    return problems


def engine_problems(stage: StageConfig, device: str) -> list[str]:
    """The stage's engine (DeepSpeed, FSDP) can run here and run the stage; DeepSpeed's ops can be built."""
    where = f"stages.{stage.name}.train"
    try:
        problems = engine_request_problems(stage.train.args, device, where, on_policy=stage.on_policy is not None)
        if not problems and requested_engine(stage.train.args) == "deepspeed":
            problems = deepspeed_op_problems(deepspeed_config(stage.train.args["deepspeed"], where), device, where)
    except ConfigError as e:
        return [str(e)]
    return problems


def environment_problems(recipe: Recipe) -> list[str]:
    """Everything of the recipe this machine cannot run, each problem naming its key."""
    device = resolve_device(recipe.device).type
    problems = model_problems(recipe.student, "student", device)
    problems += model_problems(recipe.teacher, "teacher", resolve_device(recipe.teacher_device or recipe.device).type)
    problems += quantization_problems(recipe, device)
    for stage in recipe.stages:
        problems += engine_problems(stage, device)
        problems += precision_problems(stage.train.args, device, f"stages.{stage.name}.train")
    return problems
