"""Vision-language SFT on a tiny random-init LLaVA built at test time (distft/models/vlm_tiny.py):
image chat rows (image and image_url parts) through the model's processor, assistant-only labels,
freezing, LoRA on the language model only, packing refused; one 2-rank FSDP2 run (full tuning,
vision tower frozen) on a generated colour task whose held-out exact match rises, exported and
reloaded in a fresh process with AutoModelForImageTextToText + AutoProcessor; and a LoRA adapter
export reloaded the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import torch

from distft.data import vision
from distft.data.schemas import to_canonical
from distft.data.sft_format import IGNORE
from distft.errors import ConfigError, DataError
from distft.models import vlm
from distft.models.vlm_tiny import build_tiny_vlm, write_shapes_task
from tests.util import REPO, env, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    model = build_tiny_vlm(root / "model")
    data = write_shapes_task(root / "shapes", 160)
    return NS(model=model, data=data, root=root)


def _cfg(**model) -> NS:
    m = NS(**{"trust_remote_code": False, "freeze_vision": True, "freeze_projector": False, **model})
    return NS(data=NS(packing=False, max_length=64), model=m, method=NS(train_on_prompt=False))


def _canonical(path, n=None):
    rows = [json.loads(line) for line in open(path)][:n]
    return to_canonical(rows, "auto", {}, "sft", "sft")[0]


@pytest.mark.quick
def test_image_rows_encode_with_assistant_only_labels(tiny):
    tok = vlm.processor_tokenizer(str(tiny.model), _cfg())
    proc = tok.processor
    rows = _canonical(tiny.data, 4)  # rows 0, 2: image_url with file://; rows 1, 3: image with path
    assert all(vision.has_images(r) for r in rows)
    examples, stats = vision.encode(rows, proc, _cfg(), train=True)
    assert len(examples) == 4 and stats["dropped_image_cut"] == 0
    for row, ex in zip(rows, examples):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids.count(proc.image_token_id) == 16  # (32 / 8)^2 patch tokens, CLS dropped
        targets = [t for t in labels if t != IGNORE]
        answer = row["messages"][-1]["content"]
        assert tok.decode(targets) == answer + "<|end|>"  # the answer and end of turn, nothing else
        assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == proc.image_token_id)
        assert len(ex["images"]) == 1 and ex["images"][0].endswith(".png")
    batch = vision.image_inputs(examples, proc)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    # max_length through an image's tokens: the row is dropped and counted, never cut
    short = NS(**{**vars(_cfg()), "data": NS(packing=False, max_length=8)})
    assert vision.encode(rows[:1], proc, short, train=True)[1]["dropped_image_cut"] == 1


@pytest.mark.quick
def test_bad_image_parts_name_the_row(tiny):
    relative = {"type": "image", "path": "images/00001.png"}  # relative to the data file's directory
    row = {"messages": [{"role": "user", "content": [relative]}, {"role": "assistant", "content": "x"}]}
    canonical = to_canonical([row | {"_source": f"{tiny.data}:2"}], "auto", {}, "sft", "sft")[0]
    assert canonical[0]["messages"][0]["content"] == f"<|image:{tiny.data.parent / 'images' / '00001.png'}|>"
    for part, says in [
        ({"type": "image", "path": str(tiny.root / "missing.png")}, "does not exist"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "not a local file"),
        ({"type": "image"}, "names no file"),
    ]:
        row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "x"}]}
        with pytest.raises(DataError, match=says):
            to_canonical([row | {"_source": "f.jsonl:3"}], "auto", {}, "sft", "sft")


@pytest.mark.quick
def test_packing_other_methods_and_text_models_are_refused(tiny):
    cfg = _cfg()
    cfg.data.packing = True
    with pytest.raises(ConfigError, match="data.packing=true is not supported"):
        vlm.processor_tokenizer(str(tiny.model), cfg)
    cfg.data.packing, cfg.method.name = False, "dpo"
    with pytest.raises(ConfigError, match="method=sft only"):
        vlm.processor_tokenizer(str(tiny.model), cfg)
    with pytest.raises(DataError, match="text-only model"):
        vision.refuse_images(_canonical(tiny.data, 1), None)


@pytest.mark.quick
def test_freeze_options_and_lora_on_the_language_model_only(tiny):
    from distft.tuning import lora

    model = vlm.auto_class().from_pretrained(tiny.model, dtype=torch.float32)
    assert vlm.freeze(model, _cfg()) == {
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters())
    }
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector", "language_model"}
    vlm.freeze(model, _cfg(freeze_projector=True))
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())

    cfg = _cfg()
    cfg.tuning = NS(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], init_adapter=None, name="lora")
    fresh = vlm.auto_class().from_pretrained(tiny.model, dtype=torch.float32)
    peft_model = lora.apply(fresh, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    adapted = [n for n in names if "lora_" in n]
    assert adapted and all(".language_model." in n for n in adapted)
    assert {n.rsplit(".", 3)[0].split(".")[-1] for n in adapted} >= {"q_proj", "v_proj", "down_proj"}
    assert not any("vision_tower" in n or "lm_head" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)  # freeze_projector=false: trained in full
    cfg.model.freeze_projector = True
    frozen_proj = lora.apply(vlm.auto_class().from_pretrained(tiny.model, dtype=torch.float32), cfg)
    assert not any("multi_modal_projector" in n for n, p in frozen_proj.named_parameters() if p.requires_grad)


RELOAD = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
export, run = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads((export / "distft_export.json").read_text())
model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(export)
ids = torch.tensor(meta["probe_input_ids"])
rows = [json.loads(line) for line in open(run / "data" / "val.jsonl")][: len(ids)]
paths = [m["content"].split("<|image:")[1].split("|>")[0] for r in rows for m in r["messages"][:1]]
pixels = proc.image_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
pos = torch.arange(ids.shape[1]).expand_as(ids)
with torch.no_grad():
    out = model(input_ids=ids, position_ids=pos, pixel_values=pixels["pixel_values"], use_cache=False)
got = out.logits.float().flatten()[:512]
print(json.dumps({"diff": float((got - torch.tensor(meta["probe_logits"])).abs().max())}))
"""


@pytest.mark.slow
def test_two_rank_fsdp_learns_colours_and_exports(tiny, tmp_path):
    run = tmp_path / "run"
    train(
        run,
        "model=hf",
        f"model.name_or_path={tiny.model}",
        f"data.path={tiny.data}",
        "strategy=fsdp",
        "train.max_steps=60",
        "train.micro_batch_size=8",
        "data.max_eval_generations=16",
        "train.max_new_tokens=8",
    )
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    before = rows[0]["eval/exact_match"]
    after = [r["eval/exact_match"] for r in rows if "eval/exact_match" in r][-1]
    assert before <= 0.1 and after >= 0.5, (before, after, summary)
    assert _reload_diff(run) < 1e-4


def _reload_diff(run) -> float:
    """Largest logit difference of the export, loaded in a fresh process with
    AutoModelForImageTextToText + AutoProcessor, against the trained model's probe logits."""
    export = run / "export"
    assert (export / "processor_config.json").is_file()
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(export), str(run)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["diff"]


@pytest.mark.slow
def test_lora_adapter_export_reloads_as_image_text_model(tiny, tmp_path):
    run = tmp_path / "run"
    common = ["model=hf", f"model.name_or_path={tiny.model}", f"data.path={tiny.data}", "tuning=lora"]
    train(
        run, *common, "train.max_steps=4", "train.micro_batch_size=4", "train.eval_generate=false", plain=True
    )
    adapter = json.loads((run / "export" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"] and "vision" not in adapter["target_modules"]
    assert adapter["modules_to_save"] == ["model.multi_modal_projector"]
    assert _reload_diff(run) < 1e-4
