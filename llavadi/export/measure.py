"""What an answer costs at batch 1, measured in the running process: the numbers of the export's cost rows.

`measure_answers` times any answering function (a HF model through llavadi's generation, a GGUF
variant through llama.cpp): time to first token (median over the first questions, answered with
one new token), then every question answered once at batch 1: ms per answer, tokens/s (answer
tokens, eos included, over wall time), CPU-seconds per answer (user + system of this process),
energy per answer where a RAPL counter is readable (the package's, so the whole machine's), and
the process's peak resident memory (VmHWM; its growth over the resident memory given as
`baseline_rss_kib`, read before the model loaded). Peak memory is the process's: measure one
variant per fresh process for a figure of that variant alone.

`measure_exported` loads one exported variant (`llavadi export --to gguf`) in llama.cpp and
measures it on prompts already encoded with the model's own template, adding its size on disk;
`export_and_measure` exports a saved student in one quantization first. Prompts, eos ids and
scoring come from the caller (llavadi.eval encodes, decodes and scores; this package sits below it).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence

from llavadi.process_memory import status_kib

RAPL = "/sys/class/powercap/intel-rapl:0/energy_uj"
ROW_FIELDS = ("ttft_ms", "ms_per_answer", "tokens_per_s", "tokens_per_cpu_s", "cpu_s_per_answer",
              "energy_j_per_answer", "peak_rss_mib", "rss_growth_mib", "tokens", "seconds", "n_answers")


def energy_uj() -> int | None:
    """The RAPL package energy counter in microjoules, or None where the machine exposes none."""
    try:
        with open(RAPL) as f:
            return int(f.read())
    except OSError:
        return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_answers(answer: Callable[[list[int], int], list[list[int]]], n_questions: int, max_new_tokens: int,
                    n_ttft: int = 50, baseline_rss_kib: int | None = None) -> dict:
    """Batch-1 cost of `answer(question indices, max_new_tokens) -> answer ids` over questions 0..n-1.

    One warm-up answer, the first token of the first `n_ttft` questions, then every question once.
    Returns the ROW_FIELDS and `answers` (the ids of the full run, in question order).
    """
    if n_questions < 1 or max_new_tokens < 1:
        raise ValueError(f"n_questions and max_new_tokens must be >= 1, got {n_questions} and {max_new_tokens}")
    answer([0], max_new_tokens)  # warm-up: lazy allocations, caches
    first = []
    for i in range(min(n_ttft, n_questions)):
        t0 = time.perf_counter()
        answer([i], 1)
        first.append(time.perf_counter() - t0)
    energy0, cpu0, t0 = energy_uj(), _cpu_seconds(), time.perf_counter()
    ids = [answer([i], max_new_tokens)[0] for i in range(n_questions)]
    seconds, cpu, energy1 = time.perf_counter() - t0, _cpu_seconds() - cpu0, energy_uj()
    tokens = sum(len(a) for a in ids)
    peak = status_kib("VmHWM")
    return {"ttft_ms": 1000 * statistics.median(first) if first else None,
            "ms_per_answer": 1000 * seconds / n_questions, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None, "cpu_s_per_answer": cpu / n_questions,
            "energy_j_per_answer": None if energy0 is None or energy1 is None else (energy1 - energy0) / 1e6 / n_questions,
            "peak_rss_mib": peak / 1024,
            "rss_growth_mib": None if baseline_rss_kib is None else (peak - baseline_rss_kib) / 1024,
            "tokens": tokens, "seconds": seconds, "n_answers": n_questions, "answers": ids}


def measure_exported(path: str | os.PathLike, prompts: Sequence[list[int]], images: Sequence, max_new_tokens: int,
                     eos_ids: Sequence[int], n_ttft: int = 50, threads: int | None = None) -> dict:
    """Load an exported GGUF variant (a `model-*.gguf` of an export folder) in llama.cpp and measure it at batch 1.

    `prompts`: token ids encoded with the model's own template (llavadi.eval.generate.encode_question),
    `images`: one PIL image or None per prompt, `eos_ids`: the ids that end an answer
    (llavadi.eval.decode.eos_token_ids). Returns `measure_answers`' fields plus `file_bytes`
    (language model + mmproj), `quant`, `position_table` (the export manifest's) and `threads`.
    """
    from llavadi.export.gguf_runtime import find_export, load_exported, read_manifest

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    baseline = status_kib("VmRSS")
    bundle = load_exported(path, threads=threads)
    eos_ids, image_token_id = [int(i) for i in eos_ids], int(bundle.model.config.image_token_id)

    def answer(indices: list[int], new_tokens: int) -> list[list[int]]:
        return bundle.answer_prompts([list(prompts[i]) for i in indices], [images[i] for i in indices], new_tokens,
                                     eos_ids, image_token_id)

    try:
        row = measure_answers(answer, len(prompts), max_new_tokens, n_ttft, baseline)
    finally:
        bundle.model.close()
    manifest = read_manifest(find_export(path)[0])
    return {**row, "file_bytes": sum(os.path.getsize(p) for p in bundle.files), "quant": bundle.quant,
            "position_table": manifest.get("position_table"), "threads": bundle.model.llm.n_threads}


def export_and_measure(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quant: str,
                       prompts: Sequence[list[int]], images: Sequence, max_new_tokens: int, eos_ids: Sequence[int],
                       n_ttft: int = 50, threads: int | None = None, position_table: str = "auto",
                       force: bool = False) -> dict:
    """Export a saved student to GGUF in one quantization (`export_gguf`) and measure it (`measure_exported`).

    The prompts may be encoded with the student's own encoder: the export carries its tokenizer and
    template. Returns `measure_exported`'s row plus `model` (the variant's file) and `export` (the manifest).
    """
    from llavadi.export.gguf_target import export_gguf, model_file

    manifest = export_gguf(model_dir, out_dir, [quant], force=force, position_table=position_table)
    path = os.path.join(os.fspath(out_dir), model_file(quant))
    row = measure_exported(path, prompts, images, max_new_tokens, eos_ids, n_ttft=n_ttft, threads=threads)
    return {**row, "model": path, "export": manifest}
