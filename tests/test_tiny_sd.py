"""The embedded tiny SD's trimmed vocabulary: lab captions must tokenize exactly as CLIP's full BPE does and encode
bit-identically; other words still tokenize (from smaller pieces), and random-token draws never insert BOS/EOS."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from transformers import CLIPTextModel, CLIPTokenizer

from guard_train.lab.dataset import all_captions
from guard_train.lab.tiny_sd import clip_tokenizer, text_config, trim_vocabulary
from guard_train.models.text import encode_text, random_vocabulary_words


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory) -> CLIPTokenizer:
    return clip_tokenizer(tmp_path_factory.mktemp("clip"))


def test_lab_grammar_writes_every_caption_once():
    caps = list(all_captions())
    assert len(caps) == 7 * (24 + 24 * 24) * 4 == len(set(caps))
    assert "a red circle and a blue square, cat texture, stock image" in caps


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd-v"])
def test_committed_model_tokenizes_every_lab_caption_as_full_clip(model, full_clip):
    d = ROOT / "models" / model
    tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
    caps = list(all_captions())
    ours = [tok.convert_ids_to_tokens(ids) for ids in tok(caps).input_ids]
    clip = [full_clip.convert_ids_to_tokens(ids) for ids in full_clip(caps).input_ids]
    assert ours == clip
    cfg = json.loads((d / "text_encoder" / "config.json").read_text())
    info = json.loads((d / "build_info.json").read_text())["vocabulary"]
    assert cfg["vocab_size"] == len(tok) == info["vocab_size"] < info["trimmed_from"] == len(full_clip)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)


def _stand_in(root, tok: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(0)
    enc = CLIPTextModel(text_config(vocab_size=len(tok), hidden=16)).eval()
    tok.save_pretrained(root / "tokenizer")
    enc.save_pretrained(root / "text_encoder")
    return enc


def test_trim_keeps_encodings_bit_identical_and_spells_other_words(tmp_path, full_clip):
    texts = ["a red circle on a cat photo", "photo of a temple with a blue square", "stock image, 42 cats"]
    enc = _stand_in(tmp_path, full_clip)
    before = encode_text(full_clip, enc, texts)
    rec = trim_vocabulary(tmp_path, texts, encode_every=1)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    small = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", use_safetensors=True).eval()
    assert rec["bit_identical"] and rec["vocab_size"] == len(tok) == small.config.vocab_size < 49408
    assert torch.equal(encode_text(tok, small, texts), before)
    # the embedding rows are the old rows, moved: token "red</w>" keeps its vector under its new id
    old_row = enc.get_input_embeddings().weight[full_clip.convert_tokens_to_ids("red</w>")]
    assert torch.equal(small.get_input_embeddings().weight[tok.convert_tokens_to_ids("red</w>")], old_row)
    # an unseen word is spelt from kept pieces, never the unknown token
    ids = tok("zebra").input_ids
    assert tok.eos_token_id not in ids[1:-1] and tok.decode(ids[1:-1]).strip() == "zebra"
    assert trim_vocabulary(tmp_path, texts) == {"vocab_size": len(tok), "trimmed": False}


def test_random_vocabulary_words_follow_the_reference_and_skip_special_tokens(full_clip):
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    reference = [full_clip.decode([int(i)]).strip() or "x" for i in rng_b.integers(0, 49400, size=6)]
    assert random_vocabulary_words(full_clip, 6, rng_a) == reference
    small = CLIPTokenizer.from_pretrained(ROOT / "models" / "tiny-sd" / "tokenizer")
    words = random_vocabulary_words(small, 2000, np.random.default_rng(0))
    allowed = {small.decode([i]).strip() or "x" for i in range(len(small) - 2)}  # all but BOS, EOS (last)
    assert set(words) <= allowed and not {small.bos_token, small.eos_token} & set(words)
    assert {"circle", "triangle"} <= set(words)  # merged lab words are drawn too, not only characters


def test_trimmed_models_keep_the_fingerprint_their_committed_cells_were_made_with():
    from guard_train.lab.bench import INFER_ARMS, TRAIN_ARMS, VOCABULARY_ARMS, weights_fingerprint

    for model in ("tiny-sd", "tiny-sd-v"):
        info = json.loads((ROOT / "models" / model / "build_info.json").read_text())["vocabulary"]
        assert weights_fingerprint(ROOT / "models" / model) == info["weights_before"] != info["weights_after"]
    keys = {json.loads(f.read_text())["key"]["model_weights"] for f in (ROOT / "results" / "lab_cells").glob("*.json")}
    assert keys == {weights_fingerprint(ROOT / "models" / "tiny-sd")}
    assert set(VOCABULARY_ARMS) <= set(INFER_ARMS) | set(TRAIN_ARMS)
