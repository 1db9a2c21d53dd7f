"""The main job on a two-node Ray cluster started on this machine (Ray's cluster test utility:
a head and a worker node, each its own raylet): both nodes caption, both nodes write parts, and
no image is written twice."""

import os

import pytest

from jobs.caption import run_caption
from jobs.config import JobConfig, ModelSpec, RunnerConfig
from jobs.sources import open_source
from model.config import EngineConfig
from pipeline.compose import ComposeConfig
from sinks.parquet import part_files, read_commit, read_rows

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_the_job_uses_both_nodes_to_caption_and_to_write(two_nodes, coco_world, tmp_path):
    cluster, worker = two_nodes
    # two describe actors of 1.5 CPUs cannot share a 2-CPU node: one must run on each
    # each image takes a while (16 tokens x 4 questions), so the actor that starts second still
    # finds work: Ray Data hands batches to whichever actor is ready first
    cfg = JobConfig(source=str(coco_world), out=str(tmp_path / "out"), model=ModelSpec("random:tiny"),
                    engine=EngineConfig(max_new_tokens=16), batch_size=1,
                    compose=ComposeConfig(attributes=("color", "shape", "material"), max_pairs=0),
                    rows_per_part=1, runner=RunnerConfig(mode="ray", describe_actors=2, describe_cpus=1.5))
    summary = run_caption(cfg, open_source(str(coco_world)), progress=False)
    assert summary.counts == {"ok": 6, "error": 1}
    rows = read_rows(tmp_path / "out").to_pylist()
    assert len(rows) == len({r["image_id"] for r in rows}) == 7
    nodes = {cluster.head_node.node_id, worker.node_id}
    assert {r["processed_by"] for r in rows} == nodes
    # the part writers are spread over the nodes: each part committed by the node that wrote it
    assert {read_commit(p)["written_by"] for p in part_files(tmp_path / "out")} == nodes
