"""Tokenizer resolution for every step that tokenizes, and WordPiece vocab training.

Three sources, one result type: a Rust `tokenizers.Tokenizer` that returns word pieces only
(no [CLS]/[SEP] added by encode(): the instance builder places them itself) and never
truncates or pads.
  default         the bert-base-uncased vocab (30522 tokens), shipped inside bertforge
                  (assets/bert-base-uncased-vocab.txt, 232 KB, Apache-2.0: see assets/NOTICE),
                  so the default works offline from any install, no extra package needed
  --vocab-file    any BERT vocab.txt, with BERT's normaliser and pre-tokeniser
  --tokenizer     any fast Hugging Face tokenizer (hub name online, local folder offline)
The first two build the tokenizer from tokenizers' parts directly: ~0.1 s and no import of
transformers or torch (~3 s together), which matters because the speed target times the whole
`bertforge tokenize` command. Only --tokenizer pays for transformers. The built pipeline
matches transformers' BertTokenizerFast on the same vocab (BertNormalizer with
clean_text, Chinese-character spacing, accent stripping tied to lower-casing).

`save_tokenizer_files` writes the same choice as Hugging Face tokenizer files into a model
checkpoint, so `AutoTokenizer.from_pretrained(checkpoint)` works offline.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bertforge.data import stage
from bertforge.data.stage import Summary
from bertforge.files import atomic_output

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# As in tokenizers' BertWordPieceTokenizer: rare scripts' characters become [UNK] rather than
# each taking a slot of a small vocab.
_LIMIT_ALPHABET = 1000
# Package data (pyproject's package-data); the file beside it names its origin and licence.
DEFAULT_VOCAB_FILE = (Path(__file__).resolve().parent.parent / "assets"
                      / "bert-base-uncased-vocab.txt")


def default_vocab_file() -> Path:
    """The bert-base-uncased vocab.txt (30522 tokens) that bertforge ships as package data."""
    return DEFAULT_VOCAB_FILE


def load_tokenizer(vocab_file: Path | None = None, name_or_path: str | None = None,
                   lower_case: bool = True) -> Tokenizer:
    """A fast tokenizer for the chosen source (see module docstring); checks that the BERT
    special tokens [PAD] [UNK] [CLS] [SEP] [MASK] are in its vocab."""
    if vocab_file is not None and name_or_path is not None:
        raise ValueError("pass either --vocab-file or --tokenizer, not both")
    if name_or_path is not None:
        tokenizer, source = _load_pretrained(name_or_path), name_or_path
    else:
        path = Path(vocab_file) if vocab_file is not None else default_vocab_file()
        tokenizer, source = _wordpiece_tokenizer(read_vocab(path), lower_case), str(path)
    check_special_tokens(tokenizer, source)
    return tokenizer


def vocab_sha256(path: Path) -> str:
    """sha256 of a vocab.txt as the tokenize manifest records it (tokens in id order, one per
    line), so a vocab file and a data set can be compared."""
    import hashlib

    vocab = read_vocab(path)
    text = "".join(f"{token}\n" for token in sorted(vocab, key=vocab.__getitem__))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_vocab(path: Path) -> dict[str, int]:
    """A BERT vocab.txt (one token per line, id = line number) as {token: id}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {path} not found (expected a WordPiece vocab.txt, "
                                "one token per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"vocab file {path} is not UTF-8 text (byte {err.start}); expected a "
                         "WordPiece vocab.txt, one token per line") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last token, it adds none
        lines.pop()
    # Same rule as BERT's load_vocab: a token's id is its line number ("\r\n" files too).
    vocab = {line.rstrip("\r"): i for i, line in enumerate(lines)}
    if not vocab:
        raise ValueError(f"vocab file {path} is empty")
    return vocab


def check_special_tokens(tokenizer: Tokenizer, source: str) -> None:
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"the vocab of {source} has no {token} token; BERT pre-training "
                             f"needs all of {' '.join(SPECIAL_TOKENS)}")


def _bert_pipeline(tokenizer: Tokenizer, lower_case: bool) -> Tokenizer:
    # strip_accents=None: strip exactly when lower-casing, as BERT's BasicTokenizer does.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _wordpiece_tokenizer(vocab: dict[str, int], lower_case: bool) -> Tokenizer:
    model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                             max_input_chars_per_word=100)
    return _bert_pipeline(Tokenizer(model), lower_case)


def _load_pretrained(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {err}. Pass a local folder "
                         "with tokenizer files, or a hub name when online") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path!r} has no fast (Rust) version; pass its "
                         "vocab.txt with --vocab-file instead")
    tokenizer = hf.backend_tokenizer
    # Uniform behaviour across sources: word pieces only, full length.
    tokenizer.post_processor = None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def save_tokenizer_files(output_dir: Path, vocab_file: Path | None = None,
                         name_or_path: str | None = None, lower_case: bool = True,
                         model_max_length: int | None = None) -> None:
    """Write Hugging Face tokenizer files (tokenizer_config.json, tokenizer.json, vocab.txt
    where the tokenizer has one) for the source that load_tokenizer would use with the same
    arguments, so that `AutoTokenizer.from_pretrained(output_dir)` works offline."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if vocab_file is not None and name_or_path is not None:
        raise ValueError("pass either --vocab-file or --tokenizer, not both")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if name_or_path is not None:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    else:
        vocab = read_vocab(Path(vocab_file) if vocab_file is not None else default_vocab_file())
        ordered = sorted(vocab, key=vocab.__getitem__)
        with atomic_output(output_dir / "vocab.txt") as tmp:
            tmp.write_text("".join(t + "\n" for t in ordered), encoding="utf-8")
        # from_pretrained on a folder holding only vocab.txt builds the fast BERT tokenizer
        # in transformers 4.x and 5.x alike (their constructors' arguments differ).
        hf = BertTokenizerFast.from_pretrained(output_dir, do_lower_case=lower_case)
    if model_max_length is not None:
        hf.model_max_length = model_max_length
    hf.save_pretrained(output_dir)


def train_vocab(corpus: list[Path], vocab_size: int, output_dir: Path, lower_case: bool = True,
                min_frequency: int = 2) -> Summary:
    """Train a BERT WordPiece vocab on text files (or folders of them); write
    output_dir/vocab.txt (ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]) and tokenizer.json, and
    the stage manifest that says what made them (a re-run with the same corpus and settings
    is "already complete"; other ones train afresh).

    Reproducible: the same corpus and settings give the same vocab.txt byte for byte, in any
    process. tokenizers' trainer (0.23) alone does not: it numbers the continuing-subword
    tokens ("##e") in hash-map order, and those ids break ties between equally frequent merges
    (huggingface/tokenizers#1794, fix proposed in #2066); two runs on the 2.6 MB sample gave
    vocabs differing in 259 of 8,192 lines, enough to move a demo's held-out accuracy by a
    point. So a first pass (no merges) finds the continuing-subword tokens, and the real pass
    gets them, sorted, right after the special tokens, where the trainer numbers them in that
    order. Cost: the corpus is read and counted twice (0.8 s for both passes on the 2.6 MB
    sample against 0.5 s for one unpinned pass)."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"--vocab-size {vocab_size} is too small: it must hold the "
                         f"{len(SPECIAL_TOKENS)} special tokens and some text")
    files = [str(f) for f in _corpus_files(corpus)]
    if sum(Path(f).stat().st_size for f in files) == 0:
        raise ValueError(f"the corpus ({', '.join(map(str, corpus))}) holds no text")
    output_dir = Path(output_dir)
    for entry in map(Path, corpus):
        if entry.is_dir() and output_dir.resolve().is_relative_to(entry.resolve()):
            raise ValueError(f"--output {output_dir} is inside the corpus folder {entry}: its "
                             "vocab.txt would be read as text; give an output folder outside it")
    # format 2: the "##x" tokens pinned (the unpinned trainer before it wrote no manifest).
    params = {"vocab_size": vocab_size, "lower_case": lower_case,
              "min_frequency": min_frequency, "limit_alphabet": _LIMIT_ALPHABET,
              "trainer": f"tokenizers {version('tokenizers')}", "format": 2}
    run = stage.begin(output_dir, "vocab", params, files, outputs=r"vocab\.txt|tokenizer\.json")
    if run.done is not None:
        return run.done
    alphabet_only = _train_wordpiece(files, 1, min_frequency, SPECIAL_TOKENS, lower_case)
    pinned = sorted(t for t in alphabet_only if t.startswith("##"))
    trained = _train_wordpiece(files, vocab_size, min_frequency, [*SPECIAL_TOKENS, *pinned],
                               lower_case)
    # As with the trainer alone, an alphabet larger than vocab_size is kept whole.
    ordered = sorted(trained, key=trained.__getitem__)
    path = output_dir / "vocab.txt"
    with atomic_output(path) as tmp:
        tmp.write_text("".join(t + "\n" for t in ordered), encoding="utf-8")
    # Built from vocab.txt rather than saved from the trainer's tokenizer, which holds the
    # pinned "##x" tokens as added special tokens (it would match "##e" in raw text).
    with atomic_output(output_dir / "tokenizer.json") as tmp:
        _wordpiece_tokenizer(read_vocab(path), lower_case).save(str(tmp))
    summary = Summary("vocab train")
    summary.counts.update({"files in": len(files), "tokens out": len(ordered)})
    run.finish({path: len(ordered), output_dir / "tokenizer.json": None}, summary,
               data={"tokenizer": {"vocab_sha256": vocab_sha256(path), "vocab_size": len(ordered),
                                   "lower_case": lower_case}})
    return summary


def _train_wordpiece(files: list[str], vocab_size: int, min_frequency: int,
                     special_tokens, lower_case: bool) -> dict[str, int]:
    tokenizer = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lower_case)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(special_tokens),
                                        limit_alphabet=_LIMIT_ALPHABET,
                                        continuing_subword_prefix="##",
                                        show_progress=not os.environ.get("BERTFORGE_NO_PROGRESS"))
    tokenizer.train(files, trainer)
    return tokenizer.get_vocab(with_added_tokens=True)


def _corpus_files(corpus: list[Path]) -> list[Path]:
    files: list[Path] = []
    for entry in map(Path, corpus):
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(entry).parts))
            if not found:
                raise ValueError(f"corpus folder {entry} holds no files")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"corpus path {entry} not found")
    return files
