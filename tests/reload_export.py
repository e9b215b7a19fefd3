"""Load exports in a fresh, offline process and compare each with the trained logits it recorded
(the export's own probe); a QLoRA export's base is quantized again as in training. Run as
`python tests/reload_export.py '[[export_dir, meta_dir], ...]'`; prints one JSON object keyed by
export dir. Shared by the end-to-end and model-matrix tests."""

import json
import os
import sys

import torch


def reload(exp: str, meta_dir: str) -> dict:
    meta = json.load(open(meta_dir + "/distft_export.json"))
    ids = torch.tensor(meta["probe_input_ids"])
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    row: dict = {}
    base = None
    if os.path.exists(exp + "/adapter_config.json"):
        from peft import AutoPeftModelForCausalLM
        from transformers import BitsAndBytesConfig

        kw = {}
        if meta["quantized_base"]:
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32,
            )  # fmt: skip
        model = AutoPeftModelForCausalLM.from_pretrained(exp, dtype=torch.float32, **kw).eval()
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        row["lora_b_abs_sum"] = sum(float(p.abs().sum()) for p in lora_b)
        row["quantized"] = any(type(m).__name__ == "Linear4bit" for m in model.modules())
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids, position_ids=pos, use_cache=False).logits.flatten()[:512]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits.flatten()[:512]
    want = torch.tensor(meta["probe_logits"])
    row["max_diff"] = float((got - want).abs().max())
    row["scale"] = float(want.abs().max())
    row["rel_diff"] = row["max_diff"] / row["scale"]
    row["arch"] = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if base is not None:
        row["diff_from_base"] = float((got - base).abs().max())
    return row


if __name__ == "__main__":
    print(json.dumps({exp: reload(exp, meta) for exp, meta in json.loads(sys.argv[1])}))
