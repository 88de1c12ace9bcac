"""Shared fixtures: tiny tokenizer, tiny LLaVA models and images, all built offline."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

# no test touches the network: a hub id resolves from the local hub cache only (read when the hub
# client is first imported, so before anything imports transformers)
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# image verdicts (llavadi.data.images) are cached here, not in the user's ~/.cache; subprocesses inherit it
if "LLAVADI_CACHE_DIR" not in os.environ:
    os.environ["LLAVADI_CACHE_DIR"] = tempfile.mkdtemp(prefix="llavadi-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LLAVADI_CACHE_DIR"], ignore_errors=True)
# DeepSpeed compiles a small CPU communication op on its first run (~40 s); keep the build in the venv
# so later runs (and every test subprocess, which inherits this) reuse it
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

WORDS = (
    "USER ASSISTANT : what color shape is the in top left right bottom center middle how many "
    "are there a red green blue yellow circle square triangle yes no one two three four of "
    "describe image picture and , . ? ! 0 1 2 3 4 5 6 7 8 9 hello world cat dog"
).split()


def make_word_tokenizer():
    """A tiny word-level fast tokenizer with <s>, </s>, <pad>, <unk>, <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()


def make_tiny_llava(tokenizer, text_hidden=32, text_layers=2, heads=4, vision_hidden=32, vision_layers=2,
                    image_size=32, patch_size=16, seed=0):
    """A tiny random LlavaForConditionalGeneration matching the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg)


def make_image_processor(image_size=32):
    """A CLIP image processor for square images of `image_size`."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


@pytest.fixture()
def tiny_llava(word_tokenizer):
    return make_tiny_llava(word_tokenizer)


def write_images(folder, n=3, size=32):
    """n small solid-colour PNGs named img{i}.png."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i in range(n):
        Image.new("RGB", (size, size), colours[i % len(colours)]).save(os.path.join(folder, f"img{i}.png"))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


@torch.no_grad()
def plain_greedy_ids(model, eos_token_id, ids, pixel_values=None, max_new=8):
    """Reference greedy decoding: full forward each step, no cache, no padding, one sequence."""
    kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids + out]), **kwargs).logits[0, -1]
        logits[model.config.image_token_id] = -float("inf")  # generation never emits the placeholder
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos_token_id:
            break
    return out


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def only_teardown_abort(returncode: int, log: str, *written) -> bool:
    """True when a multi-process run failed only by gloo's abort at process exit ("terminate called
    without an active exception", rare but still seen after barrier + destroy_process_group) after
    every result was written; the results are then still checked in full by the caller."""
    return returncode != 0 and GLOO_TEARDOWN_ABORT in log and all(os.path.isfile(p) for p in written)


def probe_inputs() -> dict:
    """A fixed prompt with the tiny student's 4 image tokens, for comparing logits before and after saving."""
    tok = make_word_tokenizer()
    image = tok.convert_tokens_to_ids("<image>")
    ids = [tok.bos_token_id] + [image] * 4 + tok("what color is the square ?", add_special_tokens=False).input_ids
    return {"input_ids": [ids], "image_size": 32}


def final_logits(out, probe: dict) -> torch.Tensor:
    """Logits of the saved final/ student (plain from_pretrained) on the probe inputs."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "final"), local_files_only=True)
    size = probe["image_size"]
    with torch.no_grad():
        return model(input_ids=torch.tensor(probe["input_ids"]), pixel_values=torch.zeros(1, 3, size, size)).logits


class CrashAt(TrainerCallback):
    """Simulate a killed job: raise KeyboardInterrupt once training reaches step `at` (the checkpoints
    written before it stay)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")
