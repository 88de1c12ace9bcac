"""Scale-out through the Trainer's engines: DDP, DeepSpeed ZeRO-2/3 and FSDP2, with no silent fallback.

What a stage's `train` section (TrainingArguments fields) asks for is checked before any model loads (``check_engine_request``),
completed from the model (``engine_arguments``), and confirmed once the Trainer exists
(``require_engine``): a recipe that asks for DeepSpeed or FSDP and would get plain DDP is an error.

Under ZeRO-3 the trainable module's parameters are partitioned and gathered around each module's
own forward. Two things read weights outside one: the logit pass reads the student's LM head (it
is registered as an external parameter of the trainable module, so DeepSpeed keeps it gathered
for the module's whole forward and backward), and the teacher's LM head (the frozen teacher is
sharded for inference as well; a full copy of its small LM head is kept on every rank).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from llavadi.config import ConfigError
from llavadi.distill.objective import text_width
from llavadi.distill.view import base_llava, decoder_layers

# ----------------------------------------------------------------------------- processes

def world_size() -> int:
    """Processes in the run (the process group's size, else the launcher's WORLD_SIZE, else 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes shared files)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (nothing when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown_process_group() -> None:
    """Barrier and destroy the process group, so multi-process runs exit cleanly.

    Without it gloo often aborts at interpreter exit ("terminate called without an active exception")
    after training has finished; freeing objects first (gc) matters as much as the barrier.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- what a stage asks for

def requested_engine(train_args: dict) -> str | None:
    """'deepspeed', 'fsdp' or None (DDP or one process), from a stage's `train` fields."""
    if train_args.get("deepspeed") and train_args.get("fsdp"):
        raise ConfigError("train: give `deepspeed` or `fsdp`, not both")
    if train_args.get("deepspeed"):
        return "deepspeed"
    return "fsdp" if train_args.get("fsdp") else None


def _accelerator_available() -> bool:
    return any(getattr(torch, kind, None) is not None and getattr(torch, kind).is_available()
               for kind in ("cuda", "xpu", "npu", "mlu", "musa", "hpu"))


def check_engine_request(train_args: dict, device: str, where: str, on_policy: bool = False) -> None:
    """Refuse, before any model loads, an engine that cannot run here (it would silently be DDP), or that
    cannot run the stage (`on_policy`: the student generates during training)."""
    problems = engine_request_problems(train_args, device, where, on_policy)
    if problems:
        raise ConfigError("; ".join(problems))


def engine_request_problems(train_args: dict, device: str, where: str, on_policy: bool = False) -> list[str]:
    """What `check_engine_request` refuses, every problem (empty: the engine can run the stage here)."""
    engine = requested_engine(train_args)
    problems = []
    if engine == "fsdp" and (device == "cpu" or not _accelerator_available()):
        problems.append(f"{where}.fsdp: FSDP runs only on accelerator devices (GPU, XPU, ...); on "
                        f"{'the CPU' if device == 'cpu' else 'this machine (no accelerator found)'} accelerate "
                        "would run plain DDP instead. Use DeepSpeed (train.deepspeed, runs on CPU) or DDP")
    if engine == "fsdp" and on_policy:
        # as under ZeRO-3: each forward of a sharded student gathers its weights collectively, so ranks
        # generating answers of different lengths would wait for each other forever
        problems.append(f"{where}.fsdp: on_policy generates with the student, whose weights FSDP shards; "
                        "use DeepSpeed ZeRO-2 or DDP for an on_policy stage")
    if engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            return [f"{where}.deepspeed: DeepSpeed cannot be imported ({e}); pip install 'llavadi[deepspeed]'"]
        config = deepspeed_config(train_args["deepspeed"], where)
        if on_policy and config["zero_optimization"].get("stage") == 3:
            # each forward of a partitioned model gathers its weights collectively: ranks generating
            # answers of different lengths would wait for each other forever
            problems.append(f"{where}.deepspeed: on_policy generates with the student, whose weights ZeRO-3 "
                            "partitions; use ZeRO-2 or DDP for an on_policy stage")
    return problems


def deepspeed_config(value, where: str) -> dict:
    """A DeepSpeed config (a JSON path or a mapping) as a dict, checked for what saving needs.

    ZeRO-3 must gather the 16-bit weights when the model is saved: a stage's model is a plain HF
    directory, never a partitioned checkpoint. When the key is absent it is set.
    """
    if isinstance(value, str):
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.deepspeed: cannot read {value!r} as a DeepSpeed JSON config ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.deepspeed: expected a JSON path or a mapping, got {type(value).__name__}")
    config = copy.deepcopy(value)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ConfigError(f"{where}.deepspeed: stage3_gather_16bit_weights_on_model_save is false, but the "
                              "stage's model is saved as a plain HF directory: set it to true")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def layer_classes_to_wrap(model: nn.Module) -> list[str]:
    """The class names of a model's transformer blocks (LLM decoder layer, vision encoder layer), read from the model.

    Never from `_no_split_modules`, which for LLaVA names classes the model does not contain.
    """
    llava = base_llava(model)
    layers = decoder_layers(llava)
    if layers is None or not len(layers):
        raise ValueError(f"cannot find the decoder layers of {type(llava).__name__}")
    from llavadi.models.families import family_of

    encoder_layers = family_of(llava.config).parts(llava).vision_layers
    return list(dict.fromkeys([type(layers[0]).__name__, type(encoder_layers[0]).__name__]))


def process_arguments(train_args: dict) -> dict:
    """A stage's `train` fields as this process runs them: `ddp_backend` dropped when the run has one process."""
    train_args = dict(train_args)
    if world_size() <= 1 and "ddp_backend" in train_args:
        del train_args["ddp_backend"]  # a one-process run has no process group: the backend would fail to initialise
    return train_args


def engine_arguments(train_args: dict, student: nn.Module, where: str) -> dict:
    """A stage's `train` fields completed for its engine (TrainingArguments keyword arguments)."""
    train_args = process_arguments(train_args)
    engine = requested_engine(train_args)
    if engine == "deepspeed":
        train_args["deepspeed"] = deepspeed_config(train_args["deepspeed"], where)
    elif engine == "fsdp":
        train_args["fsdp_config"] = _fsdp_config(train_args.get("fsdp_config"), student, where)
    return train_args


def _fsdp_config(value, student: nn.Module, where: str) -> dict:
    if isinstance(value, str):
        with open(value) as f:
            value = json.load(f)
    config = {k[5:] if k.startswith("fsdp_") else k: v for k, v in (value or {}).items()}
    config.setdefault("version", 2)
    given = config.get("transformer_layer_cls_to_wrap")
    if given is None:
        config["transformer_layer_cls_to_wrap"] = layer_classes_to_wrap(student)
    else:
        present = {type(m).__name__ for m in student.modules()}
        unknown = [c for c in ([given] if isinstance(given, str) else given) if c not in present]
        if unknown:
            raise ConfigError(f"{where}.fsdp_config.transformer_layer_cls_to_wrap: {unknown} are not classes "
                              f"of the student; its transformer blocks are {layer_classes_to_wrap(student)}")
    return config


def require_engine(trainer, train_args: dict, where: str) -> None:
    """The engine the stage asked for is the one the Trainer runs (no silent fallback to DDP)."""
    engine = requested_engine(train_args)
    if engine == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise ConfigError(f"{where}.deepspeed was given but the Trainer did not enable DeepSpeed")
    if engine == "fsdp" and not trainer.is_fsdp_enabled:
        raise ConfigError(f"{where}.fsdp was given but the Trainer did not enable FSDP (accelerate enables it "
                          "only on accelerator devices)")


# ----------------------------------------------------------------------------- ZeRO-3

# teachers partitioned in this process -> (their DeepSpeed engine, the full copy of their LM head)
_SHARDED_TEACHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage the Trainer runs, or None without DeepSpeed."""
    if not trainer.is_deepspeed_enabled:
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def register_student_head(trainer) -> None:
    """Under ZeRO-3, make DeepSpeed gather the student's LM head for the trainable module's whole forward/backward.

    The logit pass applies the LM head at selected rows outside the head's own forward; a partitioned
    weight read there would be an empty shard.
    """
    if zero_stage(trainer) != 3:
        return
    import deepspeed

    module = trainer.model
    for p in base_llava(module.student).get_output_embeddings().parameters():
        deepspeed.zero.register_external_parameter(module, p)


def shard_teacher(trainer, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The frozen teacher as the run holds it, and a full copy of its LM head when its weights are partitioned.

    ZeRO-3 student: the teacher is partitioned for inference too (DeepSpeed, no optimizer), so no
    rank holds a full copy; its LM head (read outside its forward by the logit pass) is gathered
    once into a plain module. Otherwise the teacher stays whole on each rank, in eval mode.
    """
    if zero_stage(trainer) != 3:
        return model, None
    if model in _SHARDED_TEACHERS:  # sharded by an earlier stage of this process
        return model, _SHARDED_TEACHERS[model][1]
    import deepspeed

    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # inference: no optimizer, no schedule
        config.pop(key, None)
    zero = config["zero_optimization"]
    zero.pop("offload_optimizer", None)
    width = text_width(model.config)
    # "auto" sizes are filled from the model only for the trainable module: size them from the teacher
    for key, value in (("reduce_bucket_size", width * width), ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
                       ("stage3_param_persistence_threshold", 10 * width)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    head = _gathered_copy(base_llava(engine.module).get_output_embeddings())
    _SHARDED_TEACHERS[engine.module] = (engine, head)  # not attributes: modules there would become submodules
    return engine.module, head


def _gathered_copy(head: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding the gathered weights of a ZeRO-3 partitioned linear layer."""
    import deepspeed

    params = list(head.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        weight = head.weight.detach()
        bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
        copy_ = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                          device=weight.device)
        with torch.no_grad():
            copy_.weight.copy_(weight)
            if bias is not None:
                copy_.bias.copy_(bias)
    return copy_.requires_grad_(False)


@contextmanager
def zero3_init_paused(trainer):
    """Code run on rank 0 alone (building a model to save) must not take ZeRO-3's collective paths.

    transformers and peft gather or partition parameters when they see the Trainer's ZeRO-3 config;
    on one rank that collective waits for the others forever.
    """
    config = getattr(trainer.args, "hf_deepspeed_config", None) if zero_stage(trainer) == 3 else None
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def release_engine_state() -> None:
    """Forget the Trainer's DeepSpeed config between stages, so later loads build whole models (no zero.Init)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


# ----------------------------------------------------------------------------- saving

def engine_started(trainer) -> bool:
    """Whether DeepSpeed or FSDP has taken over the Trainer's model (done when training starts)."""
    if trainer.is_deepspeed_enabled:
        return getattr(trainer, "deepspeed", None) is not None
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return isinstance(trainer.model, FSDPModule) or isinstance(getattr(trainer, "model_wrapped", None), FSDP)
    return False


def gathered_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The trainable module's full state dict, gathered by the engine (a collective: every rank calls it).

    ZeRO-3: DeepSpeed's consolidated 16-bit state (on rank 0; other ranks get an empty dict);
    FSDP: the full state dict; otherwise (or before an engine started) the module's own state dict.
    """
    if engine_started(trainer):
        return trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()
