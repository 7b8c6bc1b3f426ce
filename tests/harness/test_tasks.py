"""The tasks: deterministic batches, and data that is what each generator claims."""

from __future__ import annotations

import inspect
import statistics

import pytest
import torch

from globalattn.harness.tasks import IGNORE, TASKS, make_task
from globalattn.harness.tasks.listops import OPERATORS, PAD, VOCAB
from globalattn.harness.tasks.passkey import DIGITS, accuracy_by_depth
from globalattn.harness.tasks.text import STDLIB_MODULES

PACKING = sorted(name for name, task in TASKS.items() if task.packs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_a_function_of_seed_split_and_index(name):
    task, same, other_seed = make_task(name, 128, seed=3), make_task(name, 128, seed=3), make_task(name, 128, seed=4)
    first = task.batch("train", 5, 4)
    for key, value in same.batch("train", 5, 4).items():
        assert torch.equal(first[key], value), key
    assert first["tokens"].shape == (4, 128) and first["tokens"].dtype == torch.long
    assert int(first["tokens"].max()) < task.vocab_size and int(first["tokens"].min()) >= 0
    assert not torch.equal(first["tokens"], task.batch("train", 6, 4)["tokens"])
    assert not torch.equal(first["tokens"], task.batch("val", 5, 4)["tokens"])
    if name not in ("shakespeare", "pystdlib"):  # the text corpora do not depend on the seed, only the windows
        assert not torch.equal(first["tokens"], other_seed.batch("train", 5, 4)["tokens"])
    with pytest.raises(ValueError, match="split"):
        task.batch("test", 0, 1)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("imagenet", 128)


def random_mqar_options() -> dict[str, int]:
    """A random valid size of MQAR at context 256: num_pairs <= 256 / 4, vocab_size >= 2 * (num_pairs + 1)."""
    pairs = int(torch.randint(1, 65, ()))
    return {"num_pairs": pairs, "vocab_size": int(torch.randint(2 * pairs + 2, 2 * pairs + 300, ()))}


@pytest.mark.parametrize("sized", [False, True], ids=["defaults", "random-options"])
def test_mqar_answers_are_the_stored_values(sized):
    options = random_mqar_options() if sized else {}
    task = make_task("mqar", 256, seed=int(torch.randint(1000, ())), **options)
    pairs = options.get("num_pairs", 16)  # by default the pairs come first, packed (Zoology's layout)
    assert task.describe() == {"num_pairs": 16, "vocab_size": 256, **options, "key_span": 2 * pairs}  # recorded
    batch = task.batch("train", 0, 8)
    pairs, half = task.num_pairs, task.vocab_size // 2
    assert int(batch["tokens"].max()) < task.vocab_size
    for tokens, targets in zip(batch["tokens"].tolist(), batch["targets"].tolist()):
        keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert all(half <= v < task.vocab_size for v in values)
        stored = dict(zip(keys, values))
        scored = [i for i, t in enumerate(targets) if t != IGNORE]
        assert len(scored) == pairs and min(scored) >= 2 * pairs
        for i in scored:  # at a query the input is a stored key and the target its value
            assert tokens[i] in stored and targets[i] == stored[tokens[i]]
        assert sorted(tokens[i] for i in scored) == sorted(keys)  # every key asked once
        assert all(tokens.count(k) == 2 for k in keys)  # the filler plants no decoy copies of a key


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_options_are_constructor_keywords_that_describe_records(name):
    cls = TASKS[name]
    keywords = inspect.signature(cls.__init__).parameters
    for option in cls.options:
        assert keywords[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    if cls.options:  # every option the harness sets shows in the data it records (metrics.json's "data")
        assert set(cls.options) <= set(make_task(name, 128).describe())
    with pytest.raises(
        ValueError, match=rf"task {name} has no option 'size': it takes " + (", ".join(cls.options) or "none")
    ):
        make_task(name, 128, size=3)  # refused before the task is built


@pytest.mark.parametrize(
    "context,options,message",
    [
        (256, {"num_pair": 3}, "task mqar has no option 'num_pair': it takes num_pairs, vocab_size, key_span"),
        (256, {"num_pairs": 0}, "mqar option num_pairs must be a positive int, got 0"),
        (256, {"num_pairs": True}, "mqar option num_pairs must be a positive int, got True"),
        (256, {"vocab_size": "512"}, "mqar option vocab_size must be a positive int, got '512'"),
        (256, {"vocab_size": -4}, "mqar option vocab_size must be a positive int, got -4"),
        (256, {"num_pairs": 16, "vocab_size": 33}, r"vocab_size >= 2 \* \(num_pairs \+ 1\) = 34, got 33"),
        (256, {"num_pairs": 65}, r"at least 4 \* num_pairs = 260, got 256"),
        (256, {"num_pairs": 8, "key_span": 15}, r"key_span must be even, from 2 \* num_pairs = 16 to .* = 240"),
        (256, {"num_pairs": 8, "key_span": 14}, "key_span must be even, .* got 14"),
        (256, {"num_pairs": 8, "key_span": 242}, "key_span .* got 242"),
        (256, {"key_span": 0}, "mqar option key_span must be a positive int, got 0"),
    ],
)
def test_mqar_refuses_bad_options_by_name(context, options, message):
    with pytest.raises(ValueError, match=message):
        make_task("mqar", context, **options)


def test_mqar_key_span_spreads_the_pairs_over_its_blocks():
    pairs = int(torch.randint(4, 17, ()))
    span = 2 * int(torch.randint(4 * pairs, 6 * pairs, ()))  # room for 2-3x the pairs
    task = make_task("mqar", 512, seed=int(torch.randint(1000, ())), num_pairs=pairs, vocab_size=256, key_span=span)
    assert task.describe()["key_span"] == span
    batch = task.batch("train", 0, 16)
    blocks, predicted = set(), batch["targets"].clone()
    right = {"own": [], "earlier": []}  # per query, by where its key sits: found independently of breakdown()
    for row, (tokens, targets) in enumerate(zip(batch["tokens"].tolist(), batch["targets"].tolist())):
        keys = [t for t in tokens[:span] if 1 <= t < 128]
        scored = [i for i, t in enumerate(targets) if t != IGNORE]
        assert len(keys) == pairs == len(scored) and min(scored) >= span
        predicted[row, scored[0]] = 0  # wrong at the first query of each row
        for i in scored:  # the key sits once, at an even position of the span, its value right after it
            at = tokens.index(tokens[i])
            assert at % 2 == 0 and at < span and tokens.count(tokens[i]) == 2 and targets[i] == tokens[at + 1]
            blocks.add(at // 16)
            right["own" if at // 16 == i // 16 else "earlier"].append(i != scored[0])
    assert len(blocks) > span // 32, "the pairs fill more than half of the span's blocks of 16"
    by_block = task.breakdown(batch, predicted, block_size=16)["accuracy_by_block"]
    for group, found in right.items():
        assert by_block[group] == (pytest.approx(sum(found) / len(found)) if found else None)


def test_mqar_gaps_favour_short_distances():
    task = make_task("mqar", 1024, seed=0)
    targets = task.batch("train", 0, 64)["targets"]
    positions = (targets != IGNORE).nonzero()[:, 1].float()
    assert positions.median() < 512, "Zoology's power law puts most queries early"


def evaluate_listops(tokens: list[str]) -> int:
    """An independent evaluator: a stack of (operator, arguments)."""
    stack = [("ROOT", [])]
    for token in tokens:
        if token in OPERATORS:
            stack.append((token, []))
        elif token == "]":
            operator, args = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(statistics.median(a)),
            }[operator](args)
            stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(token))
    assert len(stack) == 1 and len(stack[0][1]) == 1
    return stack[0][1][0]


def test_listops_labels_are_the_values_of_the_expressions():
    task = make_task("listops", 128, seed=int(torch.randint(1000, ())))
    batch = task.batch("train", 0, 16)
    assert batch["labels"].unique().numel() > 1
    for tokens, real, label in zip(batch["tokens"].tolist(), batch["real"].tolist(), batch["labels"].tolist()):
        length = sum(real)
        assert 128 // 4 <= length <= 128
        assert all(t != PAD for t in tokens[:length]) and all(t == PAD for t in tokens[length:])  # padded at the end
        expression = [VOCAB[t] for t in tokens[:length]]
        assert expression[0] in OPERATORS
        assert evaluate_listops(expression) == label


def test_passkey_asks_for_the_hidden_number():
    task = make_task("passkey", 300, seed=1)
    batch = task.batch("val", 0, 8)
    for tokens, targets in zip(batch["tokens"].tolist(), batch["targets"].tolist()):
        text = bytes(tokens + [targets[-1]]).decode()
        key = text[-DIGITS:]
        assert key.isdigit() and f"The pass key is {key}. Remember it. {key} is the pass key." in text
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        assert all(t == IGNORE for t in targets[:-DIGITS]) and bytes(targets[-DIGITS:]).decode() == key
    needle_at = torch.tensor([bytes(t).decode().index("The pass key") for t in batch["tokens"].tolist()])
    assert (needle_at - batch["depth"] * task.filler_len).abs().max() <= 1  # depth 1: just before the question
    assert batch["depth"].unique().numel() == 8


def test_accuracy_by_depth_bins():
    correct = torch.tensor([True, False, True, True])
    depths = torch.tensor([0.05, 0.1, 0.5, 0.99])
    assert accuracy_by_depth(correct, depths, bins=2) == [0.5, 1.0]


def test_text_validation_holds_out_whole_documents():
    task = make_task("shakespeare", 256)
    assert len(task.val_names) == 4 and len(task.train_text) > 4_000_000
    train_text = bytes(task.train_text.tolist())
    val_text = bytes(task.val_text.tolist())
    assert b"# The Tempest" in val_text and b"# The Tempest" not in train_text
    for split, text in (("train", train_text), ("val", val_text)):
        for row in task.batch(split, 0, 4)["tokens"].tolist():
            assert bytes(row) in text


def test_pystdlib_corpus_is_pinned_and_checksummed():
    assert list(STDLIB_MODULES) == sorted(STDLIB_MODULES)
    task = make_task("pystdlib", 512)
    assert task.describe()["sha256"] == make_task("pystdlib", 256).describe()["sha256"]
    assert len(task.val_names) == len(STDLIB_MODULES) // 10
    assert b"def " in bytes(task.batch("val", 0, 8)["tokens"].flatten().tolist())


def test_the_language_model_tasks_pack():
    assert PACKING == ["pystdlib", "shakespeare"]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("name", PACKING)
def test_packed_rows_are_the_windows_cut_at_document_boundaries(name, split):
    """Each play or module, with the blank line after it, is a document.  A packed row holds the bytes of
    the unpacked row; its ids number the documents (pieces) it meets 0, 1, ...; its targets are the next
    bytes but where the next byte starts another document.  Checked against the documents joined here."""
    context, rows = 4096, 128
    task, unpacked = make_task(name, context, pack=True), make_task(name, context)
    documents = task.documents()
    held_out = split == "val"
    parts = [data for doc, data in documents.items() if (doc in task.val_names) == held_out]
    text = b"\n\n".join(parts)
    sizes = [len(part) + 2 for part in parts[:-1]] + [len(parts[-1])]
    owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(sizes))  # the document of each byte
    batch = task.batch(split, 3, rows)
    assert set(batch) == {"tokens", "targets", "document_ids"}
    assert batch["tokens"].shape == batch["document_ids"].shape == (rows, context)  # full rows: no padding
    assert torch.equal(batch["tokens"], unpacked.batch(split, 3, rows)["tokens"])
    for tokens, ids, targets in zip(batch["tokens"], batch["document_ids"], batch["targets"]):
        start = text.find(bytes(tokens.tolist()))
        docs = owner[start : start + context + 1] - owner[start]
        assert torch.equal(ids, docs[:-1])
        following = torch.tensor(list(text[start + 1 : start + context + 1]))
        assert torch.equal(targets, following.masked_fill(docs[1:] != docs[:-1], IGNORE))
    documents_per_row = batch["document_ids"][:, -1] + 1
    assert (documents_per_row > 1).any(), "no row meets a document boundary: the test checks nothing"


@pytest.mark.parametrize("name", sorted(set(TASKS) - set(PACKING)))
def test_packing_is_refused_where_rows_are_not_documents(name):
    message = rf"--pack packs the documents of the language-model tasks \(shakespeare, pystdlib\), not {name}$"
    with pytest.raises(ValueError, match=message):
        make_task(name, 128, pack=True)


def test_passkey_breakdown_shows_digits_that_exact_match_hides():
    task = make_task("passkey", 300)
    batch = task.batch("val", 0, 10)  # depths k * 0.618... mod 1: two in each fifth, example 0 at depth 0
    predicted = batch["targets"].clone()
    predicted[:, -4:] = ord("x")  # only the first digit right, in every example
    predicted[0, -4:] = batch["targets"][0, -4:]  # but example 0 whole
    breakdown = task.breakdown(batch, predicted, block_size=16)
    assert breakdown["accuracy_by_digit"] == pytest.approx([1.0, 0.1, 0.1, 0.1, 0.1])
    assert breakdown["digit_accuracy"] == pytest.approx(0.28)  # (10 + 4 x 1) / 50
    assert breakdown["accuracy_by_depth"] == [0.5, 0.0, 0.0, 0.0, 0.0]  # exact match: example 0 alone


def test_mqar_breakdown_by_gap_and_block():
    task = make_task("mqar", 16, num_pairs=2, vocab_size=8)  # keys 1-3, values 4-7
    #                pairs: k v k v, then filler values, queries at the positions noted
    tokens = torch.tensor(
        [
            [1, 4, 2, 5, 6, 7, 2, 6, 7, 6, 7, 6, 7, 6, 1, 7],  # key 2 (at 2) asked at 6, key 1 (at 0) at 14
            [3, 6, 1, 7, 4, 5, 4, 5, 1, 5, 3, 5, 4, 5, 4, 5],  # key 1 (at 2) asked at 8, key 3 (at 0) at 10
        ]
    )
    targets = torch.full_like(tokens, IGNORE)
    targets[0, 6], targets[0, 14], targets[1, 8], targets[1, 10] = 5, 4, 7, 6
    predicted = torch.zeros_like(tokens)  # 0 is no value
    predicted[0, 6], predicted[1, 10] = 5, 6  # right at gaps 4 and 10; wrong at gaps 14 and 6
    batch = {"tokens": tokens, "targets": targets}
    by_8 = task.breakdown(batch, predicted, block_size=8)
    gaps = ("[0, T/4)", "[T/4, T/2)", "[T/2, 3T/4)", "[3T/4, T)")
    assert by_8["queries_by_gap"] == dict(zip(gaps, [0, 2, 1, 1]))  # gaps 4 and 6; 10; 14
    assert by_8["accuracy_by_gap"] == dict(zip(gaps, [None, 0.5, 1.0, 0.0]))  # None: no query there
    # blocks of 8: only query 6 shares block 0 with its key (at 2)
    assert by_8["queries_by_block"] == {"own": 1, "earlier": 3}
    assert by_8["accuracy_by_block"] == {"own": 1.0, "earlier": pytest.approx(1 / 3)}
    by_4 = task.breakdown(batch, predicted, block_size=4)  # blocks of 4: every key before its query's block
    assert by_4["queries_by_block"] == {"own": 0, "earlier": 4}
    assert by_4["accuracy_by_block"] == {"own": None, "earlier": 0.5}
