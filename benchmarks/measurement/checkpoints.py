"""Synthetic checkpoints for the merge benchmarks: a random base and noisy copies, plus tiny example files.

Example:
    ::

        from measurement.checkpoints import build_checkpoints

        build_checkpoints(workdir, num_checkpoints=3, size="minilm")  # workdir/base, workdir/ckpt0..2
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

#: Model shapes: (transformers config class, options).
SIZES = {
    "mpnet": (
        "MPNetConfig",
        {"vocab_size": 30527, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    ),
    "minilm": (
        "BertConfig",
        {
            "vocab_size": 30522,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
        },
    ),
}


def write_examples(workdir: Path, count: int = 20) -> list[Path]:
    """Synthetic IR records and STS pairs for ``cocktail-folder`` (no shared data needed)."""
    import random

    words = "the a man woman child dog cat car house park music guitar market city river food book game".split()
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(8))

    ir = [{"query": sentence(), "positives": [sentence()], "negatives": [sentence()]} for _ in range(count)]
    sts = [{"sentence1": sentence(), "sentence2": sentence(), "score": rng.uniform(0, 5)} for _ in range(count)]
    paths = [workdir / "examples-ir.jsonl", workdir / "examples-sts.jsonl"]
    for path, records in zip(paths, (ir, sts)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf8")
    return paths


def build_checkpoints(workdir: Path, num_checkpoints: int, size: str = "mpnet") -> None:
    """Base: a random MPNet with all-mpnet-base-v2's config (or a BERT with all-MiniLM-L6-v2's: ``size="minilm"``),
    the all-MiniLM-L6-v2 (BERT uncased) tokenizer, mean pooling and Normalize. Checkpoints: base + N(0, 0.002^2)
    noise on every float tensor (a different seed each)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    torch.manual_seed(0)
    from codiemb_st.default_model import default_model_path

    tokenizer_dir = Path(default_model_path())
    config_name, options = SIZES[size]
    config = getattr(transformers, config_name)(**options)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        transformers.AutoModel.from_config(config).save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(tokenizer_dir / name, tmp)
        transformer = Transformer(tmp, max_seq_length=384)
        hidden = options["hidden_size"]
        model = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device="cpu")
        model.save(str(workdir / "base"))
    del model, transformer
    base_state = load_file(str(workdir / "base" / "model.safetensors"))
    for c in range(num_checkpoints):
        generator = torch.Generator().manual_seed(100 + c)
        shutil.copytree(workdir / "base", workdir / f"ckpt{c}")
        state = {
            name: t + 0.002 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
            for name, t in base_state.items()
        }
        save_file(state, str(workdir / f"ckpt{c}" / "model.safetensors"), metadata={"format": "pt"})
        del state
    write_examples(workdir)
