"""Train the hub-free tokenizer shipped in recipes/offline_tasks/data/tokenizer/.

A 4,000-piece Unigram model (the SentencePiece algorithm, trained with the
``tokenizers`` library) on the bundled debsum train sample, wrapped in
``transformers.T5Tokenizer`` so it has T5's layout: <pad>=0, </s>=1, <unk>=2, no
<extra_id_*> tokens, "</s>" appended to every sequence. Load it with
``AutoTokenizer.from_pretrained(offline_tasks.proxy.TOKENIZER_DIR)``; rebuild with

    python scripts/make_tokenizer.py
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


def texts(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["document"]
            yield row["summary"]


def train_unigram(files: list[Path], vocab_size: int) -> list[tuple[str, float]]:
    tok = Tokenizer(models.Unigram())
    # Same pre-tokenization as T5Tokenizer, so the learned pieces are the ones it will look up.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", shrinking_factor=0.75)
    tok.train_from_iterator((t for f in files for t in texts(f)), trainer=trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[:3]] != SPECIALS:
        raise RuntimeError(f"special tokens landed at {vocab[:3]}, expected {SPECIALS} first")
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", type=Path, default=ROOT / "recipes" / "offline_tasks" / "data" / "debsum" / "train.jsonl.gz")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "recipes" / "offline_tasks" / "data" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--extra-ids", type=int, default=32, help="<extra_id_*> sentinels for span-corruption pre-training")
    args = parser.parse_args()
    vocab = train_unigram([args.train_file], args.vocab_size)
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=args.extra_ids, model_max_length=512)
    tokenizer.save_pretrained(args.output_dir)
    sample = "summarize: A free, open-source real-time strategy game."
    print(f"{len(tokenizer)} tokens -> {args.output_dir}; {sample!r} -> {tokenizer.tokenize(sample)}")


if __name__ == "__main__":
    main()
