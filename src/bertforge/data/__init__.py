"""Data stages: Wikipedia dump -> text -> sentences -> pre-training instances in TFRecord shards.

    wiki.py          download (resumable, checksummed), WikiExtractor, sentence split
    vocab.py         the default vocab, --vocab-file / --tokenizer, WordPiece training
    text_tasks.py    input text cut into bounded tasks at document boundaries (tokenize)
    corpus.py        JSONL, Parquet and Hugging Face datasets as tokenize's text input
    fast_wordpiece.py  the word-cached WordPiece encoder beside the tokenizers reference
    instances.py     `bertforge tokenize`: sentences -> masked LM + NSP (or MLM-only) instances
    masking.py       masked-LM masking, static and dynamic, token and whole-word
    example.py       tf.train.Example records: encode, vectorised decode
    shards.py        record batches into shards, disk spills for the global shuffles
    tfrecord.py      TFRecord framing with masked CRC32C, `.index` files, `bertforge index`
    loader.py        the pre-training reader (exact resume) and the checks of what shards hold
    packing.py       the packers (NNLSHP, SPFHP) on length histograms
    pack.py          `bertforge pack`: packed shards in bounded memory
    shuffle.py       `bertforge shuffle`: a global shuffle in bounded memory
    sample.py        the real Wikipedia sample the demo and tests use
    stage.py         the stages' habits: self-describing manifests (stage.describe),
                     skip-if-complete, counted skips, workers
"""
