"""`llavadi cache-teacher`: run the teacher once over a stage's data and store its top-k signal.

For each sample of the stage's data (rendered as training renders it: the stage's template, system
prompt and max_length), the teacher runs once; at the positions the stage's logit terms read
(``Predictions(group)`` of their token groups) its top-k token ids and log-probs (T=1, normalised
over the full vocabulary) are stored, and with ``--hidden`` its last hidden states of the tokens
hidden-state terms read. Format and crash safety: ``llavadi.teacher.cache_format``.

The rows are the teacher's own positions in its own rendering of each sample. A student with the
same tokenizer reads them at its positions; a student of another tokenizer (``uld``, ``gold``,
``hidden_mse`` on paired answer spans) renders each sample the teacher's way too, from the
teacher's tokenizer, config and image processor stored beside the rows (``teacher/``), pairs its
answer tokens with the teacher's, and reads the teacher's rows of the pairs: what the online
teacher would have computed there.

Resumable: a rerun of the same command keeps every committed entry whose sample is unchanged and
computes only the missing or changed ones. Under ``torchrun`` each process caches every
world-size-th remaining sample into its own shards and journal; the first process merges the one
index at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llavadi.atomic import remove_stale_temporaries, write_json_atomic
from llavadi.data.collator import LlavaCollator
from llavadi.data.dataset import LlavaDataset
from llavadi.device import resolve_device
from llavadi.distill.objective import DistillObjective
from llavadi.distill.view import Needs, llava_view, model_inputs
from llavadi.identity import file_sha256, folder_identity
from llavadi.teacher.cache import CachePlan, image_layout, plan_for, vocab_size
from llavadi.teacher.cache_format import (
    DTYPE_NAMES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TEACHER_DIR,
    VALUE_DTYPES,
    CacheError,
    ImageDigests,
    ShardWriter,
    append_journal,
    consolidate,
    digest_difference,
    directory_fingerprint,
    id_dtype,
    memory_fingerprint,
    next_shard_number,
    read_entries,
    read_json,
    sample_digest,
    shard_name,
    tokenizer_digest,
)

LOGIT_BYTES_PER_CHUNK = 1 << 28  # rows of (rows, V) fp32 logits per LM-head chunk: 256 MiB
# manifest keys that must be equal to resume a cache (the rest describe the data and the progress)
RESUME_KEYS = ("format_version", "teacher.fingerprint", "tokenizer", "vocab_size", "n_image_tokens", "image_layout",
               "template", "system", "max_length", "topk", "ids_dtype", "values_dtype",
               "logit_groups", "hidden_groups", "hidden_width", "hidden_dtype")


def pick_stage(recipe, name: str | None):
    """The stage to cache: the named one, or the only stage with distillation terms."""
    if name is not None:
        found = [s for s in recipe.stages if s.name == name]
        if not found:
            raise CacheError(f"no stage named {name!r}; the recipe has {[s.name for s in recipe.stages]}")
        stage = found[0]
    else:
        with_terms = [s for s in recipe.stages if s.distill.terms]
        if len(with_terms) != 1:
            raise CacheError(f"the recipe has {len(with_terms)} stages with distillation terms "
                             f"({[s.name for s in with_terms]}); name one with --stage")
        stage = with_terms[0]
    if not stage.distill.terms:
        raise CacheError(f"stage {stage.name!r} has no distillation terms: there is no teacher signal to cache")
    return stage


def _process_group() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group): torchrun sets WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world, True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _device(device: str | None, world: int) -> torch.device:
    if world > 1 and torch.cuda.is_available() and device in (None, "auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolve_device(device or "auto")


def _manifest(recipe, stage, teacher, plan: CachePlan, top_k: int, values: str, hidden: bool) -> dict:
    """What produces this cache (compared on resume) and what it holds."""
    model, d = teacher.model, stage.data
    vocab = vocab_size(model.config)
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    fingerprint = directory_fingerprint(recipe.teacher.path) if recipe.teacher.path else memory_fingerprint(model)
    width = int(model.config.get_text_config().hidden_size)
    return {
        "format_version": FORMAT_VERSION, "complete": False, "stage": stage.name,
        "teacher": {"source": recipe.teacher.describe(), "fingerprint": fingerprint,
                    "files": folder_identity(recipe.teacher.path) if recipe.teacher.path else None,
                    "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "teacher_config": model.config.to_dict(), "teacher_layers": n_layers,
        "tokenizer": tokenizer_digest(teacher.tokenizer), "vocab_size": vocab,
        "n_image_tokens": teacher.n_image_tokens, "image_layout": image_layout(teacher.image_processor),
        "template": d.template, "system": d.system, "max_length": d.max_length,
        "topk": top_k, "ids_dtype": DTYPE_NAMES[id_dtype(vocab)], "values_dtype": values,
        "logit_groups": list(plan.logit_groups), "hidden_groups": list(plan.hidden_groups),
        "hidden_width": width if hidden else None, "hidden_dtype": values if hidden else None,
        "data": {"path": os.path.abspath(d.path), "sha256": file_sha256(d.path)},
    }


def _check_resume(out_dir: str, manifest: dict) -> None:
    """An existing cache in out_dir must have been produced the same way; an error saying what differs."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return
    old = read_json(path, "cache manifest")

    def value(m: dict, key: str):
        for part in key.split("."):
            m = m.get(part) if isinstance(m, dict) else None
        return json.dumps(m, sort_keys=True)

    differ = [k for k in RESUME_KEYS if value(old, k) != value(manifest, k)]
    if differ:
        raise CacheError(f"{out_dir} holds a teacher cache written differently ({', '.join(differ)} differ); "
                         "choose another --out, or delete it to start afresh")


def _plan(stage, teacher, hidden: bool) -> CachePlan:
    config = teacher.model.config
    objective = DistillObjective(stage.distill.terms, ce_weight=stage.distill.ce_weight, student_config=config,
                                 teacher_config=config, chunk_size=None, teacher_signal="topk")
    return plan_for(objective, int(config.get_text_config().num_hidden_layers) + 1, hidden)


def _union(selections, token_types: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(token_types, dtype=torch.bool)
    for sel in selections:
        mask |= sel.mask(token_types)
    return mask


@torch.no_grad()
def teacher_rows(model, batch: dict, plan: CachePlan, top_k: int, hidden: bool, device: torch.device):
    """Per sample of a batch: (positions, top-k ids, top-k log-probs, hidden positions, hidden states), on the CPU."""
    types = batch["token_types"]
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    view = llava_view(model, inputs, types.to(device), Needs(last_hidden=True), who="teacher")
    logit_mask, hidden_mask = _union(plan.logit_selections(), types), _union(plan.hidden_selections(), types)
    states = view.last_hidden[logit_mask.to(device)]
    lm_head = model.get_output_embeddings()
    step = max(1, LOGIT_BYTES_PER_CHUNK // (4 * lm_head.weight.shape[0]))
    ids, values = [], []
    for start in range(0, states.shape[0], step):
        logprobs = F.log_softmax(lm_head(states[start:start + step]).float(), dim=-1)
        top = logprobs.topk(top_k, dim=-1)
        ids.append(top.indices.cpu())
        values.append(top.values.cpu())
    k = top_k
    ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.long)
    values = torch.cat(values) if values else torch.zeros(0, k)
    h_states = view.last_hidden[hidden_mask.to(device)].cpu() if hidden else None
    out, offset, h_offset = [], 0, 0
    for b in range(types.shape[0]):
        pos = logit_mask[b].nonzero().squeeze(1)
        h_pos = hidden_mask[b].nonzero().squeeze(1)
        h = h_states[h_offset:h_offset + len(h_pos)] if hidden else None
        out.append((pos, ids[offset:offset + len(pos)], values[offset:offset + len(pos)], h_pos if hidden else None, h))
        offset, h_offset = offset + len(pos), h_offset + len(h_pos)
    return out


def _digest(dataset: LlavaDataset, i: int, images: ImageDigests) -> dict:
    enc = dataset.encoded[i][0]
    rec = dataset.records[i]
    return sample_digest(enc.input_ids, enc.token_types, images(tuple(rec.images) if len(rec.images) > 1 else rec.image))


def _todo(dataset: LlavaDataset, entries: dict[str, dict], images: ImageDigests) -> list[int]:
    """Indices of the samples to compute: not cached, or changed since they were cached."""
    todo = []
    for i, rec in enumerate(dataset.records):
        cached = entries.get(rec.sample_id)
        if cached is None or digest_difference(cached["digest"], _digest(dataset, i, images)):
            todo.append(i)
    return todo


def _write_share(dataset, share: list[int], images: ImageDigests, model, manifest: dict, plan: CachePlan,
                 out_dir: str, rank: int, world: int, batch_size: int, shard_samples: int, device,
                 progress: bool) -> dict:
    """Compute and commit this process's samples, one shard transaction at a time; returns counts."""
    collator = LlavaCollator(dataset.views[0].encoder.tokenizer.pad_token_id)
    share = sorted(share, key=lambda i: -len(dataset.encoded[i][0].input_ids))  # similar lengths batch together
    first_number, hidden = next_shard_number(out_dir), bool(manifest["hidden_width"])
    top_k = manifest["topk"]
    counts = {"samples": 0, "positions": 0, "shards": 0, "seconds": 0.0}
    start_time = time.perf_counter()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(share), desc=f"caching the teacher (process 0 of {world})", unit="sample")
    for j, start in enumerate(range(0, len(share), shard_samples)):
        values_dtype = VALUE_DTYPES[manifest["values_dtype"]]
        writer = ShardWriter(top_k, id_dtype(manifest["vocab_size"]), values_dtype, values_dtype)
        part = share[start:start + shard_samples]
        for b0 in range(0, len(part), batch_size):
            idx = part[b0:b0 + batch_size]
            batch = collator([dataset[i] for i in idx])
            for i, rows in zip(idx, teacher_rows(model, batch, plan, top_k, hidden, device)):
                writer.add(dataset.records[i].sample_id, _digest(dataset, i, images), *rows)
                counts["positions"] += len(rows[0])
            if bar is not None:
                bar.update(len(idx))
        entries = writer.commit(out_dir, shard_name(first_number + j * world + rank, rank))
        append_journal(out_dir, rank, entries)
        counts["samples"] += len(part)
        counts["shards"] += 1
    if bar is not None:
        bar.close()
    counts["seconds"] = round(time.perf_counter() - start_time, 3)
    return counts


def _prepare(recipe, stage, top_k: int, values: str, hidden: bool, device, rank: int, world: int):
    """(teacher, dataset, plan, manifest): the manifest computed on the first process and shared."""
    from transformers import set_seed

    from llavadi.models.build import load_model

    if recipe.teacher is None or not (recipe.teacher.path or recipe.teacher.preset or recipe.teacher.vision):
        raise CacheError("cache-teacher needs the teacher model in the recipe (teacher.path, preset or vision + llm)")
    if values not in VALUE_DTYPES:
        raise CacheError(f"values dtype must be one of {sorted(VALUE_DTYPES)}, got {values!r}")
    set_seed(recipe.seed)  # a preset teacher is built from the recipe's seed, as `llavadi train` builds it
    teacher = load_model(recipe.teacher)
    teacher.model.to(device).eval().requires_grad_(False)
    vocab = vocab_size(teacher.model.config)
    if not 1 <= top_k <= vocab:
        raise CacheError(f"--top-k must be in 1..{vocab} (the teacher's vocabulary), got {top_k}")
    plan = _plan(stage, teacher, hidden)
    d = stage.data
    view = teacher.data_view(d.template, d.system, d.max_length)  # as training renders
    dataset = LlavaDataset(d.path, d.image_folder, [view], on_error=d.on_error)
    box = [_manifest(recipe, stage, teacher, plan, top_k, values, hidden) if rank == 0 else None]
    if world > 1:  # hashing the teacher's weights once is enough
        dist.broadcast_object_list(box, src=0)
    return teacher, dataset, plan, box[0]


def cache_teacher(recipe, out_dir: str, stage_name: str | None = None, top_k: int = 64, hidden: bool = False,
                  values: str = "fp16", batch_size: int | None = None, shard_samples: int = 1024,
                  device: str | None = None, progress: bool = True) -> dict:
    """Cache the teacher's top-k signal over a stage's data in out_dir (resumable); returns the run's stats."""
    if shard_samples < 1 or (batch_size is not None and batch_size < 1):
        raise CacheError("--shard-samples and --batch-size must be >= 1")
    stage = pick_stage(recipe, stage_name)
    rank, world, own_group = _process_group()
    try:
        start = time.time()
        dev = _device(device, world)
        teacher, dataset, plan, manifest = _prepare(recipe, stage, top_k, values, hidden, dev, rank, world)
        _check_resume(out_dir, manifest)
        _barrier(world)
        if rank == 0:  # merge what killed runs committed; drop their temporary and unreferenced shards
            os.makedirs(out_dir, exist_ok=True)
            consolidate(out_dir)
            remove_stale_temporaries(out_dir)  # a teacher/ folder being written when a run was killed
            write_json_atomic(os.path.join(out_dir, MANIFEST_FILE), manifest)
            save_teacher_files(teacher, out_dir)
        _barrier(world)
        images = ImageDigests()
        todo = _todo(dataset, read_entries(out_dir), images)
        counts = _write_share(dataset, todo[rank::world], images, teacher.model, manifest, plan, out_dir, rank,
                              world, batch_size or stage.train.value("per_device_train_batch_size"), shard_samples,
                              dev, progress)
        _barrier(world)
        stats = {"out": out_dir, "stage": stage.name, "processes": world, "samples": len(dataset),
                 "computed": len(todo), "kept": len(dataset) - len(todo), "skipped": [vars(s) for s in dataset.skipped],
                 "seconds": round(time.time() - start, 2), "this_process": counts}
        if rank == 0:
            entries = consolidate(out_dir)
            positions = sum(e["rows"][1] for e in entries.values())
            write_json_atomic(os.path.join(out_dir, MANIFEST_FILE),
                              {**manifest, "complete": True, "samples": len(entries), "positions": positions})
            stats.update(entries=len(entries), positions=positions, bytes=_size(out_dir))
        _barrier(world)
        return stats
    finally:
        if own_group:
            dist.destroy_process_group()


def save_teacher_files(teacher, out_dir: str) -> None:
    """The teacher's tokenizer, config, image processor and llavadi.json in out_dir/teacher/, atomically (no weights)."""
    from llavadi.models.build import save_model

    save_model(teacher, os.path.join(out_dir, TEACHER_DIR), weights=False)


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(directory) for n in names)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `cache-teacher` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("cache-teacher", help="run the teacher once over a stage's data and store its top-k "
                                                    "signal (train with `teacher: {cache: DIR}`)")
    p.add_argument("recipe", help="YAML recipe (its teacher and the stage's data and terms are used)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, anywhere on the line")
    p.add_argument("--stage", default=None, help="stage to cache (default: the only stage with distillation terms)")
    p.add_argument("--out", required=True, help="cache directory (a rerun resumes it)")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    p.add_argument("--hidden", action="store_true",
                   help="also store the teacher's last hidden states of the tokens hidden-state terms read (fp16, "
                        "2 x hidden width bytes per token: large)")
    p.add_argument("--values", choices=sorted(VALUE_DTYPES), default="fp16",
                   help="dtype of the stored log-probs and hidden states (fp32: twice the size, exact)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the stage's train batch size")
    p.add_argument("--shard-samples", type=int, default=1024, help="samples per shard (the unit of a resume)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cache_teacher, takes_overrides=True)


def run_cache_teacher(args: argparse.Namespace) -> int:
    """The `cache-teacher` subcommand: write or resume the cache, print the stats JSON."""
    from llavadi.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stats = cache_teacher(recipe, args.out, args.stage, top_k=args.top_k, hidden=args.hidden, values=args.values,
                          batch_size=args.batch_size, shard_samples=args.shard_samples, device=args.device,
                          progress=not args.no_progress)
    if stats.get("entries") is not None:  # the first process speaks
        print(json.dumps(stats, indent=2))
    return 0
