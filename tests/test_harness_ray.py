"""The shared Ray fixtures really start a cluster that runs work."""

import pytest


@pytest.mark.slow
def test_ray_head_runs_tasks(ray_session) -> None:
    ray = ray_session

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    assert ray.cluster_resources().get("CPU") == 2
