"""`llavadi ablate GRID.yaml`: one base recipe under a grid of variants and seeds -> a "what matters" table.

A grid file (YAML):

    recipe: demo_student.yaml          # the base recipe, relative to the grid file
    output_dir: runs/ablate-logits     # relative to the working directory, as a recipe's output_dir
    seeds: [0, 1, 2]                   # each run sets the recipe's `seed`
    baseline: ce                       # the variant the Δ columns compare against
    overrides: ["student.path=../runs/demo/student_sft-s{seed}/pretrain/model"]   # every variant (optional)
    metrics: [accuracy, agreement]     # table columns (optional; default the benchmark's headline metrics; or `all`)
    eval: {benchmark: synthetic, questions: q.jsonl, images: imgs, batch_size: 64, max_new_tokens: 8,
           teacher: true}              # teacher: true = the run's recipe teacher (adds agreement + KL), or a path
    variants:                          # name: [key=value overrides], the syntax of `llavadi train RECIPE key=value`
      ce: ["stages.finetune.distill.terms=[]"]
      fkl: ["stages.finetune.distill.terms=[{name: forward_kl}]"]
      three_stages: {recipe: other.yaml, overrides: [...]}   # a variant trained from another base recipe

`{seed}` in an override is replaced by the run's seed. Paths inside overrides resolve against the
variant's base recipe's folder (as with `llavadi train`); eval paths against the grid file's folder.
`llavadi ablate GRID --jobs 2` trains two cells at a time, each in its own one-thread process;
every start and end is logged with "run k of N, elapsed, time left".

Every (variant, seed) recipe is built and validated, and its inputs checked, before anything
trains. Run (variant, seed) trains into `<output_dir>/<variant>/seed<seed>` (`final/` = the
student, `eval/` = answers + metrics, `ablate_run.json` = the exact recipe it was trained with);
a run whose final model and eval result exist is not rerun, so an interrupted ablation resumes
(and a half-trained run resumes from its Trainer checkpoint). A cached run whose recorded recipe
differs from the grid's is an error, never silently reused. Outputs: `<output_dir>/results.json`,
`what_matters.md`, `what_matters.png` (with matplotlib).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import yaml

from llavadi.atomic import atomic_path, write_text_atomic
from llavadi.config import ConfigError, Recipe, recipe_to_dict
from llavadi.experiments.stats import mean_std, paired_t, significance_mark
from llavadi.recipe import load_recipe

RUN_RECORD = "ablate_run.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "what_matters.md"
PLOT_FILE = "what_matters.png"
GRID_KEYS = ("recipe", "output_dir", "seeds", "baseline", "eval", "variants", "overrides", "metrics")
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
GRID_SET_KEYS = ("output_dir", "seed")  # keys the grid owns; a variant may not override them


class GridError(ConfigError):
    """A grid file mistake; the message names the file and the variant or key."""


@dataclass
class EvalSpec:
    """How every trained student is evaluated (the arguments of `llavadi eval`)."""

    benchmark: str = ""
    questions: str = ""
    images: str | None = None
    annotations: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    limit: int | None = None
    teacher: bool | str = False  # True: the run's recipe teacher; a path: that model
    device: str | None = None  # None: the recipe's device
    dtype: str = "auto"


@dataclass
class Grid:
    """A parsed grid file; paths are absolute."""

    path: str
    recipe: str
    output_dir: str
    seeds: list[int]
    baseline: str
    variants: dict[str, list[str]]
    eval: EvalSpec
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] | str | None = None
    variant_recipes: dict[str, str] = field(default_factory=dict)  # variants trained from another base recipe

    def recipe_of(self, variant: str) -> str:
        """The base recipe a variant's overrides apply to."""
        return self.variant_recipes.get(variant, self.recipe)


@dataclass
class PlannedRun:
    """One (variant, seed) of a grid with its validated recipe."""

    variant: str
    seed: int
    overrides: list[str]
    recipe: Recipe

    @property
    def name(self) -> str:
        """`variant/seed<k>`."""
        return f"{self.variant}/seed{self.seed}"

    @property
    def run_dir(self) -> str:
        """Where the run trains (its recipe's output_dir)."""
        return self.recipe.output_dir

    @property
    def final_dir(self) -> str:
        """The trained student."""
        return os.path.join(self.run_dir, "final")

    @property
    def eval_dir(self) -> str:
        """Answers and metrics of the trained student."""
        return os.path.join(self.run_dir, "eval")


# ----------------------------------------------------------------------------- grid file

def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise GridError(f"{where}: {msg}")


def _str_list(value, where: str) -> list[str]:
    _expect(isinstance(value, list) and all(isinstance(v, str) for v in value), where,
            f"expected a list of 'key=value' strings, got {value!r}")
    for v in value:
        _expect("=" in v, where, f"override {v!r}: expected key=value")
    return list(value)


def _read_grid_file(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise GridError(f"{path}: cannot read grid ({e})") from e
    except yaml.YAMLError as e:
        raise GridError(f"{path}: invalid YAML ({e})") from e
    _expect(isinstance(raw, dict), path, "a grid file is a mapping with `recipe`, `variants`, ...")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    _expect(not unknown, path, f"unknown key(s) {unknown}; valid keys are {sorted(GRID_KEYS)}")
    for key in ("recipe", "output_dir", "baseline", "eval", "variants"):
        _expect(raw.get(key) not in (None, ""), path, f"missing `{key}`")
    _expect(isinstance(raw["recipe"], str), f"{path}: recipe", "expected a file path")
    _expect(isinstance(raw["output_dir"], str), f"{path}: output_dir", "expected a folder path")
    return raw


def _seeds(raw: dict, path: str) -> list[int]:
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
            f"{path}: seeds", f"expected a non-empty list of integers, got {seeds!r}")
    _expect(len(set(seeds)) == len(seeds), f"{path}: seeds", f"repeated seed in {seeds}")
    return seeds


def _variants(raw: dict, path: str, here) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per variant its overrides, and the variants that train another base recipe (`{recipe, overrides}`)."""
    variants = raw["variants"]
    _expect(isinstance(variants, dict) and variants, f"{path}: variants", "expected a mapping name: [overrides]")
    parsed: dict[str, list[str]] = {}
    recipes: dict[str, str] = {}
    for name, overrides in variants.items():
        where = f"{path}: variant {name!r}"
        _expect(isinstance(name, str) and VARIANT_NAME.fullmatch(name) is not None, where,
                "a variant name is a folder name: letters, digits, '_', '.', '+', '-'")
        if isinstance(overrides, dict):
            unknown = sorted(set(overrides) - {"recipe", "overrides"})
            _expect(not unknown and isinstance(overrides.get("recipe"), str), where,
                    "a variant is a list of overrides, or a mapping {recipe: FILE, overrides: [...]}")
            recipes[name] = here(overrides["recipe"])
            overrides = overrides.get("overrides")
        parsed[name] = _str_list(overrides if overrides is not None else [], where)
        for o in parsed[name]:
            key = o.partition("=")[0].strip()
            _expect(key not in GRID_SET_KEYS, where, f"override {o!r}: `{key}` is set by the grid "
                    f"({'`seeds`' if key == 'seed' else '`output_dir`'}), not by a variant")
    return parsed, recipes


def _eval_spec(ev, path: str, here) -> EvalSpec:
    """The grid's `eval` mapping checked; its paths resolved with `here`."""
    _expect(isinstance(ev, dict), f"{path}: eval", "expected a mapping (benchmark, questions, images, ...)")
    names = [f.name for f in EvalSpec.__dataclass_fields__.values()]
    unknown = sorted(set(ev) - set(names))
    _expect(not unknown, f"{path}: eval", f"unknown key(s) {unknown}; valid keys are {sorted(names)}")
    spec = EvalSpec(**ev)
    from llavadi.eval.benchmarks import BENCHMARKS

    _expect(spec.benchmark in BENCHMARKS, f"{path}: eval.benchmark",
            f"unknown benchmark {spec.benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    _expect(isinstance(spec.questions, str) and spec.questions != "", f"{path}: eval.questions",
            "the benchmark's question file is required")
    for key in ("batch_size", "max_new_tokens"):
        v = getattr(spec, key)
        _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{path}: eval.{key}",
                f"expected an integer >= 1, got {v!r}")
    _expect(spec.limit is None or (isinstance(spec.limit, int) and spec.limit >= 1), f"{path}: eval.limit",
            f"expected an integer >= 1, got {spec.limit!r}")
    _expect(isinstance(spec.teacher, (bool, str)), f"{path}: eval.teacher",
            "expected true (the recipe's teacher), false, or a model directory")
    spec.questions, spec.images, spec.annotations = here(spec.questions), here(spec.images), here(spec.annotations)
    if isinstance(spec.teacher, str):
        spec.teacher = here(spec.teacher)
    return spec


def load_grid(path: str) -> Grid:
    """Read and check a grid file (structure only; `plan_runs` validates every variant's recipe)."""
    raw = _read_grid_file(path)
    base = os.path.dirname(os.path.abspath(path))

    def here(p):
        return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    seeds = _seeds(raw, path)
    variants, variant_recipes = _variants(raw, path, here)
    baseline = raw["baseline"]
    _expect(baseline in variants, f"{path}: baseline", f"{baseline!r} is not a variant; variants are {list(variants)}")
    common = _str_list(raw.get("overrides") or [], f"{path}: overrides")
    spec = _eval_spec(raw["eval"], path, here)
    metrics = raw.get("metrics")
    _expect(metrics is None or metrics == "all" or
            (isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics)),
            f"{path}: metrics", f"expected a list of metric names or `all`, got {metrics!r}")
    return Grid(path=os.path.abspath(path), recipe=here(raw["recipe"]), output_dir=os.path.abspath(raw["output_dir"]),
                seeds=seeds, baseline=baseline, variants=variants, eval=spec, overrides=common, metrics=metrics,
                variant_recipes=variant_recipes)


def plan_runs(grid: Grid) -> list[PlannedRun]:
    """Every (variant, seed) with its recipe built and validated; errors name the variant."""
    runs = []
    for variant, variant_overrides in grid.variants.items():
        for seed in grid.seeds:
            overrides = [o.replace("{seed}", str(seed)) for o in grid.overrides + variant_overrides]
            try:
                recipe = load_recipe(grid.recipe_of(variant), overrides + [f"seed={seed}"])
            except ConfigError as e:
                raise GridError(f"{grid.path}: variant {variant!r} (seed {seed}): {e}") from None
            recipe.output_dir = os.path.join(grid.output_dir, variant, f"seed{seed}")
            run = PlannedRun(variant, seed, overrides, recipe)
            if grid.eval.teacher is True and (recipe.teacher is None or not recipe.teacher.path):
                raise GridError(f"{grid.path}: variant {variant!r}: eval.teacher is true but the recipe has no "
                                "`teacher.path` to evaluate against; give eval.teacher a model directory")
            runs.append(run)
    return runs


def _teacher_dir(grid: Grid, run: PlannedRun) -> str | None:
    if grid.eval.teacher is True:
        return run.recipe.teacher.path
    return grid.eval.teacher or None


def missing_inputs(grid: Grid, runs: list[PlannedRun]) -> list[str]:
    """Input files and folders the runs need that do not exist, each named once with who needs it."""
    needed: dict[tuple[str, str], list[str]] = {}

    def need(what, p, who):
        if p and not os.path.exists(p):
            needed.setdefault((what, p), []).append(who)

    for run in runs:
        r = run.recipe
        for role, spec in (("student", r.student), ("teacher", r.teacher)):
            if spec is not None:
                for key in ("path", "vision", "llm"):
                    need(f"{role}.{key}", getattr(spec, key), run.name)
        for s in r.stages:
            need(f"stages.{s.name}.data.path", s.data.path, run.name)
            need(f"stages.{s.name}.data.image_folder", s.data.image_folder, run.name)
        if isinstance(grid.eval.teacher, str):
            need("eval.teacher", grid.eval.teacher, run.name)
    for key in ("questions", "images", "annotations"):
        if runs:  # cached runs need no evaluation inputs
            need(f"eval.{key}", getattr(grid.eval, key), "eval")
    out = []
    for (what, p), who in needed.items():
        users = ", ".join(who[:3]) + (f" and {len(who) - 3} more" if len(who) > 3 else "")
        out.append(f"{what} {p} does not exist (needed by {users})")
    return out


# ----------------------------------------------------------------------------- cache

def _eval_settings(grid: Grid, run: PlannedRun) -> dict:
    settings = asdict(grid.eval)
    settings["teacher"] = _teacher_dir(grid, run)
    settings["device"] = grid.eval.device or run.recipe.device
    return settings


def _recipe_record(run: PlannedRun) -> dict:
    # through JSON so the stored and the fresh record compare equal (tuples -> lists)
    return json.loads(json.dumps(recipe_to_dict(run.recipe)))


def _read_record(run: PlannedRun) -> dict | None:
    p = os.path.join(run.run_dir, RUN_RECORD)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def _write_record(run: PlannedRun, record: dict) -> None:
    write_text_atomic(os.path.join(run.run_dir, RUN_RECORD), json.dumps(record, indent=2))


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def check_cache(grid: Grid, runs: list[PlannedRun]) -> None:
    """Raise if a run folder holds a run trained with another recipe (never reuse it silently)."""
    for run in runs:
        record = _read_record(run)
        if record is None:
            continue
        old, new = _flatten(record.get("recipe", {})), _flatten(_recipe_record(run))
        diff = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in diff[:4])
            raise GridError(f"{grid.path}: variant {run.variant!r} (seed {run.seed}): {run.run_dir} was trained with "
                            f"another recipe ({shown}{' ...' if len(diff) > 4 else ''}); delete that folder to "
                            "retrain it, or give the grid another output_dir")


def _result_path(grid: Grid, run: PlannedRun) -> str:
    return os.path.join(run.eval_dir, f"{grid.eval.benchmark}.json")


def run_status(grid: Grid, run: PlannedRun) -> str:
    """'done' (trained and evaluated), 'eval' (trained, eval missing or stale), 'resume' (checkpoints), 'todo'."""
    trained = os.path.isfile(os.path.join(run.final_dir, "config.json"))
    if trained:
        record = _read_record(run) or {}
        if os.path.isfile(_result_path(grid, run)) and record.get("eval") == _eval_settings(grid, run):
            return "done"
        return "eval"
    has_ckpt = any(os.path.isdir(os.path.join(run.run_dir, s.name, "checkpoints")) or
                   os.path.isdir(os.path.join(run.run_dir, s.name, "model")) for s in run.recipe.stages)
    return "resume" if has_ckpt else "todo"


# ----------------------------------------------------------------------------- running

def train_and_eval(grid: Grid, run: PlannedRun, log) -> dict:
    """Train and evaluate one run as needed; returns {'trained': bool, 'evaluated': bool, 'seconds': ...}."""
    from llavadi.eval.eval_command import evaluate
    from llavadi.train.runner import run_recipe

    status = run_status(grid, run)
    done = {"trained": False, "evaluated": False}
    if status == "done":
        log(f"[{run.name}] cached: {run.run_dir}")
        return done
    record = {"variant": run.variant, "seed": run.seed, "overrides": run.overrides, "recipe": _recipe_record(run)}
    if status in ("todo", "resume"):
        _write_record(run, record)  # before training: an interrupted run is checked against it on resume
        log(f"[{run.name}] training ({'resuming' if status == 'resume' else 'from the start'}) into {run.run_dir}")
        t0 = time.time()
        run_recipe(run.recipe, resume=True, log=lambda *a: log(f"[{run.name}] " + " ".join(map(str, a))), quiet=True)
        done["trained"], done["train_seconds"] = True, round(time.time() - t0, 1)
        gc.collect()
    settings = _eval_settings(grid, run)
    log(f"[{run.name}] evaluating on {grid.eval.benchmark}")
    t0 = time.time()
    evaluate(run.final_dir, grid.eval.benchmark, grid.eval.questions, grid.eval.images, run.eval_dir,
             teacher_dir=settings["teacher"], annotations=grid.eval.annotations, batch_size=grid.eval.batch_size,
             max_new_tokens=grid.eval.max_new_tokens, device=settings["device"], dtype=grid.eval.dtype,
             limit=grid.eval.limit, name=f"{run.variant}-seed{run.seed}", progress=False)
    done["evaluated"], done["eval_seconds"] = True, round(time.time() - t0, 1)
    gc.collect()
    _write_record(run, {**record, "eval": settings})
    return done


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _columns(grid: Grid, results: list[dict]) -> list[str]:
    if not results:
        return []
    if isinstance(grid.metrics, list):
        present = {k for r in results for k in _numeric(r["metrics"])}
        unknown = [m for m in grid.metrics if m not in present]
        if unknown:
            raise GridError(f"{grid.path}: metrics: {unknown} not in the results; available: {sorted(present)}")
        return list(grid.metrics)
    if grid.metrics == "all":
        cols: list[str] = []
        for r in results:
            cols += [k for k in _numeric(r["metrics"]) if k not in cols and not k.startswith("teacher/")]
        return cols
    headline = results[0].get("headline") or list(results[0]["metrics"])[:1]
    return [m for m in headline if m in _numeric(results[0]["metrics"])]


def _selected_runs(grid: Grid, runs: list[PlannedRun], only: list[str] | None) -> list[PlannedRun]:
    if only:
        unknown = [v for v in only if v not in grid.variants]
        if unknown:
            raise GridError(f"{grid.path}: --only {unknown}: no such variant; variants are {list(grid.variants)}")
    return [r for r in runs if not only or r.variant in only]


def execute_runs(grid: Grid, todo: list[PlannedRun], log=print, jobs: int = 1) -> dict[str, dict]:
    """Train + evaluate the runs not done, `jobs` at a time; per run name, what was done and how long it took.

    Progress (run k of N, elapsed, time left) is logged as each run starts and ends. `jobs` > 1
    runs cells in worker processes of one thread each (`llavadi.experiments.cells`); 1 runs
    them here, one after the other.
    """
    from llavadi.experiments.cells import run_parallel
    from llavadi.experiments.progress import Progress

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    cores = os.cpu_count() or 1
    if jobs > cores:  # more one-thread processes than cores only slows every one of them down
        log(f"--jobs {jobs} > {cores} CPU core(s): running {cores} at a time")
        jobs = cores
    # decided before anything runs: a cell's status changes as it runs
    activity = {r.name: {"trained": run_status(grid, r) in ("todo", "resume"), "evaluated": True} for r in todo}
    progress = Progress(len(todo), jobs)
    if jobs > 1 and len(todo) > 1:
        for name, seconds in run_parallel(grid.path, todo, jobs, progress, log).items():
            activity[name]["seconds"] = seconds
        return activity
    for run in todo:
        k, t0 = progress.start(), time.monotonic()
        log(f"[{progress.line(k)}] {run.name}: started")
        activity[run.name] = train_and_eval(grid, run, log)
        progress.finish(time.monotonic() - t0)
        activity[run.name]["seconds"] = round(time.monotonic() - t0, 1)
        log(f"[{progress.line(k)}] {run.name}: done in {time.monotonic() - t0:.0f}s")
    return activity


def _collect(grid: Grid, runs: list[PlannedRun], activity: dict[str, dict], log) -> tuple[list[dict], list[dict]]:
    """Per-run records (metrics from each run's result file) and the result dicts, in grid order."""
    records, results = [], []
    for run in runs:
        if run_status(grid, run) != "done":
            log(f"[{run.name}] not run (not in --only, no cached result)")
            continue
        with open(_result_path(grid, run)) as f:
            result = json.load(f)
        results.append(result)
        done = activity.get(run.name, {"trained": False, "evaluated": False})
        records.append({"variant": run.variant, "seed": run.seed, "run_dir": run.run_dir, "model": run.final_dir,
                        "overrides": run.overrides, "metrics": result["metrics"], **done})
    return records, results


def run_ablation(grid: Grid, log=print, only: list[str] | None = None, jobs: int = 1) -> dict:
    """Validate the whole grid, train + evaluate every missing run, write results, table and plot.

    `only`: train/evaluate just these variants; cached runs of the others still enter the table.
    `jobs`: runs trained at once (worker processes of one thread each when > 1).
    Returns the summary (see `summarise`) with `runs` (per-run metrics) and `files`.
    """
    runs = plan_runs(grid)
    selected = _selected_runs(grid, runs, only)
    check_cache(grid, runs)
    todo = [r for r in selected if run_status(grid, r) != "done"]
    missing = missing_inputs(grid, todo)
    if missing:
        raise GridError(f"{grid.path}: missing inputs, nothing trained:\n  " + "\n  ".join(missing))
    log(f"ablation {grid.path}: {len(grid.variants)} variant(s) x {len(grid.seeds)} seed(s) -> {grid.output_dir}; "
        f"{len(todo)} run(s) to do, {len(selected) - len(todo)} cached" + (f", {jobs} at a time" if jobs > 1 else ""))
    t_start = time.time()
    activity = execute_runs(grid, todo, log, jobs)
    records, results = _collect(grid, runs, activity, log)
    summary = summarise(records, grid.baseline, _columns(grid, results), variant_order=list(grid.variants))
    summary["runs"] = records
    summary["files"] = _write_outputs(grid, summary, round(time.time() - t_start, 1), log)
    return summary


def _write_outputs(grid: Grid, summary: dict, wall_seconds: float, log) -> dict:
    """results.json, what_matters.md and what_matters.png of a grid; returns their paths."""
    os.makedirs(grid.output_dir, exist_ok=True)
    files = {"results": os.path.join(grid.output_dir, RESULTS_FILE),
             "table": os.path.join(grid.output_dir, TABLE_FILE),
             "plot": os.path.join(grid.output_dir, PLOT_FILE)}
    table = format_table(summary)
    write_text_atomic(files["table"], _markdown_page(grid, summary, table))
    if plot(summary, files["plot"]) is None:
        summary["notes"].append("no plot: matplotlib is not installed (pip install 'llavadi[plots]')")
        files["plot"] = None
    grid_info = {**asdict(grid), "eval": asdict(grid.eval)}
    out = {"grid": grid_info, "runs": summary["runs"],
           "summary": {k: v for k, v in summary.items() if k not in ("runs", "files")},
           "wall_seconds": wall_seconds}
    write_text_atomic(files["results"], json.dumps(out, indent=2))
    log(table)
    for note in summary["notes"]:
        log(f"note: {note}")
    log(f"wrote {files['results']}, {files['table']}" + (f", {files['plot']}" if files["plot"] else ""))
    return files


# ----------------------------------------------------------------------------- summary, table, plot

def summarise(runs: list[dict], baseline: str, columns: list[str] | None = None,
              variant_order: list[str] | None = None) -> dict:
    """Per variant and metric: mean and sample std over seeds, and Δ to the baseline paired by seed.

    `runs`: dicts with `variant`, `seed`, `metrics`. Δ = mean over the seeds both have of
    (variant − baseline), with the sample std of those paired differences and the paired t-test
    (`t`, `df`, two-sided `p`; see `stats.paired_t`); with every seed present Δ equals the
    difference of the means.
    """
    order = list(variant_order or [])
    order += [r["variant"] for r in runs if r["variant"] not in order]
    by_variant: dict[str, dict[int, dict[str, float]]] = {}
    for r in runs:
        per_seed = by_variant.setdefault(r["variant"], {})
        if r["seed"] in per_seed:
            raise ValueError(f"two runs for variant {r['variant']!r} seed {r['seed']}")
        per_seed[r["seed"]] = _numeric(r["metrics"])
    notes = []
    if baseline not in by_variant:
        notes.append(f"baseline {baseline!r} has no results: no Δ")
    variants: dict[str, dict] = {}
    for name in order:
        if name not in by_variant:
            notes.append(f"variant {name!r} has no results")
            continue
        seeds = by_variant[name]
        metric_names = [k for m in seeds.values() for k in m]
        entry = {"seeds": sorted(seeds), "metrics": {}}
        for metric in dict.fromkeys(metric_names):
            values = {s: m[metric] for s, m in seeds.items() if metric in m}
            stats = {**mean_std(list(values.values())), "values": {str(s): v for s, v in sorted(values.items())}}
            base = by_variant.get(baseline, {})
            common = sorted(s for s in values if metric in base.get(s, {}))
            if name != baseline and common:
                stats["delta"] = paired_t([values[s] for s in common], [base[s][metric] for s in common])
            entry["metrics"][metric] = stats
        variants[name] = entry
    expected = max((len(v["seeds"]) for v in variants.values()), default=0)
    for name, v in variants.items():
        if len(v["seeds"]) < expected:
            notes.append(f"variant {name!r}: {len(v['seeds'])} of {expected} seeds")
    if columns is None:
        columns = list(dict.fromkeys(k for v in variants.values() for k in v["metrics"]))
    return {"baseline": baseline, "columns": list(columns), "variants": variants, "notes": notes}


def _decimals(values: list[float], spreads: list[float]) -> int:
    """2 decimals (3 below 1), more when needed to show 2 significant digits of the smallest spread or Δ."""
    digits = 3 if values and max(abs(v) for v in values) < 1 else 2
    small = [abs(x) for x in spreads if x and math.isfinite(x)]
    if small:
        digits = max(digits, 1 - math.floor(math.log10(min(small))))
    return min(digits, 6)


def format_table(summary: dict, columns: list[str] | None = None) -> str:
    """Markdown "what matters" table: one row per variant, `metric` (mean ± std) and `Δ metric` columns."""
    columns = list(columns or summary["columns"])
    variants, baseline = summary["variants"], summary["baseline"]
    header = ["variant", "seeds"]
    for c in columns:
        header += [c, f"Δ {c}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = {}
    for c in columns:
        stats = [v["metrics"][c] for v in variants.values() if c in v["metrics"]]
        spreads = [m["std"] for m in stats] + [x for m in stats if "delta" in m for x in (m["delta"]["mean"], m["delta"]["std"])]
        digits[c] = _decimals([m["mean"] for m in stats], spreads)
    for name, v in variants.items():
        cells = [f"**{name}** (baseline)" if name == baseline else name, str(len(v["seeds"]))]
        for c in columns:
            m, d = v["metrics"].get(c), digits[c]
            if m is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{m['mean']:.{d}f}" + (f" ± {m['std']:.{d}f}" if m["n"] > 1 else ""))
            if name == baseline:
                cells.append("—")
            elif "delta" in m:
                dm = m["delta"]
                cells.append(f"{dm['mean']:+.{d}f}" + (f" ± {dm['std']:.{d}f}" if dm["n"] > 1 else "")
                             + significance_mark(dm.get("p")))
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"mean ± sample std over seeds; Δ = variant − `{baseline}`, paired by seed "
                  "(± the sample std of the per-seed differences); * p < 0.05, ** p < 0.01 (two-sided "
                  "paired t-test over seeds)."]
    return "\n".join(lines) + "\n"


def _markdown_page(grid: Grid, summary: dict, table: str) -> str:
    lines = [f"# What matters: {os.path.basename(grid.path)}", "",
             f"Base recipe `{grid.recipe}`, seeds {grid.seeds}, benchmark `{grid.eval.benchmark}` "
             f"(`{grid.eval.questions}`).", "", table, "## Variants", "", "| variant | overrides |", "|---|---|"]
    for name, overrides in grid.variants.items():
        shown = "<br>".join(f"`{o}`" for o in overrides) or "(the base recipe)"
        if name in grid.variant_recipes:
            shown = f"recipe `{grid.variant_recipes[name]}`" + ("<br>" + shown if overrides else "")
        lines.append(f"| {name} | {shown} |")
    if grid.overrides:
        lines += ["", "Every variant also: " + ", ".join(f"`{o}`" for o in grid.overrides)]
    for note in summary["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


PLOT_WIDTH_INCHES, PLOT_DPI = 9.6, 100  # 960 px wide: readable at a docs page's width


def plot(summary: dict, path: str, columns: list[str] | None = None) -> str | None:
    """Mean ± std per variant and metric, metrics side by side (baseline red, dashed); None without matplotlib.

    Variant names label the rows once, on the left; the figure is 960 px wide whatever the number of
    variants or metrics (its height grows with the variants).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    columns = list(columns or summary["columns"])
    names = list(summary["variants"])
    if not columns or not names:
        return None
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is untouched
    fig = Figure(figsize=(PLOT_WIDTH_INCHES, 1.3 + 0.3 * len(names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(columns), squeeze=False, sharey=True)[0]
    baseline = summary["baseline"]
    rows = range(len(names))
    for ax, c in zip(axes, columns):
        stats = [summary["variants"][n]["metrics"].get(c) for n in names]
        means = [s["mean"] if s else math.nan for s in stats]
        stds = [s["std"] if s else 0.0 for s in stats]
        colours = ["#c44e52" if n == baseline else "#4c72b0" for n in names]
        for row, m, sd, colour in zip(rows, means, stds, colours):  # a dot plot: the axis need not start at 0
            ax.errorbar([m], [row], xerr=[sd], fmt="o", ms=5, capsize=3, color=colour, lw=1)
        if baseline in summary["variants"] and summary["variants"][baseline]["metrics"].get(c):
            ax.axvline(summary["variants"][baseline]["metrics"][c]["mean"], color="#c44e52", ls="--", lw=1)
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.04)
    axes[0].set_yticks(list(rows))
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()  # the grid's order, top to bottom
    fig.suptitle(f"mean ± std over seeds (baseline {baseline}: red, dashed line)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    return path


# ----------------------------------------------------------------------------- command line

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ablate` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("ablate", help="run a recipe under a grid of variants and seeds; 'what matters' table")
    p.add_argument("grid", help="grid YAML (recipe, output_dir, seeds, baseline, eval, variants)")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="train/evaluate only these variants (cached runs of the others stay in the table)")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and list the runs; train nothing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; with --jobs > 1: 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with one thread (default 1: in this process)")
    p.set_defaults(func=run_ablate_command)


def run_ablate_command(args: argparse.Namespace) -> int:
    """The `ablate` subcommand."""
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.experiments.cells import CellFailure

    try:
        grid = load_grid(args.grid)
        if args.dry_run:
            return _dry_run(grid, args.only)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.jobs < 1:
            raise GridError(f"--jobs must be >= 1, got {args.jobs}")
        run_ablation(grid, only=args.only, jobs=args.jobs)
    except (ConfigError, EvalDataError) as err:  # GridError is a ConfigError
        print(f"llavadi ablate: error: {err}", file=sys.stderr)
        return 2
    except CellFailure as err:
        print(f"llavadi ablate: {err}", file=sys.stderr)
        return 1
    return 0


def _dry_run(grid: Grid, only: list[str] | None) -> int:
    runs = _selected_runs(grid, plan_runs(grid), only)
    check_cache(grid, runs)
    print(f"grid {grid.path}: base recipe {grid.recipe}; {len(runs)} run(s) -> {grid.output_dir}")
    for run in runs:
        print(f"  {run_status(grid, run):6s} {run.name:24s} {' '.join(run.overrides) or '(base recipe)'}")
    print("status: done = cached, eval = trained (evaluation to do), resume = partly trained, todo = to train")
    missing = missing_inputs(grid, [r for r in runs if run_status(grid, r) != "done"])
    if missing:
        print("NOT READY, missing inputs:\n  " + "\n  ".join(missing))
        return 1
    print("all recipes valid, inputs present")
    return 0
