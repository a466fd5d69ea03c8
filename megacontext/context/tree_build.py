"""Dataset shards -> the `megacontext_trees` artifact: one MegaContext tree per document.

The GistNet that made the gists is saved beside the trees (safetensors), so
evaluation reads exactly the gists it would recompute. Before JT1 exists the
GistNet is the mean-initialised one from the seed; later cycles pass their
trained GistNet in. Trees of every split are built (training reads train,
evaluation reads val/test).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from megacontext.model.base_model import BaseLM, load_base_model
from megacontext.config import Config, config_hash
from megacontext.errors import ArtifactError
from megacontext.model.gistnet import GistNet, TreeGistEncoder, build_gistnet, load_gistnet, save_gistnet
from megacontext.lifecycle.locks import locked
from megacontext.lifecycle.lineage import is_reusable, manifest_digest, read_manifest, staged_artifact, write_manifest
from megacontext.progress import progress_bar
from megacontext.data.schemas import SPLITS
from megacontext.data.shards import read_split, shards_dir
from megacontext.context.tree import MegaContextTree

KIND = "megacontext_trees"
FORMAT_VERSION = 1
APPEND_CHUNK = 8_192  # tokens per append: incremental ingest, bounded memory


def trees_dir(cfg: Config) -> Path:
    return Path(cfg.paths.artifact_root) / "trees"


@locked(lambda cfg, *, out=None, **_: out or trees_dir(cfg))
def build_trees(cfg: Config, *, base: BaseLM | None = None, gistnet: GistNet | None = None, force: bool = False,
                out: Path | None = None, splits: tuple[str, ...] = SPLITS, gistnet_source: Path | None = None) -> Path:
    """Build a tree per document of `splits` under `out` (default `<artifact_root>/trees`).

    `gistnet_source`: the artifact the GistNet came from (a cycle's JT1 output), linked in the lineage.
    """
    base = base or load_base_model(cfg)
    embedding = base.model.get_input_embeddings()
    gistnet = (gistnet or build_gistnet(cfg.gistnet, embedding, seed=cfg.seed, levels=cfg.wc.levels)).attach(base.model)
    encoder = TreeGistEncoder(gistnet, embedding)
    source = shards_dir(cfg)
    out = out or trees_dir(cfg)
    chash = config_hash(cfg, sections=["gistnet", "wc", "data"]) + f":{base.model_id}:{encoder.identity}:{','.join(splits)}"
    shards_digest = manifest_digest(read_manifest(source))
    if not force and is_reusable(out, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash):
        if read_manifest(out)["inputs"][0]["digest"] == shards_digest:
            return out
    docs = {split: read_split(source, split, tokenizer_name=base.tokenizer.name) for split in splits}
    total = sum(len(d.tokens) for split_docs in docs.values() for d in split_docs)
    counts = {}
    with staged_artifact(out) as staging, progress_bar("building trees", total=total, unit="tokens") as advance:
        save_gistnet(staging / "gistnet", gistnet)
        for split, split_docs in docs.items():
            for doc in split_docs:
                tree = MegaContextTree.create(staging / split / doc.doc_id, base_model_id=base.model_id, encoder=encoder,
                                              levels=cfg.wc.levels, gist_dtype=cfg.gistnet.gist_dtype)
                for start in range(0, len(doc.tokens), APPEND_CHUNK):
                    tree.append(doc.tokens[start : start + APPEND_CHUNK], encoder)
                    advance(min(APPEND_CHUNK, len(doc.tokens) - start))
                tree.check_invariants()
            counts[split] = len(split_docs)
        write_manifest(staging, kind=KIND, format_version=FORMAT_VERSION, config_hash=chash,
                       inputs=[source] + ([gistnet_source] if gistnet_source else []),
                       extra={"base_model_id": base.model_id, "gistnet": encoder.identity, "documents": counts,
                              "tokens": total})
    return out


def open_tree(trees: Path, split: str, doc_id: str, *, base_model_id: str, encoder_identity: str) -> MegaContextTree:
    return MegaContextTree.open(trees / split / doc_id, base_model_id=base_model_id, encoder_identity=encoder_identity)


def load_tree_gistnet(trees: Path, base_model_id: str, model: nn.Module | None = None) -> GistNet:
    """The GistNet saved with a trees artifact; refuses trees built for another base model.
    `model`: the base a hidden-input GistNet reads (`GistNet.attach`)."""
    manifest = read_manifest(trees)
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{trees}: not a megacontext_trees artifact; run `megacontext build-trees`")
    if manifest["base_model_id"] != base_model_id:
        raise ArtifactError(
            f"{trees}: trees were built with base model {manifest['base_model_id']}, not {base_model_id}; "
            "rebuild them with `megacontext build-trees` for this profile"
        )
    return load_gistnet(trees / "gistnet", model)
