"""What the up-front checks add to the start of a run, next to what the run does anyway.

On the demo's synthetic task (10,000 instruction samples, 48 px PNGs) with the tiny-student preset,
times side by side in one run:
  dataset build      `build_dataset` as the runner calls it after the models load (parse and
                     tokenize every sample; images cached already): the start-up cost without checks
  preflight, first   `llavadi.train.preflight.preflight` with an empty image cache: model files,
                     recipe, every sample parsed and tokenized, every image decoded, fingerprints
  preflight, rerun   the same with the image verdicts cached (a resumed or repeated run)
and prints the ratios to the dataset build.

    python benchmarks/preflight.py [--samples 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLAVADI_CACHE_DIR"] = os.path.join(tmp, "cache")
        from llavadi.data.synthetic import make_synthetic
        from llavadi.models.describe import describe_model
        from llavadi.recipe import recipe_from_dict
        from llavadi.train.preflight import preflight
        from llavadi.train.stage_inputs import build_dataset

        paths = make_synthetic(os.path.join(tmp, "data"), n_caption=10, n_instruct=args.samples, n_eval=10)
        recipe = recipe_from_dict({
            "student": {"preset": "tiny-student"}, "output_dir": os.path.join(tmp, "run"),
            "data": {"image_folder": str(paths["image_dir"])},
            "stages": [{"name": "finetune", "data": {"path": str(paths["instruct"])}, "train": {"max_steps": 1}}]})
        quiet = dict(log=lambda *_: None, progress=False)
        t0 = time.perf_counter()
        first = preflight(recipe, **quiet)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        preflight(recipe, **quiet)
        t_rerun = time.perf_counter() - t0
        student = describe_model(recipe.student)  # the tokenizer and config the loaded model has
        t0 = time.perf_counter()
        dataset = build_dataset(recipe.stages[0], student, None)
        t_build = time.perf_counter() - t0
    n_images = first["finetune"].identity["images"]
    print(f"{len(dataset)} samples, {n_images} images (48 px PNG), tiny-student tokenizer, {os.cpu_count()} CPUs\n")
    print("| step | seconds | x dataset build |\n|---|---|---|")
    for name, sec in (("dataset build (done by every run)", t_build), ("preflight, empty image cache", t_first),
                      ("preflight, cached image verdicts", t_rerun)):
        print(f"| {name} | {sec:.2f} | {sec / t_build:.2f} |")


if __name__ == "__main__":
    main()
