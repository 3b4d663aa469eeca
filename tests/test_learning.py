"""Does it learn? Captions of colored shapes it has never seen must name the right color far above chance."""

import random
import re

import pytest

from conftest import COLORS, SHAPES, draw_shape, make_flickr_folder, run_script, train_args

UNSEEN_PER_COLOR = 8
CHANCE = 1 / len(COLORS)


@pytest.mark.parametrize("pool_grid,quantize", [(0, "none"), (2, "none"), (0, "4bit")],
                         ids=["all-prefix-tokens", "pooled-prefix", "4bit-qlora"])
def test_captions_of_unseen_pictures_name_their_color(tiny_models, tmp_path, pool_grid, quantize):
    # 4-bit trains in 4-bit and captions in 4-bit. (The 64-wide tiny_models_4bit learn the colors at these
    # settings in neither precision: a stronger language prior that ignores the prefix, so they are not used.)
    models = tiny_models
    make_flickr_folder(tmp_path / "data", 96, seed=1, quirks=False)
    out = tmp_path / "out"
    result = run_script("training_script.py", *train_args(
        tmp_path / "data", models, out, "--epochs", "20", "--batch-size", "16", "--learning-rate", "1e-2",
        "--lora-r", "16", "--eval-interval", "0", "--prefix-pool-grid", str(pool_grid), "--quantize", quantize))
    assert result.returncode == 0, result.stderr[-3000:]

    rng = random.Random(1234)  # new positions, sizes and color/shape pairs, never in the training folder
    truth, images = [], []
    for color in COLORS:
        for i in range(UNSEEN_PER_COLOR):
            path = tmp_path / f"unseen_{color}_{i}.png"
            draw_shape(color, rng.choice(SHAPES), rng).save(path)
            truth.append(color)
            images += ["--image", str(path)]
    result = run_script("inference_script.py", "--weights", out / "img2gpt_epoch_20.pth", "--device", "cpu",
                        "--max-new-tokens", "12", "--quantize", quantize, *images)
    assert result.returncode == 0, result.stderr[-3000:]
    captions = re.findall(r"^Generated Caption: (.*)$", result.stdout, re.M)
    assert len(captions) == len(truth)
    said = [next((w for w in caption.split() if w in COLORS), None) for caption in captions]
    accuracy = sum(s == t for s, t in zip(said, truth)) / len(truth)
    print(f"color accuracy on {len(truth)} unseen pictures ({quantize}): {accuracy:.2f} (chance {CHANCE:.2f})")
    print("\n".join(f"  {t:>6}: {c}" for t, c in zip(truth, captions)))
    assert accuracy >= 0.75, (accuracy, list(zip(truth, captions)))
    assert len(set(captions)) >= len(COLORS)  # not one caption for every picture
