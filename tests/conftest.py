"""Shared test fixtures: a real S3 endpoint on loopback (moto's server) reached through s3fs.

`s3_server` (session scope) yields an `S3Server`: `.endpoint_url`, `.storage_options` (the dict to pass
as `storage_options=` to fsspec/s3fs and to our loaders), `.fs()` (an s3fs filesystem on it) and
`.bucket(prefix)` (a fresh bucket, returned as an `s3://name` URL). Tests that stop the endpoint build
their own `S3Server` so the shared one stays up; moto keeps its buckets in process memory, so objects
survive a stop/start on the same port.

Run: .venv/bin/pytest tests/data/test_pretrain.py -v
"""

from __future__ import annotations

import itertools
import logging
import os

import pytest

# Dummy credentials for moto; never real ones. Set before boto reads its environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log drowns failure output

_bucket_ids = itertools.count()


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 that can be stopped and started again on the same port."""

    def __init__(self, port: int = 0):
        self.port = port
        self._server = None

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get 'connection refused'."""
        if self._server is not None:
            self._server.stop()
            self._server._server.server_close()  # ThreadedMotoServer.stop() leaves the socket bound
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        """s3fs options for this endpoint. Botocore's own retries are cut to one attempt so a test of
        an outage sees the error at once instead of after botocore's backoff (seconds)."""
        return {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint_url,
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
            "skip_instance_cache": True,
        }

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def bucket(self, prefix: str = "test") -> str:
        """Create a fresh bucket and return its URL (`s3://<name>`)."""
        name = f"{prefix}-{next(_bucket_ids)}-{os.getpid()}"
        self.fs().mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small matmuls on a shared 2-core box: one torch thread avoids oversubscription stalls (10-50x under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> str:
    """A storage root (file:// URL) holding the tiny run's inputs: corpus, conversations, tokenizer, CORE bundle."""
    from tests.finished_run import build_inputs

    return build_inputs(f"file://{tmp_path_factory.mktemp('tiny-root')}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (tests/tracking_server.py), started without waiting: `.ready()`
    waits for its health endpoint (so its start-up overlaps whatever the session builds next)."""
    from tests.tracking_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def finished_run(mlflow_server, tiny_inputs):
    """The plan of a tiny run that pretrained, fine-tuned, was evaluated and has its report written, built
    once per session (tests/finished_run.py) and only read by the tests that use it. It tracks to the session's
    MLflow server and to a closed loopback port (tests/test_tracking.py reads both outcomes back)."""
    from tests.finished_run import build_finished_run
    from tests.tracking_server import closed_port

    return build_finished_run(tiny_inputs, track=(f"mlflow={mlflow_server.ready().uri}",
                                                  f"mlflow=http://127.0.0.1:{closed_port()}"))


from tests.serve_app import served  # noqa: E402,F401 - one Ray Serve app per session (tests/test_serve*.py)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs) for a module's Ray Train runs; one already up (the session's Serve app)
    is reused, never started twice and never shut down from here."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)  # never another Ray
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory):
    """A real control plane on 127.0.0.1 (tests/controlplane/): kube-apiserver, scheduler, controller-manager,
    KubeRay operator, Kueue and kwok-simulated H100 nodes, built from their Go modules. `.admin()` is an admin
    client, `.kubeconfig(user)` a kubeconfig file for "admin" or a user of TEST_USERS; stopped at session end."""
    from tests.controlplane.cluster import RealCluster

    cluster = RealCluster.start(tmp_path_factory.mktemp("real-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
