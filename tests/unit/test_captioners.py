"""Captioners: the default on real photos, tiny transformers and open_clip (CoCa) models saved and reloaded.

Tiny models are built from configs with a word-level tokenizer, saved to a temp folder and loaded back
through ``load_captioner`` (no download). Their special tokens are suppressed at generation so the
random models emit words, which shows the generated text reaches the caption.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vecaf.models import PAPER_PROMPT, ensure_keyword, imagenet_class_names, list_captioners, load_captioner, load_pvm
from vecaf.models.captioner import append_sentence, join_alternatives

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<image>", "a", "photo", "of", "cat", "dog", "cup", "red", "blue",
         "the", "is", "on", "describe", "image", ",", ".", "USER", "ASSISTANT", ":"]  # fmt: skip
WORD_IDS = {w: i for i, w in enumerate(WORDS)}
SPECIAL = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def pvm():
    return load_pvm()


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


def noise_images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)) for i in range(n)]


# ------------------------------------------------------------------------------------ default captioner


def test_default_captions_differ_per_image_and_name_the_class(pvm, photos):
    captioner = load_captioner(pvm=pvm, device="cpu")
    captions = captioner.caption(photos, ["cat", "espresso"])
    assert len(captions) == 2 and captions[0] != captions[1]
    assert "cat" in captions[0] and "espresso" in captions[1]
    same_name = captioner.caption(photos, ["thing", "thing"])
    assert same_name[0] != same_name[1] and all("thing" in c for c in same_name)


def test_default_caption_is_built_from_the_pvm_top_k(pvm, photos):
    captioner = load_captioner(pvm=pvm, device="cpu", top_k=3)
    captions = captioner.caption(photos, ["cat", "espresso"])
    names = imagenet_class_names()
    transform = pvm.transform()
    with torch.inference_mode():
        logits = pvm.model(torch.stack([transform(p) for p in photos]).to(pvm.device)).cpu()
    for caption, row, cls in zip(captions, logits, ["cat", "espresso"]):
        top = [names[j] for j in torch.argsort(row, descending=True)[:3].tolist()]
        top = list(dict.fromkeys(top))
        articles = ["an " + t if t[0].lower() in "aeiou" else "a " + t for t in top]
        listed = articles[0] if len(articles) == 1 else ", ".join(articles[:-1]) + " or " + articles[-1]
        lead = "an" if cls[0] in "aeiou" else "a"
        assert caption == f"a photo of {lead} {cls}, resembling {listed}"


def test_ood_suffix_is_appended_as_a_sentence(pvm, photos):
    captioner = load_captioner(pvm=pvm, device="cpu", top_k=1, ood_suffix="It's a snowy day!")
    caption = captioner.caption(photos[:1], ["cat"])[0]
    assert caption.startswith("a photo of a cat, resembling a ") and caption.endswith(". It's a snowy day!")


def test_caption_wording_helpers_by_hand():
    assert join_alternatives(["tabby"]) == "a tabby"
    assert join_alternatives(["apple", "pear"]) == "an apple or a pear"
    assert join_alternatives(["cup", "espresso", "mug"]) == "a cup, an espresso or a mug"
    assert ensure_keyword("A CAT on a mat", "cat") == "A CAT on a mat"
    assert ensure_keyword("a mat", "Ankle boot") == "a photo of an Ankle boot: a mat"
    assert ensure_keyword("", "cup") == "a photo of a cup"
    assert append_sentence("a cat", "It's foggy.") == "a cat. It's foggy."
    assert append_sentence("a cat!", "It's foggy.") == "a cat! It's foggy."


def test_captioner_bad_input(pvm, photos):
    captioner = load_captioner(pvm=pvm, device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 class names"):
        captioner.caption(photos, ["cat"])
    with pytest.raises(ValueError, match=r"class_names\[1\] must be a str"):
        captioner.caption(photos, ["cat", 7])
    with pytest.raises(ValueError, match=r"class_names\[0\] is empty"):
        captioner.caption(photos[:1], [" "])
    assert captioner.caption([], []) == []
    with pytest.raises(ValueError, match="top_k must be an integer in 1..1000"):
        load_captioner(pvm=pvm, top_k=0)
    with pytest.raises(ValueError, match="needs a PVM with an ImageNet-1k head"):
        load_captioner(pvm=load_pvm(num_classes=10))
    with pytest.raises(ValueError, match="ood_suffix must be a non-empty string"):
        load_captioner(pvm=pvm, ood_suffix="  ")


def test_unknown_or_hub_captioners():
    with pytest.raises(ValueError) as err:
        load_captioner("gpt-4v")
    for known in ("imagenet-labels", "blip-base", "hf:<folder or hub id>", "open_clip:"):
        assert known in str(err.value)
    assert list_captioners()[0] == "imagenet-labels"
    for name in ("blip-base", "hf:Salesforce/blip-image-captioning-base", "coca"):
        with pytest.raises(ValueError, match="allow_hub=True"):
            load_captioner(name)
    with pytest.raises(ValueError, match="prompt_mode must be one of"):
        load_captioner("hf:x", prompt_mode="shout")


# --------------------------------------------------------------------------- tiny transformers captioners


def _tokenizer(*, bert_template: bool = False, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(WORD_IDS, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bert_template:
        specials = [("[CLS]", WORD_IDS["[CLS]"]), ("[SEP]", WORD_IDS["[SEP]"])]
        backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", **special)


def _check_generated(caption: str, class_name: str, *, start: str) -> None:
    assert caption.startswith(start), caption
    generated = caption[len(start) :].split()
    assert generated and all(w in WORD_IDS for w in generated), caption
    assert class_name in caption


def test_vision_encoder_decoder_captioner_from_a_saved_folder(tmp_path):
    from transformers import (
        GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
    )  # fmt: skip

    encoder = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                        patch_size=16)  # fmt: skip
    decoder = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=len(WORDS), n_positions=64,
                         add_cross_attention=True, is_decoder=True, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.suppress_tokens = SPECIAL
    model.save_pretrained(tmp_path)
    _tokenizer(bos_token="[CLS]", eos_token="[SEP]").save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    captioner = load_captioner(f"hf:{tmp_path}", device="cpu", max_new_tokens=4, ood_suffix="It's a snowy day!")
    assert captioner.prompt_mode == "none"
    images, names = noise_images(3), ["cat", "dog", "cup"]
    captions = captioner.caption(images, names, batch_size=2)
    raw = captioner._generate([im.convert("RGB") for im in images], names, batch_size=2, progress=False)
    assert len(captions) == len(raw) == 3
    for text in raw:
        assert 1 <= len(text.split()) <= 4 and all(w in WORD_IDS for w in text.split()), text
    for caption, text, cls in zip(captions, raw, names):
        assert caption == append_sentence(ensure_keyword(text, cls), "It's a snowy day!")
        assert cls in caption and caption.endswith(". It's a snowy day!")


def test_git_captioner_continues_the_prompt_prefix(tmp_path):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    config = GitConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GitForCausalLM(config)
    model.generation_config.suppress_tokens = SPECIAL
    model.save_pretrained(tmp_path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = _tokenizer(bos_token="[CLS]", eos_token="[SEP]")
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    captioner = load_captioner(
        f"hf:{tmp_path}", device="cpu", prompt_mode="prefix", prompt="a photo of a {class_name} ,", max_new_tokens=3
    )
    captions = captioner.caption(noise_images(2), ["cat", "dog"])
    for caption, cls in zip(captions, ["cat", "dog"]):
        _check_generated(caption, cls, start=f"a photo of a {cls} , ")
        assert len(caption.split()) <= len(f"a photo of a {cls} ,".split()) + 3


def test_blip_captioner_unconditional_and_with_a_prefix(tmp_path):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    config = BlipConfig(
        text_config={"vocab_size": len(WORDS), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 3,
                     "sep_token_id": 3, "pad_token_id": 0},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.generation_config.suppress_tokens = SPECIAL
    model.save_pretrained(tmp_path)
    tokenizer = _tokenizer(bert_template=True, cls_token="[CLS]", sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    plain = load_captioner(f"hf:{tmp_path}", device="cpu", max_new_tokens=3)
    assert plain.prompt_mode == "none"
    images = noise_images(2)
    raw = plain._generate([im.convert("RGB") for im in images], ["cat", "dog"], batch_size=2, progress=False)
    for caption, text, cls in zip(plain.caption(images, ["cat", "dog"]), raw, ["cat", "dog"]):
        assert text.split() and all(w in WORD_IDS for w in text.split()), text
        assert caption == ensure_keyword(text, cls)
    prefixed = load_captioner(
        f"hf:{tmp_path}", device="cpu", prompt_mode="prefix", prompt="a photo of a {class_name} ,", max_new_tokens=3
    )
    for caption, cls in zip(prefixed.caption(noise_images(2), ["cat", "dog"]), ["cat", "dog"]):
        _check_generated(caption, cls, start=f"a photo of a {cls} , ")


def test_llava_style_captioner_uses_the_paper_prompt_in_its_chat_template(tmp_path):
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )  # fmt: skip

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)  # fmt: skip
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=2,
                       eos_token_id=3, pad_token_id=0)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=WORD_IDS["<image>"],
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.suppress_tokens = SPECIAL
    model.generation_config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    template = (
        "{% for m in messages %}{{ m['role'] | upper }} :{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        " <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT :{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_tokenizer(bos_token="[CLS]", eos_token="[SEP]", extra_special_tokens={"image_token": "<image>"}),
        patch_size=16, vision_feature_select_strategy="default", chat_template=template, num_additional_image_tokens=1,
    )  # fmt: skip
    processor.save_pretrained(tmp_path)

    captioner = load_captioner(f"hf:{tmp_path}", device="cpu", max_new_tokens=3)
    assert captioner.prompt_mode == "chat" and captioner.prompt == PAPER_PROMPT
    inputs, prompts = captioner._inputs(noise_images(1), ["cat"])
    assert prompts == ["Please describe the image within one sentence. The description contains the keyword cat."]
    prompt_ids = [WORD_IDS.get(w, WORD_IDS["[UNK]"]) for w in prompts[0].split()]
    image_ids = [WORD_IDS["<image>"]] * 4
    expected = [WORD_IDS["USER"], WORD_IDS[":"], *image_ids, *prompt_ids, WORD_IDS["ASSISTANT"], WORD_IDS[":"]]
    assert inputs["input_ids"][0].tolist() == expected
    captions = captioner.caption(noise_images(2), ["cat", "dog"], batch_size=2)
    assert len(captions) == 2 and "cat" in captions[0] and "dog" in captions[1]
    for caption in captions:
        assert "describe" not in caption and "ASSISTANT" not in caption


# ------------------------------------------------------------------------------- tiny open_clip CoCa


def _tiny_coca(folder):
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16,
                       "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                       "output_tokens": True},
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
    }  # fmt: skip
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**config, "custom_text": True}}))
    torch.manual_seed(0)
    model = open_clip.CoCa(**config).eval()
    # open_clip leaves the decoder's text_projection as torch.empty (its init_parameters is never called, and
    # fails): without this the logits were whatever memory held (all zeros here, so the greedy check was vacuous;
    # garbage in CI)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32**-0.5)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_coca_captioner_greedy_decoding_from_a_saved_folder(tmp_path):
    reference = _tiny_coca(tmp_path)
    captioner = load_captioner(f"open_clip:{tmp_path}", device="cpu", max_new_tokens=5)
    images = noise_images(2)
    captions = captioner.caption(images, ["cat", "cup"])
    assert len(captions) == 2 and "cat" in captions[0] and "cup" in captions[1]
    x = torch.stack([captioner.preprocess(im) for im in images])
    with torch.inference_mode():
        tokens = captioner.generate_tokens(x)
        assert tokens.shape[1] <= 1 + 5 and (tokens[:, 0] == captioner.sot).all()
        forced = reference(x, text=tokens, output_labels=False)["logits"].float()
        forced[:, :, captioner.banned] = float("-inf")
    allowed = forced[:, :, sorted(set(range(forced.shape[-1])) - set(captioner.banned))]
    assert torch.isfinite(allowed).all() and allowed.std() > 0.1  # real logits, not ties
    for b in range(len(images)):
        for step in range(1, tokens.shape[1]):
            if tokens[b, step - 1] == captioner.eot:
                break
            assert int(forced[b, step - 1].argmax()) == int(tokens[b, step]), (b, step)


def test_open_clip_captioner_needs_a_coca_model(tmp_path):
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.save(open_clip.CLIP(**config).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="not a CoCa model"):
        load_captioner(f"open_clip:{tmp_path}", device="cpu")


# ------------------------------------------------------------------------------------------ offline


def test_default_zoo_runs_with_the_network_cut(monkeypatch, photos):
    import socket

    from vecaf.models import load_text_encoder

    def refuse(*args, **kwargs):
        raise OSError("network cut by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    pvm = load_pvm()
    captions = load_captioner(pvm=pvm, device="cpu", top_k=2).caption(photos, ["cat", "espresso"])
    encoder = load_text_encoder(device="cpu")
    vectors = encoder.encode(captions)
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(OSError, match="network cut"):
        socket.create_connection(("127.0.0.1", 9))
