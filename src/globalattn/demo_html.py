"""``globalattn demo --html PATH``: the walk-through as one page to play with, offline.

The page (``demo_page.html``, beside this file) is plain HTML, CSS and JavaScript with the data
embedded as JSON: no network, no server, nothing to install.  Every weight it shows is computed
here, by ``attention_weights`` on the walk-through's own query and key, for every block size from 1
to the sentence's length and every combination of the page's toggles; the page only looks them up.
Dense attention is the walk-through's (``demo.dense_weights``), the costs are ``globalattn.cost``'s.

The weights travel compactly: integers in units of 1/10,000, one string per matrix (rows split by
";", cells by ","; an empty cell is one the token cannot attend to, which a weight that rounds to 0
still can), and identical matrices are stored once.  The seed sentence makes a page of about 0.35 MB.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from globalattn import cost, spec
from globalattn.api import attention_weights, block_bounds, global_attention
from globalattn.demo import dense_weights

TEMPLATE = "demo_page.html"
DATA_MARK = "__DEMO_DATA__"  # where the template takes the JSON
UNIT = 10_000  # the page's weights are integers in units of 1/UNIT: 4 decimals
MODES = ("all", "own", "causal")  # scope "all", scope "own" (bidirectional), causal (scope "all")
TOP_BLOCKS = (0, 1, 2)
WINDOWS = (None, 2, 4, 8)
LONG_SEQUENCES = (1024, 4096, 16384, 65536, 131072)


def view_key(block_size: int, mode: str, top_blocks: int, window: int | None) -> str:
    """The page's name for one combination of its controls, e.g. ``"5 all 0 none"``."""
    return f"{block_size} {mode} {top_blocks} {_window_name(window)}"


def _window_name(window: int | None) -> str:
    return "none" if window is None else str(window)


def page_data(result: dict) -> dict:
    """Everything the page shows, from a ``demo.walk_through`` result (its words, query, key, value)."""
    words = result["words"]
    seq_len = len(words)
    q, k, v = (torch.tensor(result[name])[None, None] for name in ("query", "key", "value"))  # (1, 1, L, d)
    dense = {causal: dense_weights(q[0, 0], k[0, 0], causal) for causal in (False, True)}  # (L, L) each
    dense_out = {causal: weights @ v[0, 0] for causal, weights in dense.items()}  # (L, d) each

    matrices: dict[str, int] = {}  # encoded matrix -> its index in the page's list, so that each is stored once
    views, blocks = {}, {}
    for block_size in range(1, seq_len + 1):
        for causal in (False, True):
            remainder = spec.resolve_remainder(causal, None)
            blocks[f"{block_size} {'causal' if causal else 'bidirectional'}"] = block_bounds(
                seq_len, block_size, remainder=remainder
            )
        for mode, top_blocks, window in itertools.product(MODES, TOP_BLOCKS, WINDOWS):
            options = dict(**_mode_options(mode), top_blocks=top_blocks, window=window)
            weights = attention_weights(q, k, block_size, **options)[0, 0]  # (L, L + G)
            out = global_attention(q, k, v, block_size, **options)[0, 0]  # (L, d)
            cosine = F.cosine_similarity(out, dense_out[options["causal"]], dim=-1)
            views[view_key(block_size, mode, top_blocks, window)] = dict(
                weights=matrices.setdefault(_encode(weights), len(matrices)),
                cosine=[round(c, 4) for c in cosine.tolist()],
            )
    head_dim = q.shape[-1]
    return dict(
        text=result["text"],
        words=words,
        model=_model(result["model"]),
        initial=dict(
            block_size=min(result["block_size"], seq_len),  # any longer block is one block of all words too
            mode="causal" if result["causal"] else result["scope"],
            token=result["token"]["position"],
        ),
        unit=UNIT,
        top_blocks=list(TOP_BLOCKS),
        windows=list(WINDOWS),
        blocks=blocks,
        dense={"bidirectional": _encode(dense[False]), "causal": _encode(dense[True])},
        matrices=list(matrices),
        views=views,
        cost={
            f"{mode} {_window_name(window)}": _long_costs(mode, window, head_dim)
            for mode in MODES
            for window in WINDOWS
        },
    )


def _mode_options(mode: str) -> dict:
    return dict(causal=mode == "causal", scope="own" if mode == "own" else "all")


def _model(model: dict) -> dict:
    """What the page says about the vectors: the stand-in says why it stands in; a pretrained model's
    folder on this machine is left out of a page meant to be shared."""
    shown = ("name", "pretrained", "layer", "head", "head_dim") + (() if model["pretrained"] else ("source",))
    return {name: model[name] for name in shown}


def _encode(weights: torch.Tensor) -> str:
    """(rows, columns) weights -> "w,w,,w;w,..." in units of 1/UNIT, empty where a cell is never attended."""
    units = (weights * UNIT).round().int().tolist()
    seen = (weights > 0).tolist()  # attention_weights leaves exactly 0 where a row may not look
    return ";".join(",".join(str(u) if s else "" for u, s in zip(row, row_seen)) for row, row_seen in zip(units, seen))


def _long_costs(mode: str, window: int | None, head_dim: int) -> list[dict]:
    """The cost table's rows: each long sequence with the block size the block rule needs fewest scores at."""
    options = _mode_options(mode)
    causal, scope = options["causal"], options["scope"]
    rows = []
    for seq_len in LONG_SEQUENCES:
        block_size = cost.best_block_size(seq_len, causal=causal)
        dense = cost.attended_pairs(seq_len, None, causal=causal)
        ours = cost.attended_pairs(seq_len, block_size, causal=causal, scope=scope, window=window)
        rows.append(
            dict(
                tokens=seq_len,
                block_size=block_size,
                scores_dense=dense,
                scores_global=ours,
                flops_dense=int(cost.attention_flops(dense, head_dim)),
                flops_global=int(cost.attention_flops(ours, head_dim)),
            )
        )
    return rows


def render(data: dict) -> str:
    """The page: the template with ``data`` as JSON in it."""
    template = resources.files("globalattn").joinpath(TEMPLATE).read_text(encoding="utf-8")
    # "<" as \u003c: the user's text can then never close the <script> element that holds the JSON.
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    return template.replace(DATA_MARK, payload)


def save_page(result: dict, path: str | Path) -> Path:
    """Write the page for a ``demo.walk_through`` result to ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(page_data(result)), encoding="utf-8")
    return path
