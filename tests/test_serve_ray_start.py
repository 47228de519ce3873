"""Ray Serve start-up refusals: a serving port already in use and an unknown ingress are refused
before Ray starts, with the reason. In a module of their own: ``tests/test_serve_ray.py`` keeps an
embedded Ray running for its whole module (a module-scoped fixture), and a process that already
runs Ray does not start another, so there these checks would depend on the order the tests run in
(``make test-random``)."""
import os
import socket

import pytest

pytestmark = [pytest.mark.skipif(os.environ.get("EENN_SKIP_RAY") == "1", reason="EENN_SKIP_RAY=1"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own pydantic notices


@pytest.fixture(autouse=True)
def _no_ray():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "another test left Ray running in this process"


def test_a_port_in_use_is_refused_before_ray_starts():
    import ray

    from eenn.serve import ray_app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve on 127.0.0.1:{port}: .*pick another"):
            ray_app.start(None, port=port)
    assert not ray.is_initialized()


def test_unknown_ingress_is_refused_before_ray_starts():
    import ray

    from eenn.serve import ray_app

    with pytest.raises(ValueError, match="ingress must be one of haproxy, proxy, got 'nginx'"):
        ray_app.start(None, ingress="nginx")  # refused before the plan is read
    assert not ray.is_initialized()
