"""One config tree for every subcommand: typed sections, YAML presets, generated flags.

Every `bertforge` subcommand's configuration is a `RunConfig`: a preset name plus typed
`Section`s (torchtitan style) whose fields declare their type, default, help and bounds
once. From those declarations come the flags (flags.py: `--field-name`, dashes for
underscores), the preset keys (presets/*.yml, flat), the saved config of a run directory
and `--print-config`, so the four can never drift apart; and a value is validated only in
its section, when the section is built. Typos are errors with a did-you-mean (difflib):
preset names, preset keys, choice values and flags.

    core.py       the mechanism: opt(), coerce(), Section, RunConfig (to_dict/from_dict,
                  flat construction, required fields)
    presets.py    YAML presets with `inherit:` and the three layers: defaults <- preset <- flags
    pretrain.py   pretrain's sections (model, data, optim, train, checkpoint; SQuAD reuses
                  four of them) and demo
    serve.py      the SQuAD window shape, serve (presets/serve.yml), export, serve-bench
    data.py       wiki, vocab, tokenize (InstanceConfig), index, pack, shuffle, sample
    benchmark.py  benchmark
SQuAD's own sections and squad-eval live with the recipe, in squad/config.py.

Nothing here imports torch, transformers, numpy or the model (the model section becomes a
transformers.BertConfig in model/bert.py: bert_config), so building the CLI stays fast; measured with `bertforge
--help` and `bertforge pretrain --help` in cli.py's docstring.
"""

from bertforge.config.benchmark import BenchmarkConfig, BenchmarkSection
from bertforge.config.core import (RunConfig, Section, coerce, did_you_mean, flag_name, opt,
                                   parse_bool)
from bertforge.config.data import (IndexConfig, InstanceConfig, PackConfig, SampleFetchConfig,
                                   ShuffleConfig, TokenizeConfig, VocabTrainConfig,
                                   WikiDownloadConfig, WikiExtractConfig, WikiPreprocessConfig)
from bertforge.config.presets import (default_preset_file, load_config, load_presets,
                                      preset_layers)
from bertforge.config.pretrain import (CheckpointSection, DataSection, DemoConfig, ModelSection,
                                       OptimSection, PretrainConfig, TrainSection)
from bertforge.config.serve import (BatchingSection, BenchConfig, ExportConfig, ServeConfig,
                                    WindowSection)

__all__ = [
    "BatchingSection", "BenchConfig", "BenchmarkConfig", "BenchmarkSection", "CheckpointSection",
    "DataSection", "DemoConfig", "ExportConfig", "IndexConfig", "InstanceConfig", "ModelSection",
    "OptimSection", "PackConfig", "PretrainConfig", "RunConfig", "SampleFetchConfig", "Section",
    "ServeConfig", "ShuffleConfig", "TokenizeConfig", "TrainSection", "VocabTrainConfig",
    "WikiDownloadConfig", "WikiExtractConfig", "WikiPreprocessConfig", "WindowSection", "coerce",
    "default_preset_file", "did_you_mean", "flag_name", "load_config", "load_presets", "opt",
    "parse_bool", "preset_layers",
]
