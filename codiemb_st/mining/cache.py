"""The embedding cache of mining: texts encoded once, in shards, reused by every later call that needs them.

A list of texts is encoded in fixed shards of ``shard_size`` texts (one ``encode_query``/``encode_document`` call
each). With a cache folder every shard is three files under ``CACHE_DIR/<encoder>/``:

- ``<side>-<key>.npy``: the embeddings (``float32`` or ``float16``), read memory-mapped;
- ``<side>-<key>.ids.npy``: the texts' token-id identities (the IR loss's duplicate rule), so that a cached call
  tokenizes nothing;
- ``<side>-<key>.json``: rows, dimension, dtype and the SHA-256 of both arrays, written *last*.

``<encoder>`` is a fingerprint of the model's content (every weight tensor, the tokenizer, the modules' configs and
``max_seq_length``), so a model trained again into the same folder, or the same hub id at another revision, never
reuses another model's embeddings; ``<key>`` hashes the encoder, the side (query/document), the prompt text, the
dtype and the shard's texts. Each file is written to a temporary file and renamed into place, so a run killed
mid-encode (``kill -9``) leaves complete shards and at most a hidden temporary file; a shard counts only when its
``.json`` exists and both checksums and shapes match it (a damaged shard is logged and encoded again). The next run
encodes only the missing shards: its output equals an uninterrupted run's, because every shard is encoded alone
either way and the search always reads the (rounded) values the cache holds.

Without a cache folder the same shards are encoded into one in-memory ``float32`` array, so the output does not
depend on whether a cache was used (with ``float32`` cache files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from codiemb_st.file_io import write_atomic, write_json_atomic
from codiemb_st.mining.distributed import RankContext

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

CACHE_DTYPES = ("float32", "float16")
#: Texts per shard: big enough that the sort-by-length inside one ``encode`` call pads little, small enough that a
#: killed run loses little work (16k texts are 25 MB of float32 MiniLM embeddings).
SHARD_SIZE = 16384


def encoder_fingerprint(model: SentenceTransformer) -> str:
    """A SHA-256 of everything that decides a model's embeddings: the modules (class and config), every tensor of
    the state dict (name, dtype, shape, bytes; but a BERT pooler's, which no embedding uses), the tokenizer and
    ``max_seq_length``.

    The content, not the path or hub id: a folder trained again, or a hub model at another revision, gets another
    fingerprint. Hashing reads every weight once (about 0.2 s for MiniLM's 90 MB; seconds for billions of
    parameters), a small price next to encoding a corpus.

    Args:
        model: Any SentenceTransformer.

    Returns:
        A 64-character hex digest.

    Example:
        ::

            key = encoder_fingerprint(model)[:16]  # the cache's folder name for this model
    """
    import torch

    digest = hashlib.sha256()
    for module in model:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        digest.update(f"{type(module).__name__}:{json.dumps(config, sort_keys=True, default=str)}\n".encode())
    digest.update(f"max_seq_length={model.max_seq_length}\n".encode())
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the padding/truncation settings, which every tokenizer call sets anew (not the model's identity).
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    elif tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if ".pooler." in f".{name}":
            # A BERT-style pooler: sentence-transformers embeds from the token embeddings and never uses it, and a
            # checkpoint saved without it gets a fresh random one at every load (a new fingerprint, a cache miss).
            continue
        data = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}\n".encode())
        # Raw bytes whatever the dtype (numpy has no bfloat16), hashed in place: a copy of every tensor would leave
        # the model's size in the process's resident memory (the allocator keeps freed large blocks).
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def resolve_prompt(
    model: SentenceTransformer, side: Literal["query", "document"], prompt: str | None, prompt_name: str | None
) -> str | None:
    """The prompt text ``encode_query``/``encode_document`` would use (part of the cache key).

    As sentence-transformers resolves it: ``prompt``, else ``model.prompts[prompt_name]``, else the model's
    ``query`` prompt (queries) or its ``document``/``passage``/``corpus`` prompt (documents), else its default
    prompt, else none.

    Args:
        model: The encoder.
        side: ``"query"`` or ``"document"``.
        prompt: Prompt text (wins over everything).
        prompt_name: A key of ``model.prompts``.

    Returns:
        The prompt text, or ``None``.

    Raises:
        ValueError: If ``prompt_name`` is not one of ``model.prompts``.

    Example:
        ::

            resolve_prompt(model, "query", None, None)  # model.prompts["query"] when the model has one
    """
    if prompt is not None:
        return prompt
    prompts = getattr(model, "prompts", None) or {}
    if prompt_name is None:
        names = ["query"] if side == "query" else ["document", "passage", "corpus"]
        prompt_name = next((name for name in names if name in prompts), None)
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"prompt name {prompt_name!r} is not one of the model's prompts {sorted(prompts)}.")
        return prompts[prompt_name]
    default = getattr(model, "default_prompt_name", None)
    return prompts.get(default) if default is not None else None


@dataclass
class EmbeddingStore:
    """The embeddings of a list of texts, in order, shard by shard (memory-mapped cache files or in-memory arrays).

    Args:
        shards: ``(rows, dim)`` arrays, float32 or float16 (cache files are opened memory-mapped).
        identities: One int64 token-id identity per text.
        dim: Embedding dimension.
        paths: The cache file of each shard (``None`` in memory); blocks are read from them without the memory map,
            so that pages read once do not stay in the process's resident memory.

    Example:
        ::

            store = embed_texts(model, texts, side="document", cache_dir="cache")
            vectors = store.rows([0, 5, 9])  # float32 (3, dim)
    """

    shards: list[np.ndarray]
    identities: np.ndarray
    dim: int
    paths: list[Path | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The embeddings of the given rows, as float32 ``(len(indices), dim)``."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        if not len(indices):
            return out
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            out[where] = self.shards[shard][indices[where] - self.starts[shard]]
        return out

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every shard, for :meth:`read_block`."""
        return [(int(self.starts[i]), int(self.starts[i + 1])) for i in range(len(self.shards))]

    def read_block(self, number: int) -> np.ndarray:
        """Shard ``number`` as a float32 array read from its file (or the in-memory shard)."""
        path = self.paths[number] if number < len(self.paths) else None
        data = np.load(path) if path is not None else self.shards[number]
        return np.ascontiguousarray(data, dtype=np.float32)


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each shard of ``count`` texts."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def text_identities(model: SentenceTransformer, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """One int64 identity per text: the IR loss's hash of its token ids (truncated as the model truncates).

    Example:
        ::

            same = text_identities(model, ["Hello world", "HELLO  WORLD"], 64)  # equal for a lower-casing tokenizer
    """
    from codiemb_st.losses.text_identity import hash_texts

    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        # `preprocess` in sentence-transformers >= 6 (`tokenize` is deprecated there), `tokenize` before.
        features = model.preprocess(batch) if hasattr(model, "preprocess") else model.tokenize(batch)
        out[start : start + batch_size] = hash_texts(features).numpy()
    return out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a handle: np.save(path) would append ".npy" to the temporary file's name.
    with open(path, "wb") as handle:
        np.save(handle, array)


@dataclass
class _Shard:
    """One shard's three cache files."""

    embeddings: Path
    identities: Path
    record: Path

    def load(self, rows: int, dtype: str) -> tuple[np.ndarray, np.ndarray] | str:
        """``(embeddings memory-mapped, identities)``, or why the shard cannot be used (``"missing"`` or a
        description of the damage)."""
        if not self.record.is_file():
            return "missing"
        try:
            record = json.loads(self.record.read_text(encoding="utf-8"))
            embeddings = np.load(self.embeddings, mmap_mode="r")
            identities = np.load(self.identities)
        except (OSError, ValueError) as error:
            return f"unreadable ({error})"
        if record.get("rows") != rows or embeddings.shape != (rows, record.get("dim")) or len(identities) != rows:
            return f"shape {embeddings.shape} / {len(identities)} identities, expected {rows} rows"
        if str(embeddings.dtype) != dtype:
            return f"dtype {embeddings.dtype}, expected {dtype}"
        checksums = record.get("sha256", {})
        if checksums.get("embeddings") != _file_sha256(self.embeddings):
            return "embeddings checksum mismatch"
        if checksums.get("identities") != _file_sha256(self.identities):
            return "identities checksum mismatch"
        return embeddings, identities

    def write(self, embeddings: np.ndarray, identities: np.ndarray, describe: dict[str, Any]) -> None:
        write_atomic(self.embeddings, lambda tmp: _save_npy(tmp, embeddings))
        write_atomic(self.identities, lambda tmp: _save_npy(tmp, identities))
        checksums = {"embeddings": _file_sha256(self.embeddings), "identities": _file_sha256(self.identities)}
        # Written last: a shard whose record exists is complete.
        record = {"rows": len(identities), "dim": int(embeddings.shape[1]), "sha256": checksums, **describe}
        write_json_atomic(self.record, record)


def embed_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    side: Literal["query", "document"],
    prompt: str | None = None,
    prompt_name: str | None = None,
    batch_size: int = 32,
    pool: Any = None,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = "float32",
    shard_size: int = SHARD_SIZE,
    fingerprint: str | None = None,
    context: RankContext | None = None,
    show_progress_bar: bool = True,
) -> EmbeddingStore:
    """Encode ``texts`` (normalized embeddings and token-id identities), shard by shard, through the cache.

    Args:
        model: The encoder.
        texts: The texts, in the order of the store's rows.
        side: ``"query"`` (``encode_query``) or ``"document"`` (``encode_document``).
        prompt: Prompt text (see :func:`resolve_prompt`).
        prompt_name: Prompt name.
        batch_size: Encoding batch size.
        pool: A sentence-transformers multi-process pool (``model.start_multi_process_pool()``), a callable that
            returns one (called only when a shard must be encoded: a full cache starts no processes), or ``None``.
        cache_dir: Cache folder (``None``: encode into memory).
        cache_dtype: ``"float32"`` or ``"float16"`` (half the disk; the search reads the rounded values).
        shard_size: Texts per shard (a shard's key is its texts: another size, or texts inserted before a shard,
            makes new shards; texts appended to a corpus reuse its earlier shards).
        fingerprint: :func:`encoder_fingerprint` of the model, when already computed.
        context: The torchrun ranks: rank ``r`` encodes shards ``r, r + W, ...`` into the shared cache, then every
            rank opens all of them. ``None``: one process.
        show_progress_bar: Show a progress bar over the texts.

    Returns:
        An :class:`EmbeddingStore`.

    Raises:
        ValueError: If the model cannot embed the texts (an unknown ``prompt_name``, say), or with several ranks and
            no ``cache_dir``.
        RuntimeError: If a shard another rank was to write is missing after all ranks finished.

    Example:
        ::

            store = embed_texts(model, passages, side="document", cache_dir="mining-cache")
    """
    from tqdm.auto import tqdm

    context = context or RankContext()
    try:
        resolved = resolve_prompt(model, side, prompt, prompt_name)
    except ValueError as error:
        raise ValueError(f"`model` could not embed the texts: {error}") from None
    encode = model.encode_query if side == "query" else model.encode_document
    ranges = shard_ranges(len(texts), shard_size)
    identity_batch = max(batch_size * 8, 256)

    def encode_shard(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        batch = list(texts[start:stop])
        try:
            embeddings = encode(
                batch,
                prompt=resolved,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                pool=pool() if callable(pool) else pool,
                show_progress_bar=False,
            )
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise ValueError(f"`model` could not embed the texts: {type(error).__name__}: {error}") from error
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != len(batch):
            raise ValueError(f"`model` returned embeddings of shape {tuple(embeddings.shape)}; expected 2-D.")
        return embeddings, text_identities(model, batch, identity_batch)

    progress = tqdm(
        total=len(texts),
        desc="Encoding queries" if side == "query" else "Encoding documents",
        unit="text",
        disable=not show_progress_bar,
    )
    if cache_dir is None:
        if context.world_size > 1:
            raise ValueError(
                "Under torchrun the ranks share their embeddings through the cache: give `cache_dir` (a folder on a "
                "filesystem every rank sees)."
            )
        matrix: np.ndarray | None = None
        identities = np.empty(len(texts), dtype=np.int64)
        for start, stop in ranges:
            embeddings, identities[start:stop] = encode_shard(start, stop)
            if matrix is None:
                matrix = np.empty((len(texts), embeddings.shape[1]), dtype=np.float32)
            matrix[start:stop] = embeddings
            progress.update(stop - start)
        progress.close()
        if matrix is None:
            raise ValueError("No texts to encode.")
        # Views of one array: the dense search uses it without a copy.
        return EmbeddingStore([matrix[a:b] for a, b in ranges], identities, matrix.shape[1], [None] * len(ranges))

    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"`cache_dtype` must be one of {CACHE_DTYPES}; got {cache_dtype!r}.")
    fingerprint = fingerprint or encoder_fingerprint(model)
    folder = Path(cache_dir) / fingerprint[:16]
    if context.rank == 0 and not (folder / "encoder.json").is_file():
        describe_model = {
            "model": _model_name(model),
            "fingerprint": fingerprint,
            "max_seq_length": model.max_seq_length,
        }
        write_json_atomic(folder / "encoder.json", describe_model)
    describe = {"side": side, "prompt": resolved, "dtype": cache_dtype, "model": _model_name(model)}
    shards = []
    for start, stop in ranges:
        key = hashlib.sha256(f"{fingerprint}\0{side}\0{resolved!r}\0{cache_dtype}\0".encode())
        for text in texts[start:stop]:
            encoded = text.encode("utf-8", "surrogatepass")
            key.update(len(encoded).to_bytes(8, "little") + encoded)
        name = f"{side}-{key.hexdigest()[:40]}"
        shards.append(_Shard(folder / f"{name}.npy", folder / f"{name}.ids.npy", folder / f"{name}.json"))

    loaded: list[tuple[np.ndarray, np.ndarray] | str] = []
    reused = 0
    for number, (shard, (start, stop)) in enumerate(zip(shards, ranges)):
        state = shard.load(stop - start, cache_dtype)
        if isinstance(state, str) and state != "missing" and number % context.world_size == context.rank:
            logger.warning("Cache shard %s is damaged (%s): encoding it again.", shard.embeddings, state)
        if not isinstance(state, str) or number % context.world_size != context.rank:
            loaded.append(state)
            if not isinstance(state, str):
                reused += 1
                progress.update(stop - start)
            continue
        embeddings, identities = encode_shard(start, stop)
        shard.write(embeddings.astype(cache_dtype), identities, describe)
        state = shard.load(stop - start, cache_dtype)
        if isinstance(state, str):  # written a moment ago: only a failing disk gets here
            raise RuntimeError(f"Cache shard {shard.embeddings} could not be read back: {state}.")
        loaded.append(state)
        progress.update(stop - start)
    context.barrier()  # every rank has written its shards
    for number, (shard, (start, stop)) in enumerate(zip(shards, ranges)):
        if isinstance(loaded[number], str):
            loaded[number] = shard.load(stop - start, cache_dtype)
            if isinstance(loaded[number], str):
                raise RuntimeError(
                    f"Cache shard {shard.embeddings} ({side}s {start}-{stop}) is {loaded[number]} after rank "
                    f"{number % context.world_size} encoded it: is {cache_dir} on a filesystem every rank sees?"
                )
            progress.update(stop - start)
    progress.close()
    logger.info(
        "%d %ss: %d of %d shards were in the cache %s, the others were encoded into it.",
        len(texts),
        side,
        reused,
        len(ranges),
        folder,
    )
    if not loaded:
        raise ValueError("No texts to encode.")
    return EmbeddingStore(
        [state[0] for state in loaded],
        np.concatenate([state[1] for state in loaded]),
        int(loaded[0][0].shape[1]),
        [shard.embeddings for shard in shards],
    )


def _model_name(model: SentenceTransformer) -> str:
    """The model's path or hub id, for the cache's human-readable records."""
    try:
        return str(model[0].auto_model.config._name_or_path)
    except (AttributeError, IndexError, KeyError, TypeError):
        return type(model).__name__


__all__ = [
    "CACHE_DTYPES",
    "SHARD_SIZE",
    "EmbeddingStore",
    "embed_texts",
    "encoder_fingerprint",
    "resolve_prompt",
    "shard_ranges",
    "text_identities",
]
