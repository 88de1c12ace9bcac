"""The model card (`README.md`) of a trained student, in the Hugging Face model card layout.

YAML metadata (library, pipeline tag, tags, `model-index` with evaluation results) above a
markdown body: the base models, the recipe stage by stage (data, trainable modules, terms and
weights, training arguments), the data files with their sizes and sha256, the steps and the last
logged value of every term, and the evaluation results. `llavadi eval` adds its results to the
card of the model it evaluated (`record_eval_result`): to `model-index` and to the section between
the card's evaluation markers, which llavadi alone writes. Results are keyed by question set
(benchmark, question file, number of questions, the file's sha256): a 24-question check and a
600-question score of one benchmark are two entries; only the same set evaluated again replaces one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import yaml

CARD_FILE = "README.md"
EVAL_START = "<!-- llavadi:eval:start -->"
EVAL_END = "<!-- llavadi:eval:end -->"
CARD_TAG = "llavadi"
# training arguments a reader needs to reproduce a stage (the recipe file has all of them)
SHOWN_ARGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
              "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "bf16", "fp16")


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _params(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _source(spec: dict | None) -> str:
    if not spec:
        return "—"
    if spec.get("path"):
        return f"`{spec['path']}`"
    if spec.get("preset"):
        return f"llavadi preset `{spec['preset']}`"
    return f"`{spec.get('vision')}` + `{spec.get('llm')}` with a new 2-layer GELU projector"


def _objective(distill: dict) -> str:
    parts = [f"cross-entropy × {distill.get('ce_weight', 1.0):g}"] if distill.get("ce_weight", 1.0) else []
    for term in distill.get("terms") or []:
        described = [f"tokens: {term['tokens']}"] if term.get("tokens") else []
        described += [f"{k}={v}" for k, v in (term.get("options") or {}).items()]
        parts.append(f"`{term['name']}` × {term.get('weight', 1.0):g}" + (f" ({'; '.join(described)})"
                                                                          if described else ""))
    return " + ".join(parts)


def _trains(trainable: dict) -> str:
    parts = [name for name in ("projector", "llm") if trainable.get(name)]
    layer = trainable.get("vision_from_layer")
    parts.append("vision tower from layer " + str(layer) if layer is not None else "vision tower frozen")
    return ", ".join(parts)


def _stage_section(stage: dict) -> list[str]:
    data, train = stage.get("data") or {}, stage.get("train") or {}
    shown = ", ".join(f"{k}={train[k]}" for k in SHOWN_ARGS if k in train)
    system = data.get("system")
    prompt = {None: ", the template's default system prompt", "": ", no system prompt"}.get(
        system, f", system prompt {system!r}") if data.get("template") == "vicuna_v1" else ""
    return [f"### Stage `{stage['name']}`", "",
            f"- data: `{data.get('path')}` (template `{data.get('template')}`{prompt}, "
            f"max_length {data.get('max_length')})",
            f"- trains: {_trains(stage.get('trainable') or {})}",
            f"- objective: {_objective(stage.get('distill') or {})}",
            f"- training arguments: {shown}", ""]


def _data_table(recipe: dict, reports: dict[str, dict]) -> list[str]:
    lines = ["| stage | file | bytes | sha256 | samples used | skipped | truncated |", "|---|---|---|---|---|---|---|"]
    for stage in recipe["stages"]:
        path, report = (stage.get("data") or {}).get("path"), reports.get(stage["name"], {})
        exists = path is not None and os.path.isfile(path)
        size, digest = (os.path.getsize(path), file_sha256(path)) if exists else ("?", "(file gone)")
        lines.append(f"| {stage['name']} | `{os.path.basename(str(path))}` | {size} | `{digest}` | "
                     f"{report.get('used', '?')} | {len(report.get('skipped', []))} | {report.get('truncated', '?')} |")
    return lines


def _results_table(recipe: dict, reports: dict[str, dict]) -> list[str]:
    keys = []
    for report in reports.values():
        keys += [k for k in (report.get("last_logs") or {}) if k.startswith("loss") and k not in keys]
    lines = ["| stage | steps | train_loss | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for stage in recipe["stages"]:
        report = reports.get(stage["name"], {})
        logs = report.get("last_logs") or {}
        cells = [f"{logs[k]:.4g}" if isinstance(logs.get(k), (int, float)) else "" for k in keys]
        loss = report.get("train_loss")
        lines.append(f"| {stage['name']} | {report.get('steps', '?')} | "
                     f"{f'{loss:.4g}' if isinstance(loss, (int, float)) else '?'} | " + " | ".join(cells) + " |")
    return lines


USAGE = '''```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

processor = AutoProcessor.from_pretrained("MODEL_DIR")  # Qwen2-VL, LLaVA-OneVision, SmolVLM: needs torchvision
model = AutoModelForImageTextToText.from_pretrained("MODEL_DIR")
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open("photo.jpg")},
                                         {"type": "text", "text": "What is in the picture?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def render_model_card(name: str, recipe: dict, reports: dict[str, dict], params: dict[str, int | None],
                      model_index: list | None = None) -> str:
    """The card's text: metadata, models, recipe, data, training results, evaluation, usage."""
    meta = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
            "tags": ["llava", CARD_TAG, "knowledge-distillation" if recipe.get("teacher") else "fine-tuned"],
            "model-index": model_index or [{"name": name, "results": []}]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             "An image-text-to-text model trained with llavadi"
             + (", distilled from the teacher below" if recipe.get("teacher") else "") + ". Its folder carries "
             "the chat template and the image preprocessing it was trained with (a LLaVA-1.5 model's processor "
             "pads images to a square, as training did), so transformers alone prompts it as training did.", "",
             "## Models", "", "| role | source | parameters |", "|---|---|---|",
             f"| student | {_source(recipe.get('student'))} | {_params(params.get('student'))} |"]
    if recipe.get("teacher"):
        lines.append(f"| teacher | {_source(recipe['teacher'])} | {_params(params.get('teacher'))} |")
    lines += ["", "## Recipe", "", f"Stages in order, seed {recipe.get('seed')}.", ""]
    for stage in recipe["stages"]:
        lines += _stage_section(stage)
    lines += ["## Training data", "", *_data_table(recipe, reports), "",
              "## Training results", "", "Last logged values (`loss/<term>` unweighted; `loss` is the weighted sum).",
              "", *_results_table(recipe, reports), "",
              "## Evaluation", "", EVAL_START, _eval_body(model_index), EVAL_END, "",
              "## Use with transformers", "", USAGE.replace("MODEL_DIR", f"path/to/{name}"), ""]
    return "\n".join(lines)


def card_name(model_dir: str) -> str:
    """The model's name on its card: its folder's, or the run's for a run's `final` folder."""
    path = os.path.normpath(os.path.abspath(model_dir))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "final" else name


def write_model_card(model_dir: str, recipe: dict, reports: dict[str, dict], params: dict[str, int | None]) -> str:
    """Write README.md into `model_dir` (atomically), with no evaluation result yet (`llavadi eval` adds them)."""
    path = os.path.join(model_dir, CARD_FILE)
    _write_atomic(path, render_model_card(card_name(model_dir), recipe, reports, params))
    return path


def read_card_metadata(path: str) -> dict:
    """The YAML metadata of a model card ({} when there is no card or no metadata)."""
    if not os.path.isfile(path):
        return {}
    text = open(path, encoding="utf-8").read()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}
    try:
        meta = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed card metadata ({e})") from None
    return meta if isinstance(meta, dict) else {}


def _question_set(dataset: dict) -> str:
    """What was evaluated, in words: file, number of questions, digest (entries written before keying: '?')."""
    args = dataset.get("args") or {}
    if not args:
        return "?"
    return f"`{args.get('questions')}`, {args.get('count')} questions, sha256 `{str(args.get('sha256'))[:12]}`"


def _eval_body(model_index: list | None) -> str:
    rows = []
    for entry in model_index or []:
        for result in entry.get("results", []):
            dataset = result.get("dataset", {})
            for metric in result.get("metrics", []):
                rows.append(f"| {dataset.get('type') or dataset.get('name')} | {_question_set(dataset)} | "
                            f"{metric['name']} | {metric['value']} |")
    if not rows:
        return "Not evaluated yet: `llavadi eval --model <this folder> ...` adds its results here."
    return "\n".join(["| benchmark | questions (file, count, digest) | metric | value |", "|---|---|---|---|", *rows])


def _result_key(dataset: dict) -> tuple:
    """A card result's question set: benchmark, file digest and count (name only for entries without them)."""
    args = dataset.get("args") or {}
    return dataset.get("type") or dataset.get("name"), args.get("sha256"), args.get("count")


def record_eval_result(model_dir: str, result: dict) -> bool:
    """Put one `llavadi eval` result (its headline metrics) into the card; False when the folder has no
    llavadi card (a card someone else wrote is left alone). The result's `question_set` ({questions: file
    name, count, sha256}) keys the entry: the same set evaluated again is replaced, any other set is kept."""
    path = os.path.join(model_dir, CARD_FILE)
    meta = read_card_metadata(path)
    text = open(path, encoding="utf-8").read() if meta else ""
    if CARD_TAG not in (meta.get("tags") or []) or EVAL_START not in text or EVAL_END not in text:
        return False
    metrics = result["metrics"]
    names = [m for m in result.get("headline") or list(metrics)[:1] if m in metrics]
    questions = result.get("question_set") or {}
    label = f"{result['benchmark']} ({questions['questions']}, {questions['count']} questions)" if questions \
        else result["benchmark"]
    entry = {"task": {"type": "image-text-to-text"},
             "dataset": {"name": label, "type": result["benchmark"],
                         **({"args": dict(questions)} if questions else {})},
             "metrics": [{"type": m, "name": m, "value": metrics[m]} for m in names]}
    index = meta.get("model-index") or [{"name": card_name(model_dir), "results": []}]
    key = _result_key(entry["dataset"])
    results = [r for r in index[0].get("results", []) if _result_key(r.get("dataset", {})) != key]
    index[0]["results"] = results + [entry]
    meta["model-index"] = index
    body = text[text.index("\n---\n", 4) + len("\n---\n"):]
    head, rest = body.split(EVAL_START, 1)
    body = head + EVAL_START + "\n" + _eval_body(index) + "\n" + EVAL_END + rest.split(EVAL_END, 1)[1]
    _write_atomic(path, "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    return True
