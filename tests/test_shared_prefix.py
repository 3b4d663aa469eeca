"""Each image is encoded once per step and its captions read one shared prefix: the loss and every trainable
gradient equal the plain computation (one [prefix, caption] row per caption), in eval mode and in train mode
with gradient checkpointing, for both LM families, both projectors, a pooled prefix and 4-bit; batches hold
whole images, every caption row once per epoch, decoded once per step."""

from functools import partial

import pytest
import torch

import training_script as ts
from helpers import cli

CAPTIONS = ["a red circle.", "one blue square on a white background.", "a cat.", "there is a green triangle here.",
            "a dog runs.", "x", "the picture shows a yellow circle."]
IMAGE_INDEX = [0, 0, 1, 0, 2, 1, 3]  # images with 3, 2, 1 and 1 captions, interleaved, of different lengths


def build(vit, lm, projector="linear", grid=0, quantize="none"):
    config = {"vit_model": str(vit), "gpt2_model": str(lm), "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "max_caption_tokens": 40, "prefix_pool_grid": grid, "projector": projector}
    torch.manual_seed(0)
    model, tokenizer, _, _ = ts.build_model(config, torch.device("cpu"), quantize=quantize)
    with torch.no_grad():  # trained-looking adapters: B = 0 would leave every lora_A gradient 0
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    for module in model.modules():  # dropout off: the two computations must draw the same (no) masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


def loss_and_gradients(model, **inputs):
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss = model(**inputs).loss
    return loss.detach(), torch.autograd.grad(loss, parameters)


def assert_same_as_one_row_per_caption(model, tokenizer, mode):
    if mode == "train, gradient checkpointing":
        for part in (model.vision, model.lm):
            if not part.is_gradient_checkpointing:  # 4-bit models have it on already
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.lm.is_gradient_checkpointing and model.vision.is_gradient_checkpointing
    model.train(mode != "eval")
    torch.manual_seed(1)
    pixels = torch.rand(4, 3, 32, 32)
    batch = ts.tokenize_captions(tokenizer, CAPTIONS, 40)
    image_index = torch.tensor(IMAGE_INDEX)
    plain_loss, plain = loss_and_gradients(model, pixel_values=pixels[image_index], **batch)
    shared_loss, shared = loss_and_gradients(model, pixel_values=pixels, image_index=image_index, **batch)
    assert torch.isclose(shared_loss, plain_loss, rtol=1e-5, atol=0), (shared_loss, plain_loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("vision" in n and "lora_A" in n for n in names) and any("lm" in n and "lora_A" in n for n in names)
    for name, a, b in zip(names, plain, shared):
        assert a.abs().sum() > 0, name  # every trainable tensor takes part
        assert (a - b).norm() <= 1e-5 * a.norm(), (name, ((a - b).norm() / a.norm()).item())


MODES = ["eval", "train, gradient checkpointing"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("projector,grid", [("linear", 0), ("mlp", 0), ("linear", 2)])
def test_gpt2_shares_the_prefix_exactly(tiny_models, projector, grid, mode):
    assert_same_as_one_row_per_caption(*build(*tiny_models, projector, grid), mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_llama_style_lm_with_rotary_positions_shares_the_prefix_exactly(tiny_models, families, mode):
    assert_same_as_one_row_per_caption(*build(tiny_models[0], families["llama"], "mlp", 2), mode)


@pytest.mark.parametrize("mode", MODES)
def test_eager_attention_takes_the_block_mask_too(tiny_models, mode):
    model, tokenizer = build(*tiny_models)
    model.lm.get_base_model().config._attn_implementation = "eager"
    assert_same_as_one_row_per_caption(model, tokenizer, mode)


@pytest.mark.parametrize("mode", MODES)
def test_4bit_shares_the_prefix_exactly(tiny_models_4bit, mode, monkeypatch):
    # fp32 compute: in bf16 the two computations round differently (different matmul shapes), which is not
    # what this checks; the 4-bit layers, prepare_model_for_kbit_training and its checkpointing are the same.
    real = ts.choose_precision
    monkeypatch.setattr(ts, "choose_precision", lambda device, quantize="auto": (real(device, quantize)[0],
                                                                                 torch.float32))
    model, tokenizer = build(*tiny_models_4bit, quantize="4bit")
    assert model.quantized and ts.count_4bit_layers(model) > 0
    assert_same_as_one_row_per_caption(model, tokenizer, mode)


def test_batches_hold_whole_images_and_every_row_once_per_epoch():
    groups, first = [], 0
    for count in [5] * 9 + [1, 7, 2]:  # 5 captions per image, and a few that differ
        groups.append(list(range(first, first + count)))
        first += count
    image_of = {row: image for image, rows in enumerate(groups) for row in rows}
    epoch = list(ts.EpochBatchSampler(groups, 16, seed=3, epoch=2))
    rows = [row for batch in epoch for row in batch]
    assert sorted(rows) == list(range(first)) and all(len(b) == 16 for b in epoch[:-1])
    for batch in epoch:  # an image's rows are consecutive: only a batch's first and last image may be partial
        images = [image_of[row] for row in batch]
        assert images == sorted(images, key=images.index)
        for image in set(images[1:-1]) - {images[0], images[-1]}:
            assert sorted(r for r in batch if image_of[r] == image) == groups[image]
    assert epoch == list(ts.EpochBatchSampler(groups, 16, seed=3, epoch=2))  # fixed by (seed, epoch)
    assert epoch != list(ts.EpochBatchSampler(groups, 16, seed=3, epoch=3))
    assert list(ts.EpochBatchSampler(groups, 16, seed=3, epoch=2, start=2)) == epoch[2:]  # resume
    shares = [list(ts.EpochBatchSampler(groups, 16, seed=3, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) and shares[0] == epoch[0::2][:len(shares[0])]
    # One caption per image: the batches of a shuffle of the rows, as before images were grouped
    assert list(ts.EpochBatchSampler(50, 8, seed=1, epoch=1)) == [
        order[i:i + 8] for order in [torch.randperm(50, generator=torch.Generator().manual_seed(100_004)).tolist()]
        for i in range(0, 50, 8)]


def test_each_image_is_decoded_once_per_batch(tmp_path, monkeypatch):
    from PIL import Image
    from transformers import ViTImageProcessor

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (40, 40), "red").save(tmp_path / name)
    rows = [("a.jpg", "one"), ("b.jpg", "two"), ("a.jpg", "three"), ("c.jpg", "four"), ("a.jpg", "five")]
    dataset = ts.CaptionDataset(rows, partial(ts.image_in_folder, tmp_path),
                                ViTImageProcessor(size={"height": 32, "width": 32}))
    assert dataset.rows == [("a.jpg", "one"), ("a.jpg", "three"), ("a.jpg", "five"), ("b.jpg", "two"),
                            ("c.jpg", "four")] and dataset.groups == [[0, 1, 2], [3], [4]]
    opened = []
    real = ts.load_image
    monkeypatch.setattr(ts, "load_image", lambda path: opened.append(path.name) or real(path))
    batch = dataset.__getitems__([2, 3, 0, 1])
    assert opened == ["a.jpg", "b.jpg"] and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["captions"] == ["five", "two", "one", "three"] and batch["image_index"].tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_beam_search_reads_each_prefix_once_and_writes_the_same_captions(tiny_models, families, lm):
    model, tokenizer = build(tiny_models[0], tiny_models[1] if lm == "gpt2" else families["llama"])
    with torch.no_grad():  # a sharper LM, so that beams disagree with greedy somewhere
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(3)
    model.eval()
    pixels = torch.rand(3, 3, 32, 32)
    decoding = {"max_new_tokens": 12, "num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2}
    with torch.inference_mode():
        prefix = model.prefix(pixels)
        plain = model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **decoding)
    expected = [t.strip() for t in tokenizer.batch_decode(plain, skip_special_tokens=True)]
    shapes = []
    core = model.lm.get_base_model().base_model

    def record(module, args, kwargs):  # (rows, tokens) of every pass through the LM
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(embeds.shape[:2]) if embeds is not None else tuple(ids.shape))

    hook = core.register_forward_pre_hook(record, with_kwargs=True)
    try:
        captions = ts.generate_captions(model, tokenizer, pixels, **decoding)
    finally:
        hook.remove()
    assert captions == expected and any(expected)
    length = prefix.shape[1]
    assert shapes[0] == (3, length - 1)  # the prefix, once per image
    assert all(tokens == 1 for _, tokens in shapes[1:]), shapes  # then one token at a time, per beam


def test_resuming_a_run_saved_with_rows_shuffled_one_by_one_says_so(flickr_dir, tiny_models, tmp_path, capsys,
                                                                      monkeypatch):
    from conftest import train_args

    args = train_args(flickr_dir, tiny_models, tmp_path, "--epochs", "1", "--batch-size", "8", "--eval-interval", "0",
                      "--save-interval", "2")
    real = ts.save_last

    def stop_after_the_first_save(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "save_last", stop_after_the_first_save)
    assert cli(capsys, ts, *args)[0] == 1
    monkeypatch.setattr(ts, "save_last", real)
    last = tmp_path / "img2gpt_last.pth"
    state = torch.load(last, weights_only=True)
    assert state["training_state"]["batch_order"] == "images" and state["training_state"]["step"] == 2
    del state["training_state"]["batch_order"]  # as the version before whole-image batches saved it
    old = tmp_path / "old" / "img2gpt_last.pth"
    old.parent.mkdir()
    torch.save(state, old)
    code, out, err = cli(capsys, ts, *args, "--resume", last)
    assert code == 0 and "shuffled caption rows one by one" not in out, err
    code, out, err = cli(capsys, ts, *[str(tmp_path / "again") if a == str(tmp_path) else a for a in args],
                         "--resume", old)
    assert code == 0 and "saved by a version that shuffled caption rows one by one" in out, err
