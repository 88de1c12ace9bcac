"""An exported GGUF model run by llama.cpp through llama-cpp-python, prompted exactly as llavadi prompts.

The prompt token ids come from llavadi's own encoder (the model's template and tokenizer), so the
exported model sees the ids its HF original sees. The text around the image goes through
`Llama.eval`; the image goes through llama.cpp's multimodal library (mtmd: its CLIP encoder and
projector from the `mmproj` file), whose embeddings are decoded at the image tokens' positions,
as llama-cpp-python's own LLaVA chat handler does. The image llama.cpp receives is the one the
HF image processor would crop: padded to a square with the processor's mean colour (when the
model was trained so), resized and centre-cropped to the tower's size by the processor's own
PIL resize, so llama.cpp's resize is a copy; its normalisation (mean, std) then matches.
Answers are greedy, the image token suppressed, cut after the first eos, as in HF evaluation.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llavadi.models.build import LoadedModel

EXPORT_FILE = "export.json"  # the manifest llavadi.export.gguf_target writes
EXPORT_KIND = "llavadi-export"


class ExportedModelError(ValueError):
    """An exported model folder or file that cannot be run; the message names it and what is wrong."""


def find_export(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """(export folder, variant file name or None) when `path` is an export folder or one of its model files."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_FILE)):
        return path, None
    folder = os.path.dirname(os.path.abspath(path))
    if path.endswith(".gguf") and os.path.isfile(os.path.join(folder, EXPORT_FILE)):
        return folder, os.path.basename(path)
    return None


def read_manifest(folder: str) -> dict:
    """The export manifest of `folder`, checked for the fields the runtime reads."""
    path = os.path.join(folder, EXPORT_FILE)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("kind") != EXPORT_KIND or manifest.get("target") != "gguf":
        raise ExportedModelError(f"{path}: not a llavadi GGUF export (kind {manifest.get('kind')!r}, "
                                 f"target {manifest.get('target')!r})")
    return manifest


def _variant(folder: str, manifest: dict, file_name: str | None) -> tuple[str, dict]:
    variants = manifest["variants"]
    if file_name is None:
        if len(variants) != 1:
            raise ExportedModelError(f"{folder} holds {len(variants)} variants ({', '.join(variants)}); name one: "
                                     f"--model {os.path.join(folder, next(iter(variants.values()))['model'])}")
        return next(iter(variants.items()))
    for name, variant in variants.items():
        if variant["model"] == file_name:
            return name, variant
    raise ExportedModelError(f"{os.path.join(folder, file_name)} is not a variant of the export in {folder} "
                             f"(it has {', '.join(v['model'] for v in variants.values())})")


class GgufRuntime:
    """A GGUF language model + mmproj loaded in llama.cpp, answering prompts given as token ids.

    It stands where a LoadedModel's torch model stands (`config`, `generation_config`,
    `training`, `eval()`/`train()` as no-ops), and answers with `answer_prompts`.
    """

    training = False

    def __init__(self, model_path: str, mmproj_path: str, config, generation_config, threads: int = 1,
                 n_ctx: int = 0, quant: str = ""):
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp import Llama

        self.config, self.generation_config, self.quant = config, generation_config, quant
        self.model_path, self.mmproj_path = model_path, mmproj_path
        self._mtmd = mtmd
        n_ctx = n_ctx or int(config.text_config.max_position_embeddings)
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        from llama_cpp._logger import llama_log_callback

        # mtmd's log lines (model loading, one per image encoded) go through llama-cpp-python's logger,
        # which prints errors only unless verbose, as it does for llama.cpp's own
        mtmd.mtmd_helper_log_set(llama_log_callback, None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False
        self._ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), self.llm.model, params)
        if not self._ctx:
            raise ExportedModelError(f"llama.cpp could not load {mmproj_path} for {model_path}")
        self.llm._stack.callback(self._free_mtmd)  # freed with the model, before it (as llama-cpp-python's handler)
        self._marker = mtmd.mtmd_default_marker()

    def eval(self):
        """No-op (a llama.cpp model has no training mode)."""
        return self

    def train(self, mode: bool = True):
        """No-op (a llama.cpp model has no training mode)."""
        return self

    def _free_mtmd(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        """Free the multimodal context and the model."""
        self.llm.close()

    def _image_chunks(self, image: Image.Image):
        """llama.cpp's input chunks of one RGB image (its own tokenizer never sees llavadi's text)."""
        mtmd = self._mtmd
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text = self._marker
        text.text_len = len(self._marker)
        text.add_special = False
        text.parse_special = True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            code = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if code != 0:
                raise ExportedModelError(f"llama.cpp could not take the image (mtmd_tokenize returned {code})")
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _eval_image(self, image: Image.Image, n_image_tokens: int) -> None:
        """Decode one image's embeddings at the next positions (llama.cpp's CLIP + projector)."""
        mtmd = self._mtmd
        chunks = self._image_chunks(image)
        try:
            found = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    found.append(chunk)
            (chunk,) = found
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if n != n_image_tokens:
                raise ExportedModelError(f"llama.cpp gives {n} image embeddings; the prompt holds {n_image_tokens} "
                                         "image tokens")
            new_n_past = ctypes.c_int32(0)
            code = mtmd.mtmd_helper_eval_chunk_single(self._ctx, self.llm._ctx.ctx, chunk, self.llm.n_tokens, 0,
                                                       self.llm.n_batch, True, ctypes.byref(new_n_past))
            if code != 0:
                raise ExportedModelError(f"llama.cpp could not decode the image (error {code})")
            self.llm.n_tokens = new_n_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The projected embeddings (image tokens x text width) llama.cpp's mtmd computes for one image."""
        mtmd = self._mtmd
        chunks = self._image_chunks(image)
        try:
            chunk = next(c for c in (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))
                         if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            code = mtmd.mtmd_encode_chunk(self._ctx, chunk)
            if code != 0:
                raise ExportedModelError(f"llama.cpp could not encode the image (mtmd_encode_chunk returned {code})")
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            width = self.llm.n_embd()
            out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self._ctx), shape=(n * width,))
            return out.reshape(n, width).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _last_logits(self) -> np.ndarray:
        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def answer(self, prompt: list[int], image: Image.Image | None, max_new_tokens: int, eos_ids: list[int],
               image_token_id: int) -> tuple[list[int], float]:
        """Greedy answer ids of one prompt (cut after the first eos) and the seconds to its first token."""
        start = time.perf_counter()
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        positions = [i for i, t in enumerate(prompt) if t == image_token_id]
        if positions and image is None:
            raise ExportedModelError("the prompt holds image tokens but no image was given")
        if positions:
            first, last = positions[0], positions[-1]
            if last - first + 1 != len(positions):
                raise ExportedModelError("the prompt's image tokens are not one run (one image per prompt)")
            if first:
                self.llm.eval(prompt[:first])
            self._eval_image(image, len(positions))
            rest = prompt[last + 1:]
        else:
            rest = prompt
        if rest:
            self.llm.eval(rest)
        answer, first_token_seconds = [], 0.0
        for step in range(max_new_tokens):
            logits = self._last_logits().copy()
            logits[image_token_id] = -np.inf  # an image placeholder in an answer has no image behind it
            token = int(np.argmax(logits))
            if step == 0:
                first_token_seconds = time.perf_counter() - start
            answer.append(token)
            if token in eos_ids or step == max_new_tokens - 1:
                break
            self.llm.eval([token])
        return answer, first_token_seconds

    def answer_prompts(self, prompts: list[list[int]], images: list[Image.Image | None], max_new_tokens: int,
                       eos_ids: list[int], image_token_id: int) -> list[list[int]]:
        """Greedy answer ids of prompts (one image or none each), one at a time: llama.cpp runs batch 1."""
        return [self.answer(p, img, max_new_tokens, eos_ids, image_token_id)[0] for p, img in zip(prompts, images)]


def runtime_image(bundle: LoadedModel, image: Image.Image) -> Image.Image:
    """The RGB image the HF processor would normalise: square-padded (if so trained), resized, centre-cropped."""
    from llavadi.data.dataset import expand_to_square, square_fill

    processor = bundle.image_processor
    image = image.convert("RGB")
    if bundle.pad_to_square:
        image = expand_to_square(image, square_fill(processor))
    side = int(bundle.model.config.vision_config.image_size)
    if image.size == (side, side):
        return image
    pixels = processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"][0]
    return Image.fromarray(np.clip(np.rint(pixels.transpose(1, 2, 0)), 0, 255).astype(np.uint8))


@dataclass
class ExportedModel(LoadedModel):
    """A LoadedModel whose `model` is a GgufRuntime: llavadi's prompts, llama.cpp's computation."""

    quant: str = ""
    files: tuple = ()  # the files a run of this variant reads (its size on disk)

    def answer_prompts(self, prompts, images, max_new_tokens: int, eos_ids, image_token_id: int):
        """Greedy answer ids; images as the HF processor would crop them (see `runtime_image`)."""
        images = [None if img is None else runtime_image(self, img) for img in images]
        return self.model.answer_prompts(prompts, images, max_new_tokens, eos_ids, image_token_id)


def load_exported(path: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """An exported model (an export folder with one variant, or one of its `model-*.gguf` files), loaded."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, GenerationConfig

    from llavadi.models.meta import read_model_meta

    found = find_export(path)
    if found is None:
        raise ExportedModelError(f"{path}: not a llavadi export (no {EXPORT_FILE} beside it)")
    folder, file_name = found
    manifest = read_manifest(folder)
    quant, variant = _variant(folder, manifest, file_name)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise ImportError("running a GGUF export needs llama-cpp-python: pip install 'llavadi[export]'") from e
    config = AutoConfig.from_pretrained(folder)
    generation_config = GenerationConfig.from_pretrained(folder)
    threads = threads or int(os.environ.get("LLAVADI_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1)
    runtime = GgufRuntime(os.path.join(folder, variant["model"]), os.path.join(folder, variant["mmproj"]), config,
                          generation_config, threads=threads, quant=quant)
    files = (os.path.join(folder, variant["model"]), os.path.join(folder, variant["mmproj"]))
    return ExportedModel(runtime, AutoTokenizer.from_pretrained(folder),
                         AutoImageProcessor.from_pretrained(folder), read_model_meta(folder, config),
                         source=folder, quant=quant, files=files)


def load_export_prompter(path: str | os.PathLike) -> LoadedModel:
    """An export's tokenizer, image processor, config and prompt settings, without loading a model.

    Its `encoder()` encodes prompts exactly as the exported model's `load_exported` bundle does;
    `model` holds only `config` and `generation_config`.
    """
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, GenerationConfig

    from llavadi.models.meta import read_model_meta

    found = find_export(path)
    if found is None:
        raise ExportedModelError(f"{path}: not a llavadi export (no {EXPORT_FILE} beside it)")
    folder = found[0]
    config = AutoConfig.from_pretrained(folder)
    model = SimpleNamespace(config=config, generation_config=GenerationConfig.from_pretrained(folder))
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                       read_model_meta(folder, config), source=folder)


def read_tokens_as_llama_cpp(vision_tower, position_order: str = "hf") -> None:
    """Make a HF CLIP tower read its tokens as llama.cpp's LLaVA graph does, in place: [patches, CLS] + table rows 0..n.

    llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp; ggml-org/llama.cpp issue 25814) appends the
    class embedding after the patches while it adds the position table's rows 0..n in order and keeps
    rows 1..n. With the HF table (`position_order` "hf") every patch gets its neighbour's position
    embedding; with the table the export writes "rotated" (`gguf_files.position_table`) each token
    gets its own. Either way patch 0 is dropped and the CLS output becomes the last image token. A HF
    model patched so computes what the exported files compute: it separates that runtime defect from
    conversion and quantization in tests and benchmarks.
    """
    import torch

    from llavadi.export.gguf_files import position_table

    tower = getattr(vision_tower, "vision_model", vision_tower)
    emb = tower.embeddings
    position_table(emb.position_embedding.weight[:2], position_order)  # an unknown order is refused here

    def forward(pixel_values, interpolate_pos_encoding=False):
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([patches, cls], 1) + position_table(emb.position_embedding.weight, position_order)[None]

    emb.forward = forward
