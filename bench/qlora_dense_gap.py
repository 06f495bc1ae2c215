"""How far a QLoRA adapter's model is from the same adapter on the dense base.

QLoRA trains the adapters against the NF4-quantized base. `model/` (the dequantized base with the
adapters merged in) computes what training computed; `adapter/` put on the original dense base with
PEFT computes something slightly different. This trains the shipped tiny model with
`lora.quantize_base=true` through the CLI and prints both differences on the sample data.

    python bench/qlora_dense_gap.py [--steps 100]

Needs the test extras (transformers, peft, torchao).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ASSETS = Path(__file__).resolve().parents[1] / "src" / "finetune" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [
            *(sys.executable, "-m", "finetune", "recipe=lora", "lora.quantize_base=true"),
            *(f"max_steps={args.steps}", "output_dtype=fp32", f"hydra.run.dir={run}"),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        tokenizer = AutoTokenizer.from_pretrained(run / "model")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are left out below
        rows = [json.loads(line) for line in (ASSETS / "sample.jsonl").open()][:16]
        texts = [f"{row['instruction']}\n{row['output']}" for row in rows]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)

        def logits(model: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad():
                out = model(**batch).logits
            return out[batch["attention_mask"].bool()]  # (real tokens, vocab)

        def load(path: Path) -> torch.nn.Module:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        trained = logits(load(run / "model"))
        on_dense = logits(PeftModel.from_pretrained(load(ASSETS / "tiny"), run / "adapter"))
        base = logits(load(ASSETS / "tiny"))

    def gap(a: torch.Tensor, b: torch.Tensor) -> str:
        diff = (a - b).abs()
        return f"max {diff.max():.3f}, mean {diff.mean():.4f}"

    print(f"QLoRA, {args.steps} steps; logits over {trained.shape[0]} tokens of the sample data")
    print(f"adapter on the dense base vs model/ (what training computed): {gap(on_dense, trained)}")
    print(f"dense base without the adapter vs model/:                    {gap(base, trained)}")


if __name__ == "__main__":
    main()
