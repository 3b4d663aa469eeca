"""Checkpoint size of the full-size model (ViT-B/16 224 + GPT-2 small, random weights from their default
configs, no download) against the size of the whole model's state_dict. Prints a markdown table.

    python benchmarks/checkpoint_size.py
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import training_script as ts  # noqa: E402


def main():
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    vision = ViTModel(ViTConfig(), add_pooling_layer=False)
    lm = GPT2LMHeadModel(GPT2Config())
    lora = (ts.LORA_R, ts.LORA_ALPHA, ts.LORA_DROPOUT)
    config = {"vision_lora_targets": ts.find_lora_targets(vision), "lm_lora_targets": ts.find_lora_targets(lm)}
    model = ts.Img2GPT(ts.apply_lora(vision, config["vision_lora_targets"], *lora),
                       ts.apply_lora(lm, config["lm_lora_targets"], *lora),
                       torch.nn.Linear(vision.config.hidden_size, lm.config.n_embd))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, full = Path(folder) / "img2gpt_epoch_1.pth", Path(folder) / "full_state_dict.pth"
        ts.save_checkpoint(checkpoint, model, config, {"epoch": 1})
        torch.save(model.state_dict(), full)
        sizes = {"Img2GPT checkpoint (LoRA + projection + config)": checkpoint.stat().st_size,
                 "full model state_dict (fp32)": full.stat().st_size}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"ViT-B/16 + GPT-2 small, LoRA r={ts.LORA_R} on {config['vision_lora_targets']} and "
          f"{config['lm_lora_targets']}: {trainable:,} trainable of {total:,} parameters\n")
    print("| file | size (MB) | share of full |\n|---|---:|---:|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.2f} | {size / sizes['full model state_dict (fp32)']:.2%} |")


if __name__ == "__main__":
    main()
