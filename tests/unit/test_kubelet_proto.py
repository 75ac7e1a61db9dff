"""tests/kubelet's generated modules are fresh and name the RPCs containerd serves."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from grpclib.client import Channel

from tests.kubelet import containerd_tasks_grpc, cri_api_grpc
from tests.kubelet import generate as gen

REGENERATE = "python -m tests.kubelet.generate"


def test_checked_in_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    stale = [
        name
        for name in gen.generated_names()
        if not (gen.PACKAGE_DIR / name).is_file()
        or (gen.PACKAGE_DIR / name).read_bytes() != (tmp_path / name).read_bytes()
    ]
    assert not stale, f"stale or missing: {', '.join(stale)}; run `{REGENERATE}` and commit"


def test_stubs_call_the_grpc_paths_containerd_serves() -> None:
    no_channel = cast(Channel, None)  # stubs only keep it; nothing connects
    runtime = cri_api_grpc.RuntimeServiceStub(no_channel)
    images = cri_api_grpc.ImageServiceStub(no_channel)
    tasks = containerd_tasks_grpc.TasksStub(no_channel)
    assert runtime.RunPodSandbox.name == "/runtime.v1.RuntimeService/RunPodSandbox"
    assert runtime.UpdateContainerResources.name == (
        "/runtime.v1.RuntimeService/UpdateContainerResources"
    )
    assert images.ImageStatus.name == "/runtime.v1.ImageService/ImageStatus"
    assert tasks.Update.name == "/containerd.services.tasks.v1.Tasks/Update"
    assert tasks.Metrics.name == "/containerd.services.tasks.v1.Tasks/Metrics"
