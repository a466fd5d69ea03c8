from __future__ import annotations

from pathlib import Path

from dagster import materialize

from orchestration.assets.data import corpus, dataset_shards
from orchestration.definitions import defs
from orchestration.resources import MegaContextConfig

ASSET_GRAPH = {"corpus": [], "dataset_shards": ["corpus"]}


def test_definitions_load_and_the_asset_graph_matches_the_snapshot() -> None:
    graph = defs.resolve_asset_graph()
    snapshot = {
        key.to_user_string(): sorted(k.to_user_string() for k in graph.get(key).parent_keys)
        for key in graph.get_all_asset_keys()
    }
    assert snapshot == ASSET_GRAPH


def test_data_assets_materialize_in_process_on_the_tiny_profile(tmp_path: Path) -> None:
    mc = MegaContextConfig(profile="tiny", overrides=[f"paths.artifact_root={tmp_path}", f"paths.corpus_dir={tmp_path / 'none'}",
                                                       "data.max_documents=2"])
    result = materialize([corpus, dataset_shards], resources={"mc": mc})
    assert result.success
    shards = result.asset_materializations_for_node("dataset_shards")[0].metadata
    assert shards["path"].value == str(tmp_path / "data" / "shards")
    assert shards["tokens"].value > 0 and "| **all** | 2 |" in shards["summary"].value
