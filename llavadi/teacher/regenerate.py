"""Data-driven distillation: rewrite an instruction set's answers with the teacher's own greedy answers.

LLaVADI found that training the student on teacher-regenerated answers helps. `regenerate` keeps
every sample's id, image and human turns and replaces each gpt turn with the teacher's greedy
answer. Turn k is generated from the human turns and the teacher's OWN earlier answers, so a
multi-turn conversation stays self-consistent; all samples' k-th turns are generated together
(longest prompts first, batched) by `llavadi.eval.generate.generate_answer_ids`, before the
(k+1)-th turns. The output is an ordinary LLaVA-format file that any recipe trains on.

Nothing is dropped silently: bad input samples raise (file, line, sample id) or, with
`on_error="skip"`, are left out and listed; empty answers and answers cut at `max_new_tokens`
are kept and listed. The input is checked before the teacher's weights load (its tokenizer and
config are read from files; every image is decoded completely, cached). Answers are appended to
`<out>.journal.jsonl` batch by batch, so a killed run resumes where it stopped. The output and
`<out>.report.json` (the stats) are written atomically at the end, and the journal deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

from llavadi.atomic import atomic_write
from llavadi.data.dataset import image_problems, parse_record, read_json_records, record_image_paths
from llavadi.data.encode import SampleError
from llavadi.data.images import DEFAULT_MAX_PIXELS, check_images
from llavadi.data.templates import IMAGE_PLACEHOLDER, Turn
from llavadi.eval.decode import eos_token_ids
from llavadi.eval.generate import EvalQuestion, decode_answer, load_for_eval
from llavadi.eval.journal import AnswerJournal, journaled_answer_ids
from llavadi.identity import file_sha256, folder_identity, json_digest
from llavadi.models.describe import describe_llava_dir

REPORT_SUFFIX = ".report.json"
JOURNAL_SUFFIX = ".journal.jsonl"
PRINTED_LIST_ITEMS = 20


@dataclass
class _Sample:
    """A validated input sample: the raw object (written back) and its parsed turns."""

    obj: dict
    sample_id: str
    where: str
    turns: list[Turn]
    image: str | None  # resolved path
    answers: list[str]  # teacher answers, filled turn by turn
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of its image

    @property
    def n_answers(self) -> int:
        return len(self.turns) // 2

    def history(self, k: int) -> list[Turn]:
        """Human turns 0..k with the teacher's answers 0..k-1 between them."""
        out: list[Turn] = []
        for j in range(k + 1):
            out.append(self.turns[2 * j])
            if j < k:
                out.append(Turn("assistant", self.answers[j]))
        return out


def _read_samples(data_path: str, image_folder: str | None, encoder, on_error: str, progress: bool = False):
    """Validated samples (parse_record + the teacher's tokenization) and the skipped ones with reasons."""
    samples: list[_Sample] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    records = read_json_records(data_path)
    verdicts = check_images(record_image_paths(records, image_folder), progress=progress)
    problems = image_problems(verdicts, DEFAULT_MAX_PIXELS)
    for where, obj in records:
        try:
            # input answers are replaced: an empty one is no problem here
            rec = parse_record(where, obj, image_folder, problems, allow_empty_answers=True)
            if rec.sample_id in seen:
                raise SampleError(f"{where}: duplicate sample id {rec.sample_id!r} (first at {seen[rec.sample_id]})")
            if len(rec.images) > 1:
                raise SampleError(f"{where}: sample {rec.sample_id!r} has {len(rec.images)} images; answers are "
                                  "regenerated for samples of one image")
            # the teacher must be able to encode the conversation (image tokens, template/tokenizer agreement)
            encoder.encode(rec.sample_id, rec.turns, len(rec.images), _sizes(rec.images, verdicts))
        except SampleError as e:
            msg = str(e)
            msg = msg if msg.startswith(str(data_path)) else f"{where}: {msg}"
            if on_error == "raise":
                raise SampleError(msg) from None
            sid = obj.get("id") if isinstance(obj, dict) else None
            skipped.append({"id": None if sid is None else str(sid), "where": where, "reason": msg})
            continue
        seen[rec.sample_id] = where
        samples.append(_Sample(obj, rec.sample_id, where, rec.turns, rec.image, [], _sizes(rec.images, verdicts)))
    return samples, skipped, len(records), verdicts


def _sizes(paths: list[str], verdicts: dict) -> list[tuple[int, int]]:
    """(width, height) of each image, as the image check read them (an image's token count may depend on it)."""
    return [(verdicts[p].width, verdicts[p].height) for p in paths]


def _regenerate_turns(teacher, samples: list[_Sample], batch_size: int, max_new_tokens: int, progress: bool,
                      journal: AnswerJournal):
    """Fill every sample's answers, turn index by turn index; returns [(sample, k)] of answers cut at the maximum.

    Each turn's answers go to `journal` as they finish; answers it already holds are not generated again.
    """
    eos_ids = set(eos_token_ids(teacher.model, teacher.tokenizer))
    encoder = teacher.encoder()
    n_turns = max((s.n_answers for s in samples), default=0)
    cut: list[tuple[_Sample, int]] = []
    for k in range(n_turns):
        active = [s for s in samples if s.n_answers > k]
        prompts: list[list[int]] = []
        questions: list[EvalQuestion] = []
        for s in active:
            history = s.history(k)
            # the image goes with the prompt that holds its placeholder (usually the first human turn)
            n_images = sum(t.text.count(IMAGE_PLACEHOLDER) for t in history)
            try:
                prompts.append(encoder.encode_prompt(history, n_images, s.sample_id, s.image_sizes[:n_images]).input_ids)
            except SampleError as e:
                raise SampleError(f"{s.where}: {e}") from None
            # the question text is unused: the ready-made multi-turn prompt ids go with it
            questions.append(EvalQuestion(s.sample_id, "", s.image if n_images else None))
        answer_ids = journaled_answer_ids(teacher, questions, journal, [f"{s.sample_id}#{k}" for s in active],
                                          batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                                          desc=f"regenerating turn {k + 1}/{n_turns}", prompt_ids=prompts)
        for s, ids in zip(active, answer_ids):
            s.answers.append(decode_answer(teacher.tokenizer, ids))
            if len(ids) >= max_new_tokens and ids[-1] not in eos_ids:
                cut.append((s, k))
    return cut


def _output_record(s: _Sample, keep_original: bool) -> dict:
    out = dict(s.obj)  # every other key (image, metadata) kept as is, in its order
    convs = [dict(c) for c in s.obj["conversations"]]
    for j, answer in enumerate(s.answers):
        convs[2 * j + 1]["value"] = answer
    out["conversations"] = convs
    if keep_original:
        # the conversations this run read (if the input was itself regenerated, that earlier output)
        out["original_conversations"] = s.obj["conversations"]
    return out


def _record_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def _write_atomic(path: str, lines, json_list: bool) -> None:
    """Write JSONL (or a JSON list, one record per line) atomically, with the user's normal file mode."""
    with atomic_write(path) as handle:
        if json_list:
            handle.write("[\n")
        for i, line in enumerate(lines):
            if json_list and i:
                handle.write(",\n")
            handle.write(line if json_list else line + "\n")
        if json_list:
            handle.write("\n]\n")


def regenerate(teacher_dir: str, data_path: str, image_folder: str | None, out_path: str, batch_size: int = 16,
               max_new_tokens: int = 64, device: str = "auto", keep_original: bool = True, on_error: str = "raise",
               progress: bool = True, dtype: str = "auto") -> dict:
    """Rewrite every gpt turn of a LLaVA-format file with the teacher's greedy answers; return the stats."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    data_path, out_path = str(data_path), str(out_path)
    start = time.time()
    # the data is checked against the teacher's tokenizer and config before its weights load
    files = describe_llava_dir(teacher_dir, "teacher")
    samples, skipped, n_in, verdicts = _read_samples(data_path, image_folder, files.encoder(), on_error, progress)
    if not samples:
        raise SampleError(f"{data_path}: no usable sample ({len(skipped)} skipped)")
    teacher = load_for_eval(teacher_dir, device=device, dtype=dtype)
    header = {"teacher": folder_identity(teacher_dir), "data": file_sha256(data_path), "max_new_tokens": max_new_tokens,
              "images": json_digest(sorted((p, v.size, v.mtime_ns) for p, v in verdicts.items())),
              "dtype": str(next(teacher.model.parameters()).dtype)}
    journal = AnswerJournal(out_path + JOURNAL_SUFFIX, header, log=lambda m: print(m, file=sys.stderr))
    cut = _regenerate_turns(teacher, samples, batch_size, max_new_tokens, progress, journal)

    empty = [{"id": s.sample_id, "conversations_index": 2 * j + 1}
             for s in samples for j, a in enumerate(s.answers) if not a]
    changed = sum(a != s.turns[2 * j + 1].text.strip() for s in samples for j, a in enumerate(s.answers))
    stats = {
        "teacher": str(teacher_dir),
        "data": data_path,
        "out": out_path,
        "samples_in": n_in,
        "samples_out": len(samples),
        "n_skipped": len(skipped),
        "answers_regenerated": sum(s.n_answers for s in samples),
        "answers_changed": changed,
        "n_empty_answers": len(empty),
        "n_cut_at_max_new_tokens": len(cut),
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.time() - start, 2),
        "skipped": skipped,
        "empty_answers": empty,
        "cut_at_max_new_tokens": [{"id": s.sample_id, "conversations_index": 2 * k + 1} for s, k in cut],
        "report": out_path + REPORT_SUFFIX,
    }
    records = (_record_line(_output_record(s, keep_original)) for s in samples)
    _write_atomic(out_path, records, json_list=not out_path.endswith(".jsonl"))
    _write_atomic(out_path + REPORT_SUFFIX, [json.dumps(stats, indent=2, ensure_ascii=False)], json_list=False)
    journal.discard()
    return stats


def _printable(stats: dict) -> dict:
    """Stats with long lists shortened for the terminal (the report file has them all)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, list) and len(value) > PRINTED_LIST_ITEMS:
            value = value[:PRINTED_LIST_ITEMS] + [f"... {len(value) - PRINTED_LIST_ITEMS} more in {stats['report']}"]
        out[key] = value
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `regenerate` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("regenerate",
                              help="rewrite an instruction set's answers with a teacher's greedy answers (data KD)")
    p.add_argument("--teacher", required=True, help="teacher model directory (HF files + llavadi.json)")
    p.add_argument("--data", required=True, help="LLaVA-format instruction file (JSON list or JSONL)")
    p.add_argument("--images", default=None, help="folder the samples' image paths are relative to")
    p.add_argument("--out", required=True, help="output file (.jsonl for JSONL, otherwise a JSON list)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, fp16, bf16")
    p.add_argument("--no-keep-original", action="store_true",
                   help="do not store the input conversations as 'original_conversations'")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad samples: stop, or leave them out and list them in the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_regenerate)


def run_regenerate(args: argparse.Namespace) -> int:
    """The `regenerate` subcommand: regenerate, print the stats JSON."""
    try:
        stats = regenerate(args.teacher, args.data, args.images, args.out, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, device=args.device,
                           keep_original=not args.no_keep_original, on_error=args.on_error,
                           progress=not args.no_progress, dtype=args.dtype)
    except ValueError as err:  # SampleError and bad options: a message, not a traceback
        print(f"llavadi regenerate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(_printable(stats), indent=2, ensure_ascii=False))
    return 0
