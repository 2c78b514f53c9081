"""Convert CLIP's BPE file into the Hugging Face ``tokenizer/`` layout SD 1.x ships.

Input: ``bpe_simple_vocab_16e6.txt.gz``, the BPE merge list of OpenAI's CLIP, as shipped in the
``open-clip-torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``; MIT licence). Get it
without installing the package::

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

Output (default ``p2l_jax/assets/clip_tokenizer/``): ``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``.

The vocabulary is built exactly as CLIP's ``SimpleTokenizer`` builds it:

    ids 0..255        the 256 byte symbols of ``bytes_to_unicode`` (printable bytes first)
    ids 256..511      the same symbols with the end-of-word suffix ``</w>``
    ids 512..512+M-1  the concatenation ``a + b`` of merge rank r = id - 512
    then              ``<|startoftext|>``, ``<|endoftext|>``

with M = 49152 - 256 - 2 = 48894 merges: the lines after the header line of the file, in
rank order. Total 256 + 256 + 48894 + 2 = 49408 tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from p2l_jax.tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "p2l_jax" / "assets" / "clip_tokenizer"


def read_merges(bpe_text: str, num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """The first ``num_merges`` merge pairs after the header line, as SimpleTokenizer reads them."""
    lines = bpe_text.split("\n")[1:num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != num_merges or bad:
        raise ValueError(f"expected {num_merges} merge lines of two symbols, got {len(merges)} "
                         f"lines, malformed at ranks {bad[:5]}")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in SimpleTokenizer order (see the module docstring)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the merge results")
    return vocab


def tokenizer_files(merges: list[tuple[str, str]]) -> dict[str, str]:
    """File name -> text of the four files of an SD 1.x ``tokenizer/`` directory."""
    vocab = build_vocab(merges)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def convert(bpe_gz: Path, output: Path, num_merges: int = NUM_MERGES) -> None:
    """Read ``bpe_gz`` and write the tokenizer files into ``output``."""
    merges = read_merges(gzip.open(bpe_gz).read().decode("utf-8"), num_merges)
    output.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(merges).items():
        (output / name).write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    convert(args.bpe_gz, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
