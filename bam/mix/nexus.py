"""Nexus (METHOD.md 3.3): the fixed domain embeddings its router projects.

Each routed expert i has a fixed vector d_i describing its domain. The paper takes the mean text
embedding of the domain's training data; any fixed vector per domain works. Two encoders:

- `hidden-mean` (default, offline): the mean of a model's own final hidden states (the
  `last_hidden_state` of its output, after the final norm) over the first `max_tokens` tokens of
  the domain's train split. Every domain must be embedded by the same model, the seed normally,
  so that the vectors live in one space.
- `sentence-model`: a local sentence-transformers or Hugging Face encoder directory; each train
  document (truncated to `seq_len` tokens) is mean-pooled over its tokens, and the domain
  embedding is the mean over documents, up to `max_tokens` encoder tokens in all.

Either way the vector is rescaled to root-mean-square 1: the router's projection then sees inputs
on the scale of a normed hidden state whatever encoder produced them (and unit-variance inputs
are what its small random initialisation assumes).

How the vectors were computed (`EmbeddingSource`) travels with them: in the embeddings file, then
in the mixed model's config (`nexus_embedding_source`), so `bam add-expert` embeds a new domain
exactly like the existing ones (bam/mix/extend.py). The mixing and adding of experts themselves are
in bam/mix/mixing.py and bam/mix/add_expert.py.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bam.data.batches import iter_eval_batches
from bam.data.shards import TokenizedDomain, document_split
from bam.data.sources import Domain, DomainSpec, check_unique_names, parse_domain_spec
from bam.errors import BamError

EMBEDDING_METHODS = ("hidden-mean", "sentence-model")
FILE_FORMAT = 1
SAFETENSORS_METADATA_KEY = "bam_domain_embeddings"


# ---------------------------------------------------------------------------------------------
# How embeddings are computed, and the vectors themselves


@dataclass(frozen=True)
class EmbeddingSource:
    """Everything that decides a domain's embedding besides its text.

    `model` is the encoder directory (the model whose hidden states are averaged, or the sentence
    model). `val_fraction`/`test_fraction` fix which documents are the train split (bam.data.shards's
    hash rule), `split` is the split sampled, `max_tokens` the sample size per domain.
    """

    method: str = "hidden-mean"
    model: str = ""
    max_tokens: int = 65536
    seq_len: int = 256
    split: str = "train"
    val_fraction: float = 0.05
    test_fraction: float = 0.0

    def __post_init__(self):
        if self.method not in EMBEDDING_METHODS:
            raise BamError(f"embedding method {self.method!r}: expected one of {', '.join(EMBEDDING_METHODS)}")
        for name in ("max_tokens", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BamError(f"embedding {name}={value!r}: expected a positive integer")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict, where: str) -> EmbeddingSource:
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as err:
            raise BamError(f"{where}: invalid embedding source ({err})") from None


@dataclass
class DomainEmbeddings:
    """Domain name -> fixed vector [m] (in expert order), and how they were computed."""

    vectors: dict[str, torch.Tensor]
    source: dict

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @property
    def dim(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def cosine_range(self) -> tuple[float, float] | None:
        """The smallest and largest cosine similarity between two domains (None for one domain):
        how far apart they are, as nearly parallel vectors give the router little to start from."""
        unit = torch.nn.functional.normalize(torch.stack(list(self.vectors.values())), dim=-1)
        if len(unit) < 2:
            return None
        cosine = unit @ unit.T
        off_diagonal = cosine[~torch.eye(len(unit), dtype=torch.bool)]
        return float(off_diagonal.min()), float(off_diagonal.max())

    def select(self, names: Sequence[str]) -> DomainEmbeddings:
        """The vectors of `names`, in that order (the order of the experts they describe)."""
        missing = [n for n in names if n not in self.vectors]
        if missing:
            raise BamError(f"domain embeddings: no vector for {missing[0]!r} (have {', '.join(self.vectors)})")
        return DomainEmbeddings({n: self.vectors[n] for n in names}, dict(self.source))

    def check(self, where: str) -> None:
        if not self.vectors:
            raise BamError(f"{where}: no domain embeddings")
        dims = {tuple(v.shape) for v in self.vectors.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise BamError(f"{where}: domain embeddings must be vectors of one length, got shapes {sorted(dims)}")
        for name, vector in self.vectors.items():
            if not bool(torch.isfinite(vector).all()):
                raise BamError(f"{where}: domain embedding {name!r} has non-finite values")

    def save(self, path: str | Path) -> Path:
        """Write `.json` (readable) or `.safetensors`, atomically (a temporary file renamed into place)."""
        path = Path(path)
        self.check(str(path))
        if path.suffix not in (".json", ".safetensors"):
            raise BamError(f"{path}: expected a .json or .safetensors file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            if path.suffix == ".json":
                body = {"format": FILE_FORMAT, "source": self.source,
                        "embeddings": {n: v.float().tolist() for n, v in self.vectors.items()}}
                Path(tmp).write_text(json.dumps(body) + "\n", encoding="utf-8")
            else:
                # safetensors sorts tensors by name; the order (= expert order) goes in the metadata.
                meta = {"format": str(FILE_FORMAT), "source": json.dumps(self.source),
                        "order": json.dumps(self.names)}
                save_file({n: v.float().contiguous() for n, v in self.vectors.items()}, tmp,
                          metadata={SAFETENSORS_METADATA_KEY: json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> DomainEmbeddings:
        path = Path(path)
        if not path.is_file():
            raise BamError(f"{path}: no such file (make one with `bam embed-domains`)")
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {}).get(SAFETENSORS_METADATA_KEY, "{}"))
                    order = json.loads(meta.get("order", "null")) or sorted(f.keys())
                    vectors = {name: f.get_tensor(name).float() for name in order}
                source = json.loads(meta.get("source", "{}"))
            except (SafetensorError, OSError, ValueError, KeyError) as err:
                raise BamError(f"{path}: not a domain-embeddings file ({err})") from None
        else:
            try:
                body = json.loads(path.read_text(encoding="utf-8"))
                vectors = {name: torch.tensor(v, dtype=torch.float32) for name, v in body["embeddings"].items()}
                source = body.get("source", {})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise BamError(f"{path}: not a domain-embeddings file ({err!r})") from None
        embeddings = cls(vectors, source)
        embeddings.check(str(path))
        return embeddings


def rms_normalize(vector: torch.Tensor) -> torch.Tensor:
    """The vector rescaled to root-mean-square 1 (see the module docstring)."""
    rms = vector.double().square().mean().sqrt()
    if not math.isfinite(float(rms)) or float(rms) == 0.0:
        raise BamError("domain embedding is zero or not finite: the encoder's outputs are degenerate")
    return (vector.double() / rms).float()


# ---------------------------------------------------------------------------------------------
# The two encoders


@torch.no_grad()
def domain_embedding(model, domain: TokenizedDomain, max_tokens: int = 65536, seq_len: int = 256,
                     batch_size: int = 8, split: str = "train") -> torch.Tensor:
    """`hidden-mean`: the mean final hidden state of `model` over the first `max_tokens` tokens of
    `domain`'s `split`, rescaled to RMS 1 -> fp32 [hidden_size].

    `model` is a BamForCausalLM (bam.formats.model_dir.load_model); windows are bam.data.batches's evaluation
    windows, so every sampled token is seen once, with the context of its window.
    """
    from bam.eval.perplexity import autocast_for  # noqa: PLC0415  (evaluate imports data; keep this module light)

    if seq_len > model.config.max_position_embeddings:
        raise BamError(f"embedding seq_len={seq_len} is beyond the model's context "
                       f"(max_position_embeddings={model.config.max_position_embeddings})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_D = torch.zeros(model.config.hidden_size, dtype=torch.float64, device=device)
    count = 0
    try:
        for tokens, mask in iter_eval_batches(domain, split, seq_len, batch_size, max_tokens):
            tokens, mask = tokens.to(device), mask.to(device)
            with autocast_for(device):
                hidden_BTD = model(input_ids=tokens[:, :-1], use_cache=False).last_hidden_state
            total_D += hidden_BTD[mask].double().sum(dim=0)
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return rms_normalize((total_D / count).cpu())


def train_documents(domain: Domain, val_fraction: float, test_fraction: float) -> Iterator[str]:
    """The domain's documents that bam.data.shards puts in the train split (the expert's training data)."""
    for text in domain.documents():
        if document_split(text, val_fraction, test_fraction) == "train":
            yield text


@torch.no_grad()
def sentence_model_embedding(encoder_dir: str | Path, documents: Iterable[str], max_tokens: int = 65536,
                             seq_len: int = 256, batch_size: int = 16) -> torch.Tensor:
    """`sentence-model`: mean over documents of the mean-pooled token states of a local encoder
    (sentence-transformers or any Hugging Face AutoModel directory), rescaled to RMS 1.

    Documents are read until `max_tokens` encoder tokens (after truncation to `seq_len`) are used.
    Nothing is downloaded: the directory must hold the model and its tokenizer.
    """
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "config.json").is_file() and (encoder_dir / "0_Transformer" / "config.json").is_file():
        encoder_dir = encoder_dir / "0_Transformer"  # older sentence-transformers layout
    if not (encoder_dir / "config.json").is_file():
        raise BamError(f"{encoder_dir}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        encoder = AutoModel.from_pretrained(encoder_dir, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise BamError(f"{encoder_dir}: cannot load the sentence model ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # decoder-style encoders: padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    total, n_documents, n_tokens = None, 0, 0
    batch: list[str] = []

    def encode(texts: list[str]) -> None:
        nonlocal total, n_documents, n_tokens
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        hidden_BTM = encoder(**enc).last_hidden_state.double()
        mask_BT1 = enc["attention_mask"].unsqueeze(-1).double()
        per_document_BM = (hidden_BTM * mask_BT1).sum(dim=1) / mask_BT1.sum(dim=1).clamp(min=1)
        total = per_document_BM.sum(dim=0) if total is None else total + per_document_BM.sum(dim=0)
        n_documents += len(texts)
        n_tokens += int(enc["attention_mask"].sum())

    for text in documents:
        batch.append(text)
        if len(batch) == batch_size:
            encode(batch)
            batch = []
            if n_tokens >= max_tokens:
                break
    if batch and n_tokens < max_tokens:
        encode(batch)
    if n_documents == 0:
        raise BamError("sentence-model embedding: the domain has no train documents")
    return rms_normalize(total / n_documents)


# ---------------------------------------------------------------------------------------------
# Embedding domains the way a source says


def _as_domain(item: str | DomainSpec | Domain) -> Domain:
    return item if isinstance(item, Domain) else Domain.from_spec(item)


def domain_name(item: str | DomainSpec | Domain | TokenizedDomain) -> str:
    """The name of a domain given as a `NAME=PATH` spec or as a (parsed, tokenized) domain."""
    return parse_domain_spec(item).name if isinstance(item, str) else item.name


def embed_domains(data: Sequence[str | DomainSpec | Domain | TokenizedDomain], source: EmbeddingSource, *,
                  model=None, tokenizer=None, cache_dir: str | Path | None = None,
                  batch_size: int = 8) -> DomainEmbeddings:
    """One embedding per item of `data`, computed as `source` says.

    `model` may be passed already loaded (hidden-mean); otherwise `source.model` is loaded.
    `tokenizer` (default: the model's own) and `cache_dir` (default: bam train's) are used to
    tokenize `NAME=PATH` specs and Domains; prepared TokenizedDomains are used as they are.
    """
    names = [domain_name(item) for item in data]
    check_unique_names(names)
    if not source.model and (source.method == "sentence-model" or model is None):
        raise BamError("embedding source names no model directory")
    vectors = {}
    if source.method == "sentence-model":
        for item in data:
            if isinstance(item, TokenizedDomain):
                raise BamError(f"domain '{item.name}': a sentence model needs the text, not a tokenized domain")
            documents = train_documents(_as_domain(item), source.val_fraction, source.test_fraction)
            vectors[domain_name(item)] = sentence_model_embedding(source.model, documents, source.max_tokens,
                                                               source.seq_len, batch_size)
        return DomainEmbeddings(vectors, source.as_dict())

    from bam.formats.model_dir import load_model, tokenizer_dir_of  # noqa: PLC0415
    from bam.data.shards import prepare_domain  # noqa: PLC0415

    if model is None:
        model = load_model(source.model)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    for item in data:
        if isinstance(item, TokenizedDomain):
            domain = item
        else:
            from bam.data.shards import default_cache_dir  # noqa: PLC0415

            if tokenizer is None:
                from bam.data.tokenizer import load_tokenizer  # noqa: PLC0415

                if not source.model:
                    raise BamError(f"domain '{domain_name(item)}': no tokenizer to tokenize it with; pass one")
                tokenizer = load_tokenizer(tokenizer_dir_of(source.model) or source.model)
            cache = Path(cache_dir) if cache_dir else default_cache_dir()
            domain = prepare_domain(_as_domain(item), tokenizer, cache, source.val_fraction, source.test_fraction)
        vectors[domain.name] = domain_embedding(model, domain, source.max_tokens, source.seq_len, batch_size,
                                                source.split)
    return DomainEmbeddings(vectors, source.as_dict())
